"""Runs spread over Ray: worker actors that each load the model once, fed one item at a time by the driver.

The driver (the process that called `interp.score`) keeps the plan and the store; `Workers.map` hands the next item
(a sample to score, a piece of a finalize step: see `interp.fanout`) to whichever worker is free and yields each
result as it arrives, so the driver writes every finished sample exactly as a single-process run does. A worker that
dies (killed, out of memory, its machine gone) has its item handed to the next free worker while a replacement
starts; a worker that cannot load the model fails the run with its error, and workers that cannot start in time
fail it with a message rather than a hang. `ray` is an optional dependency (the `cluster` extra), imported when a
cluster is used.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import secrets
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from .models import Model, load_model

_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's servers on 127.0.0.1 (see _loopback)
LOCAL = "ray"          # a local Ray cluster started for the run (or the one this process is already connected to)
NO_ROOM = "is the cluster short of free CPUs / GPUs (`ray status`)?"  # why a worker may never start
ITEM_ATTEMPTS = 3      # an item whose workers die this many times fails the run (it is what kills them)
log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The cluster cannot run this work: Ray missing or unreachable, too few resources, a worker that cannot load
    the model, an item that keeps killing its workers."""


@dataclass(frozen=True)
class Cluster:
    """Where and how a run's workers start.

    address: "ray" (a local Ray cluster started for the run, on 127.0.0.1; or the one this process is already
    connected to), "auto" (the cluster started on this machine with `ray start`), "HOST:PORT" (a head's address,
    from `ray start --head`) or "ray://HOST:PORT" (Ray Client); a process already connected to a cluster uses that
    one, and refuses a HOST:PORT naming another. workers: how many (default: one per gpus_per_worker GPUs
    when GPUs are asked for, else one per cpus_per_worker CPUs, never more than the cluster's cores: `worker_count`). cpus_per_worker / gpus_per_worker: each worker's Ray resources (its
    torch threads follow its CPUs; a GPU worker loads the model on "cuda" unless device says otherwise).
    model: what each worker loads (an alias, folder or hub id) with dtype / device / device_map ("auto": a model
    larger than one GPU) / trust_remote_code; None: the `Model` given to `score` is shipped to the workers (fine
    for small models; give a name for large ones). start_timeout: seconds workers may take to start and load the
    model (Ray keeps a worker the cluster has no room for waiting: this turns that wait into an error).
    """

    address: str = LOCAL
    workers: int | None = None
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    device_map: str | None = None
    trust_remote_code: bool = False
    start_timeout: float = 1800

    def __post_init__(self):
        if not isinstance(self.address, str) or not self.address.strip():
            raise ValueError(f"cluster address {self.address!r}: give 'ray', 'auto', HOST:PORT or ray://HOST:PORT")
        if self.workers is not None and (not isinstance(self.workers, int) or isinstance(self.workers, bool)
                                         or self.workers < 1):
            raise ValueError(f"workers={self.workers!r}: give a whole number >= 1")
        if not _is_number(self.cpus_per_worker) or not 0 < self.cpus_per_worker < math.inf:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker!r}: give a number of CPUs > 0 (0.5: two workers "
                             "share a CPU)")
        if not _is_number(self.gpus_per_worker) or not 0 <= self.gpus_per_worker < math.inf:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker!r}: give a number of GPUs >= 0")
        if not _is_number(self.start_timeout) or not self.start_timeout > 0:
            raise ValueError(f"start_timeout={self.start_timeout!r}: give seconds > 0")

    def worker_count(self, total: dict) -> int:
        """How many workers to start on a cluster of `total` resources (Ray's cluster_resources()): `workers`, else
        one per `gpus_per_worker` GPUs with GPUs asked for (one per `cpus_per_worker` CPUs without), never more than
        the CPUs hold nor than the cluster's cores. ClusterError when the cluster cannot hold that many."""
        cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
        fit = int(cpus / self.cpus_per_worker + 1e-9)  # + 1e-9: 2 CPUs hold 20 workers of 0.1 (2 // 0.1 is 19)
        if self.gpus_per_worker:
            fit = min(fit, int(gpus / self.gpus_per_worker + 1e-9))
        n = self.workers or max(min(fit, int(cpus)), 1)
        if fit < n:
            raise ClusterError(f"the cluster at {self.address!r} has {cpus:g} CPUs and {gpus:g} GPUs: it holds {fit} "
                               f"worker(s) of {self.cpus_per_worker:g} CPU(s) and {self.gpus_per_worker:g} GPU(s), not "
                               f"{n}; ask for fewer workers or smaller ones (--workers, --cpus-per-worker, "
                               "--gpus-per-worker)")
        return n

    def load_options(self) -> dict:
        """What `load_model` takes on each worker."""
        device = self.device or ("cuda" if self.gpus_per_worker > 0 and self.device_map is None else None)
        return {"dtype": self.dtype, "device": device, "device_map": self.device_map,
                "trust_remote_code": self.trust_remote_code}

    def driver_model(self, name: str) -> Model:
        """The driver's own copy of the model, for the plan, tokenizer and config: built on the meta device, no
        weight read or downloaded (the workers hold them), in the workers' dtype."""
        return load_model(name, dtype=self.dtype, weights=False, trust_remote_code=self.trust_remote_code)

    def worker_device(self) -> str:
        """The device the workers' models run on, as a run records it (a model's device: "cuda:0", not "cuda")."""
        device = torch.device(self.device or ("cuda" if self.gpus_per_worker > 0 else "cpu"))
        return str(torch.device(device.type, 0) if device.type == "cuda" and device.index is None else device)


