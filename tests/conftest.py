import json
import os
import sys
from pathlib import Path

import pytest

# The hubs are unreachable here: fail fast instead of retrying. Helpers live beside the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run under the interpreter on machines without CUDA; it must be set before they are imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def app_store(tmp_path_factory):
    """A store of real stories260k runs (summary, retrieval, sinks), a sinks run of a tiny random ViT, a circuits run
    of the planted-circuit model on two tasks, an incomplete and a corrupt run: what the dashboard tests browse.
    Returns (store, {kind: run id}, {name: Model}) — the models a dashboard cannot load by name (the tiny ViT, the
    planted circuit)."""
    import interp
    import planted_circuit
    from tiny_models import make, vit_processor

    root = tmp_path_factory.mktemp("app-store")
    model = interp.load_model("stories260k")
    vit = interp.load_model(make("vit")[0], processor=vit_processor())
    runs = {
        "summary": interp.score(model, "summary", samples=3, store=root),
        "retrieval": interp.score(model, "retrieval", lengths=[200, 300], depths=[0, 50, 100], n_needles=1,
                                  store=root),
        "sinks": interp.score(model, "sinks", samples=3, store=root),
        "vit": interp.score(vit, "sinks", samples=2, store=root),
    }
    planted = planted_circuit.model()
    tasks = [root.parent / f"{name}.jsonl" for name in ("first", "again")]
    for seed, path in enumerate(tasks):
        planted_circuit.write_task(path, n=6, seed=seed)
    runs["circuits"] = interp.score(planted, "circuits", tasks=",".join(map(str, tasks)), circuit_percent=25,
                                    store=root)
    incomplete = root / "20200101-000000-stories260k-summary-aaaaaa"
    incomplete.mkdir()
    meta = dict(runs["summary"].meta, id=incomplete.name, status="incomplete", tables=[])
    (incomplete / "meta.json").write_text(json.dumps(meta))
    corrupt = root / "20200101-000001-broken-bbbbbb"
    corrupt.mkdir()
    (corrupt / "meta.json").write_text("{ not json")
    ids = {name: r.id for name, r in runs.items()} | {"incomplete": incomplete.name, "corrupt": corrupt.name}
    return root, ids, {vit.name: vit, planted.name: planted}