def _is_number(value) -> bool:
    """An int or float, not a bool (True is not 1 CPU), not text."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_cluster(cluster, model) -> Cluster | Workers | None:
    """`score`'s cluster= argument as a Cluster (an address alone: a str) or started Workers, or None; a model given
    by name is what the workers load."""
    if cluster is None or isinstance(cluster, Workers):
        return cluster
    if isinstance(cluster, str):
        cluster = Cluster(cluster)
    if not isinstance(cluster, Cluster):
        raise TypeError(f"cluster= takes an address ('ray', 'auto', HOST:PORT), an interp.cluster.Cluster or "
                        f"Workers, not {type(cluster).__name__}")
    if cluster.model is None and isinstance(model, (str, os.PathLike)):
        cluster = replace(cluster, model=str(model))
    return cluster


class Worker:
    """A Ray actor's body: loads the model once (`ready`), then runs `fn(model, item)` for the driver."""

    def __init__(self, source: str | Model, options: dict, threads: int):
        self.source, self.options, self.threads = source, options, threads
        self.model: Model | None = None

    def ready(self) -> str:
        """Load the model (an error here is the run's error); returns where this worker runs."""
        torch.set_num_threads(self.threads)
        self.model = self.source if isinstance(self.source, Model) else load_model(self.source, **self.options)
        return f"{socket.gethostname()} (pid {os.getpid()}, {self.model.device})"

    def run(self, fn: Callable, item):
        return fn(self.model, item)


class Workers:
    """Ray actors holding one model: an executor for `interp.fanout` (`map`). They start on the first `map` (so a
    run that has nothing left to score starts none) and stop on `close` (or leaving a `with` block); one Workers
    serves several runs of the same model (a sweep)."""

    def __init__(self, cluster: Cluster, model: Model | None = None):
        if cluster.model is None and not isinstance(model, Model):
            raise ValueError("Workers need a model: Cluster(model=NAME) for the workers to load, or a Model to ship")
        self.cluster, self.model = cluster, model
        self.actors: list = []   # the live actors, for a caller (a test) that wants to see or kill one
        self.where: list[str] = []  # where each live actor runs (host, pid, device)
        self.replaced = 0        # workers that died and were replaced
        self._starting: dict = {}  # a replacement's `ready` ObjectRef -> its actor, until it has loaded the model
        self._started = 0        # actors started (their names)
        self._ray = None
        self._started_ray = False
        self._source = None
        self._token = secrets.token_hex(3)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Connect to (or start) the cluster and start the workers, each loading the model; raise ClusterError with a
        worker's own error when one cannot, or when they do not all start within `start_timeout`."""
        if self.actors or self._starting:  # started (replacements may still be loading: `map` waits for them)
            return
        ray, started = _connect(self.cluster)
        self._ray, self._started_ray = ray, self._started_ray or started
        c = self.cluster
        n = c.worker_count(ray.cluster_resources())
        self._source = ray.put(self.model) if c.model is None else c.model
        actors = [self._actor() for _ in range(n)]
        refs = [actor.ready.remote() for actor in actors]
        try:
            ready, _ = ray.wait(refs, num_returns=n, timeout=c.start_timeout)
            if len(ready) < n:
                raise ClusterError(f"{n - len(ready)} of {n} workers did not start and load the model within "
                                   f"{c.start_timeout:g} s (Cluster.start_timeout); {NO_ROOM}")
            self.where = [self._loaded(ref) for ref in refs]
        except BaseException:  # one could not load: none keeps its CPUs / GPUs (a sweep goes on to other models)
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise
        self.actors = actors
        log.info("%d workers: %s", n, "; ".join(self.where))

    def _actor(self):
        c = self.cluster
        self._started += 1
        cls = self._ray.remote(Worker).options(name=f"interp-{self._token}-{self._started}", num_cpus=c.cpus_per_worker,
                                               num_gpus=c.gpus_per_worker, max_restarts=0)
        return cls.remote(self._source, c.load_options(), max(1, int(c.cpus_per_worker)))

    def _loaded(self, ready) -> str:
        """Where a worker runs, from its `ready` call; ClusterError with its error if it could not load the model."""
        ray = self._ray
        try:
            return ray.get(ready)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause
            what = self.cluster.model or getattr(self.model, "name", "the model")
            raise ClusterError(f"a worker could not load {what}: {type(cause).__name__}: {cause}") from None
        except _deaths(ray) as e:
            raise ClusterError(f"a worker died while loading the model: {type(e).__name__}: {e}") from None
        except ray.exceptions.RayError as e:  # it could not be placed or set up
            raise ClusterError(f"a worker could not start: {type(e).__name__}: {e}") from None

    def map(self, fn: Callable, model, items: Sequence) -> Iterator[tuple[int, Any]]:
        """(j, fn(model_on_a_worker, items[j])) for every item as each finishes; the next item goes to the first free
        worker. A worker that dies has its item handed to the next free worker (each item's result is yielded once)
        while a replacement starts beside the others; with no worker left, the run waits `start_timeout` for one."""
        if not items:
            return
        self.start()
        ray = self._ray
        pending = deque(range(len(items)))
        idle = list(self.actors)
        running: dict = {}  # ObjectRef -> (actor, j)
        deaths: dict[int, int] = {}
        try:
            while pending or running:
                while pending and idle:
                    actor, j = idle.pop(0), pending.popleft()
                    running[actor.run.remote(fn, items[j])] = actor, j
                if not running and not self._starting:
                    raise ClusterError(f"every worker died and none could be started again ({self.replaced} replaced)")
                timeout = None if running else self.cluster.start_timeout  # only replacements left to wait for
                done, _ = ray.wait([*running, *self._starting], num_returns=1, timeout=timeout)
                if not done:
                    raise ClusterError(f"no worker left, and none started within {self.cluster.start_timeout:g} s "
                                       f"(Cluster.start_timeout); {NO_ROOM}")
                [ref] = done
                if ref in self._starting:
                    idle += self._joined(ref)
                    continue
                actor, j = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise e.cause from None  # the analysis's own error, as in a single process
                except _deaths(ray) as e:
                    deaths[j] = deaths.get(j, 0) + 1
                    self._drop(actor)
                    if deaths[j] >= ITEM_ATTEMPTS:
                        raise ClusterError(f"item {j} of {fn.__name__} killed {deaths[j]} workers; last: {e}") from None
                    self._start_replacement()
                    pending.appendleft(j)
                    log.warning("a worker died (%s): item %d of %s goes to the next free worker", type(e).__name__, j,
                                fn.__name__)
                    continue
                idle.append(actor)
                yield j, result
        finally:
            for ref in running:  # an error or an interruption: what is still running is not waited for
                ray.cancel(ref)

    def _drop(self, dead) -> None:
        """Forget a dead worker (killed, in case it is only unreachable)."""
        self._ray.kill(dead, no_restart=True)
        k = self.actors.index(dead)
        del self.actors[k], self.where[k]

    def _start_replacement(self) -> None:
        """Start a new worker; it joins the others once it has loaded the model (`_joined`)."""
        self.replaced += 1
        actor = self._actor()
        self._starting[actor.ready.remote()] = actor

    def _joined(self, ready) -> list:
        """[the replacement whose `ready` call finished], or [] if it could not load (the others carry on)."""
        actor = self._starting.pop(ready)
        try:
            where = self._loaded(ready)
        except ClusterError as e:
            self._ray.kill(actor, no_restart=True)
            if not self.actors and not self._starting:
                raise
            log.warning("a replacement worker did not start (%s); %d workers go on", e, len(self.actors))
            return []
        self.actors.append(actor)
        self.where.append(where)
        return [actor]

    def close(self) -> None:
        """Stop the workers (and the local Ray cluster, if this started it)."""
        for actor in [*self.actors, *self._starting.values()]:
            self._ray.kill(actor, no_restart=True)
        self.actors, self.where, self._starting = [], [], {}
        if self._started_ray and self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()
            self._started_ray = False


def _deaths(ray) -> tuple[type, ...]:
    """The errors that say a worker (or its machine) is gone, not that the work failed: the item is run again."""
    e = ray.exceptions
    return e.RayActorError, e.WorkerCrashedError, e.NodeDiedError, e.OutOfMemoryError, e.ObjectLostError


def _connect(cluster: Cluster) -> tuple[Any, bool]:
    """(the `ray` module, connected; whether this call connected it): to this process's cluster if it has one, else
    as `cluster.address` says."""
    try:
        import ray  # the optional `cluster` extra
    except ImportError:
        raise ClusterError("--cluster needs Ray: pip install 'interp[cluster]'") from None
    address = cluster.address
    if ray.is_initialized():
        _check_joined(ray, address)
        return ray, False
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise ClusterError(f"{address}: ray:// addresses go through Ray Client, which needs pip install 'ray[client]'; "
                           "or run the driver on a machine of the cluster and give the head's HOST:PORT")
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address == LOCAL:  # a new cluster, never one `ray start` left on this machine; its servers on 127.0.0.1
            with _loopback(ray):
                ray.init(address="local", include_dashboard=False, **quiet)
        else:
            _check_listening(ray, address)
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = ("; a cluster with token authentication (Ray's default) also needs RAY_AUTH_MODE=token here, and its "
                "token in ~/.ray/auth_token or RAY_AUTH_TOKEN" if "RAY_AUTH_MODE" not in os.environ else "")
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {e}{hint}") from None
    return ray, True


def _check_listening(ray, address: str) -> None:
    """ClusterError at once when nothing listens at the head's address (Ray itself would retry for many minutes).
    "auto" is checked at the address `ray start` recorded on this machine; Ray Client addresses are left to Ray."""
    if address.startswith("ray://"):
        return
    try:
        head = ray._private.services.canonicalize_bootstrap_address(address)
    except (ValueError, ConnectionError) as e:
        raise ClusterError(f"no Ray cluster at {address!r}: {e}") from None
    if head is None:
        raise ClusterError(f"{address!r} found no cluster started with `ray start` on this machine")
    host, _, port = head.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except (OSError, ValueError) as e:
        raise ClusterError(f"nothing listens at {address!r} ({head}: {getattr(e, 'strerror', None) or e}); start the "
                           "head with `ray start --head --port=PORT`, or give --cluster ray for a local cluster") from None


def _check_joined(ray, address: str) -> None:
    """A process already connected to a cluster uses it; ClusterError when HOST:PORT names another head."""
    if address in (LOCAL, "auto") or address.startswith("ray://"):
        return
    joined = ray.get_runtime_context().gcs_address
    asked = {address}
    try:
        asked.add(ray._private.services.canonicalize_bootstrap_address(address))  # as ray.init stores it
    except (ValueError, OSError):
        pass

    def resolved(a: str) -> tuple[str, int]:
        host, _, port = a.rpartition(":")
        return socket.gethostbyname(host), int(port)

    try:
        same = joined in asked or resolved(joined) in {resolved(a) for a in asked}
    except (OSError, ValueError):
        same = False
    if not same:
        raise ClusterError(f"this process is connected to the Ray cluster at {joined}, not {address}: call "
                           "ray.shutdown() first, or give --cluster ray to use the connected one")


@contextmanager
def _loopback(ray):
    """Within the block, a local Ray cluster starts on 127.0.0.1 only: its servers (child processes, which read
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) and this driver (whose Ray read that variable when imported: its constant
    is set too). Both are restored after, so a later cluster joined by address sees this machine's real address."""
    constants = ray._private.ray_constants
    env, constant = os.environ.get(_LOOPBACK_ENV), constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_ENV], constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = constant
        if env is None:
            os.environ.pop(_LOOPBACK_ENV)
        else:
            os.environ[_LOOPBACK_ENV] = env
