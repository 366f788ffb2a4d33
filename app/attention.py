"""Attention views of a stored run's samples, recomputed on demand by the kernels: the only place where the
dashboard touches a model, and only when the user asks for a view.

A view re-runs one planned sample (rebuilt by the analysis's `sample_inputs`), or a prompt the user typed (`Prompt`),
through the run's model, captures one layer's queries and keys while the model keeps its own attention, and answers
every request on that layer from them: a block-pooled map of any region (finer as the region shrinks, exact per
token at the end), one query's row or one key's column, one query's attention over an image's patch grid, every
head's thumbnail, a head's statistics. Only small matrices leave this module; nothing N×N is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from interp.analyses import Options, get_analysis
from interp.analyses.inputs import lvlm_prompt
from interp.catalog import ALIASES
from interp.files import unconfined
from interp.hooks import trace
from interp.kernels import AttentionGeometry, attention_stats, attention_tile, pooled_attention
from interp.layout import TokenLayout, fixed_masking, token_layout
from interp.models import Model, load_model
from interp.scoring import model_identity

MAX_CELLS = 128      # a map is at most this many rows and columns; a region that fits is drawn per token
CACHED_LAYERS = 4    # captured layers kept in memory (q and k of one layer, every head)
LOADED_MODELS = 2    # models loaded for views kept in memory
THUMB_CELLS = 32     # a head's thumbnail in the multi-head grid is at most this many rows and columns
SINK_SHARE = 0.3     # a key receiving at least this mean attention from the queries that see it is a sink …
SINK_QUERIES = 16    # … when at least this many queries see it (or all of a shorter input): the sinks analysis's
                     # ε and any_min_queries defaults
LIVE_MAX_TOKENS = 2048  # a typed prompt is cut to this many tokens
PLAIN_SEGMENTS = ("text", "pad")  # segments that draw no span on a map


@dataclass
class LayerCapture:
    """One layer's attention inputs on one sample, on the model's device. q: (1, H, N, d); k: (1, H_kv, N, d), fp32.
    geometry: the call's, as the kernels take it.
    tokens: text of each position; layout: its segments and image grids; image: (H, W, 3) uint8 or None."""

    q: Tensor
    k: Tensor
    geometry: AttentionGeometry
    tokens: list[str]
    layout: TokenLayout
    image: np.ndarray | None

    @property
    def n_tokens(self) -> int:
        return self.q.shape[2]

    def head(self, head: int) -> tuple[Tensor, Tensor, AttentionGeometry]:
        """(q, k, geometry) of one query head and its KV head: (1, 1, N, d) each."""
        n_heads, n_kv = self.q.shape[1], self.k.shape[1]
        if not 0 <= head < n_heads:
            raise ValueError(f"head {head} is outside this layer's {n_heads} heads")
        kv = head // (n_heads // n_kv)
        return self.q[:, head:head + 1], self.k[:, kv:kv + 1], self.geometry.select(heads=slice(head, head + 1))


@dataclass
class AttentionView:
    """What a map shows: (rows, cols) probabilities over queries q_range × keys k_range, each cell the mean of a
    block of block = (queries, keys) tokens ((1, 1): exact), with token texts for exact views."""

    matrix: np.ndarray
    q_range: tuple[int, int]
    k_range: tuple[int, int]
    block: tuple[int, int]
    q_tokens: list[str] | None
    k_tokens: list[str] | None

    @property
    def exact(self) -> bool:
        return self.block == (1, 1)


@dataclass(frozen=True)
class Prompt:
    """A live input typed in the dashboard: text, and an image's encoded bytes (PNG, JPEG, …) or None."""

    text: str
    image: bytes | None = None

    def digest(self) -> str:
        return hashlib.sha256(self.text.encode() + b"\0" + (self.image or b"")).hexdigest()


class AttentionSource:
    """Takes models given (by the name runs record) or loads them on first use, and serves attention views of runs'
    samples. It loads only the built-in aliases and the models `allow` names: a hub id or folder as written, or a
    folder below an allowed one (symlinks followed) — never a path merely because a run records it. Thread-safe;
    keeps the last `LOADED_MODELS` loaded models and `CACHED_LAYERS` captured layers."""

    def __init__(self, models: dict[str, Model] | None = None, device: str | None = None,
                 allow: Iterable[str | os.PathLike] = ()):
        self.given: dict[str, Model] = dict(models or {})
        self.device = device
        self.allowed = {str(name) for name in allow}
        self._folders = [Path(os.path.realpath(os.path.expanduser(name))) for name in self.allowed]
        self._loaded: OrderedDict[str, Model] = OrderedDict()
        self._layers: OrderedDict[tuple, LayerCapture] = OrderedDict()
        self._lock = threading.Lock()

    def may_load(self, name: str) -> bool:
        """Whether the model a run names is one this source loads (the answer never depends on whether it exists)."""
        if name in ALIASES or name in self.allowed:
            return True
        path = os.path.expanduser(name)
        return os.path.isabs(path) and any(Path(os.path.realpath(path)).is_relative_to(f) for f in self._folders)

    def model(self, meta: dict) -> Model:
        """The run's model: given, or loaded by the name it records if `may_load`; its config must be the run's."""
        name = meta["model"]["name"]
        model = self.given.get(name) or self._loaded.get(name)
        if model is None:
            if not self.may_load(name):  # one message whether or not such a folder exists
                raise ValueError(f"the run's model {name!r} is not one this dashboard loads: it loads the built-in "
                                 "aliases and the models it is started with (`interp app --models DIR`: a folder of "
                                 "models, or a model's folder or hub id)")
            try:
                with unconfined():  # an allowed model's files lie outside the store the request is confined to
                    model = load_model(name, device=self.device)
            except Exception as e:  # noqa: BLE001  (any loading failure becomes one clear message)
                raise ValueError(f"cannot load {name!r} to compute attention views: {e}") from e
            self._loaded[name] = model
            while len(self._loaded) > LOADED_MODELS:
                self._loaded.popitem(last=False)
        elif name in self._loaded:
            self._loaded.move_to_end(name)
        if model_identity(model)["config_hash"] != meta["model"].get("config_hash"):
            raise ValueError(f"{name!r} has another config than the one run {meta.get('id')} was made with: "
                             "not the same model")
        return model

    def layer(self, meta: dict, sample: int, layer: int, prompt: Prompt | None = None) -> LayerCapture:
        """One layer's capture on one planned sample of a run, or on a live `prompt` through the run's model
        (computed once, then cached by what it is computed from: `replay_key` or the prompt's digest, never by
        the id a run's meta.json claims)."""
        key = (replay_key(meta, sample) if prompt is None else
               (meta["model"]["name"], meta["model"].get("config_hash"), prompt.digest()), layer)
        with self._lock:
            if key in self._layers:
                self._layers.move_to_end(key)
                return self._layers[key]
            capture = self._capture(meta, sample, layer, prompt)
            self._layers[key] = capture
            while len(self._layers) > CACHED_LAYERS:
                self._layers.popitem(last=False)
            return capture

    def _capture(self, meta: dict, sample: int, layer: int, prompt: Prompt | None) -> LayerCapture:
        model = self.model(meta)
        if not 0 <= layer < model.n_layers():
            raise ValueError(f"layer {layer} is outside {model.name}'s {model.n_layers()} layers")
        if prompt is None:
            analysis = get_analysis(meta["analysis"])
            inputs = analysis.sample_inputs(model, meta["plan"][sample], Options.from_json(meta["options"]),
                                            analysis.stored_params(meta))
        else:
            inputs = live_inputs(model, prompt)
        calls = []
        trace(model, inputs, calls.append, layers=[layer], keep=("q", "k"))
        call = calls[0]
        q, k = call.q.float(), call.k.float()  # kept on the model's device: the views run there
        layout = token_layout(model, inputs)
        return LayerCapture(q, k, call.geometry, _token_texts(model, inputs, layout), layout, _image(model, inputs))

    def pattern(self, meta: dict, sample: int, layer: int, head: int, q_range: tuple[int, int] | None = None,
                k_range: tuple[int, int] | None = None, max_cells: int = MAX_CELLS,
                prompt: Prompt | None = None) -> AttentionView:
        """One head's attention over a region of one sample or live prompt (see `attention_view`)."""
        return attention_view(self.layer(meta, sample, layer, prompt), head, q_range, k_range, max_cells)

    def query_on_grid(self, meta: dict, sample: int, layer: int, head: int, query: int,
                      grid: int = 0, prompt: Prompt | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The attention of one query token on one image's patch grid: ((rows, cols) probabilities, the image
        (H, W, 3) uint8 or None)."""
        cap = self.layer(meta, sample, layer, prompt)
        return grid_values(cap, head, query, grid), cap.image


def replay_key(meta: dict, sample: int) -> str:
    """A digest of what a planned sample's capture is computed from: the run's model (name and config hash),
    analysis, options, parameters and the planned sample, and `replay` where the dashboard sets it (the run's
    resolved directory and the digests of the input copies the sample reads)."""
    plan = meta["plan"]
    if not 0 <= sample < len(plan):
        raise ValueError(f"sample {sample} is outside the run's {len(plan)} samples")
    source = [meta["model"]["name"], meta["model"].get("config_hash"), meta["analysis"], meta["options"],
              meta["params"], plan[sample], meta.get("replay")]
    return hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()


def attention_view(cap: LayerCapture, head: int, q_range: tuple[int, int] | None = None,
                   k_range: tuple[int, int] | None = None, max_cells: int = MAX_CELLS) -> AttentionView:
    """One head's attention over queries q_range × keys k_range (default: the whole input), pooled by the kernels
    into at most max_cells × max_cells blocks; exact per token once the region fits."""
    q, k, geometry = cap.head(head)
    n = cap.n_tokens
    (q0, q1), (k0, k1) = _clip(q_range, n), _clip(k_range, n)
    bq, bk = -(-(q1 - q0) // max_cells), -(-(k1 - k0) // max_cells)
    if bq == 1 and bk == 1:
        m = attention_tile(q, k, (q0, q1), (k0, k1), geometry=geometry)
        return AttentionView(m[0, 0].cpu().numpy(), (q0, q1), (k0, k1), (1, 1), cap.tokens[q0:q1], cap.tokens[k0:k1])
    m = pooled_attention(q, k, block_q=bq, block_k=bk, q_range=(q0, q1), k_range=(k0, k1), geometry=geometry)
    return AttentionView(m[0, 0].cpu().numpy(), (q0, q1), (k0, k1), (bq, bk), None, None)


def query_row(cap: LayerCapture, head: int, query: int) -> np.ndarray:
    """(N,) the attention of one query over every key."""
    _check_position(query, cap.n_tokens, "query")
    q, k, geometry = cap.head(head)
    return attention_tile(q, k, (query, query + 1), (0, cap.n_tokens), geometry=geometry)[0, 0, 0].cpu().numpy()


def key_column(cap: LayerCapture, head: int, key: int) -> np.ndarray:
    """(N,) the attention every query pays to one key (0 where the key is hidden from it)."""
    _check_position(key, cap.n_tokens, "key")
    q, k, geometry = cap.head(head)
    return attention_tile(q, k, (0, cap.n_tokens), (key, key + 1), geometry=geometry)[0, 0, :, 0].cpu().numpy()


def grid_values(cap: LayerCapture, head: int, query: int, grid: int = 0) -> np.ndarray:
    """(rows, cols) one query's attention on one image's patch grid (NaN: a cell without a token)."""
    if not cap.layout.grids:
        raise ValueError("this sample has no image: the grid view is for ViTs and vision-language models")
    if not 0 <= grid < len(cap.layout.grids):
        raise ValueError(f"image grid {grid} is outside the sample's {len(cap.layout.grids)} grids")
    row = query_row(cap, head, query)
    positions = cap.layout.grids[grid].positions.cpu().numpy()  # −1: a cell without a token (ViT-MAE)
    return np.where(positions >= 0, row[positions.clip(0)], np.nan)


def default_query(cap: LayerCapture) -> int:
    """The query a view starts from: the first token (CLS) of a vision tower's input, else the last token."""
    return 0 if cap.layout.grids and "text" not in cap.layout.names else cap.n_tokens - 1


def head_statistics(cap: LayerCapture, head: int) -> dict:
    """One head's statistics on the input: mean entropy (nats), max probability and attention distance over the
    queries, the first token's mean received attention, and `sinks`: the keys receiving ≥ SINK_SHARE on average
    from the queries that see them, where at least SINK_QUERIES do (the last keys of a causal input, seen by a few
    queries, are left out)."""
    q, k, geometry = cap.head(head)
    st = attention_stats(q, k, geometry=geometry,
                         stats=("entropy", "max_prob", "mean_distance", "key_mass", "key_count"))
    received, seen = st.key_mean[0, 0].cpu().numpy(), st.key_count[0].cpu().numpy()
    sinks = (received >= SINK_SHARE) & (seen >= min(SINK_QUERIES, cap.n_tokens))
    return {"entropy": float(st.entropy.mean()), "max_prob": float(st.max_prob.mean()),
            "mean_distance": float(st.mean_distance.mean()), "first_token_mass": float(received[0]),
            "sinks": [int(i) for i in np.flatnonzero(sinks)]}


def head_thumbnails(cap: LayerCapture, max_cells: int = THUMB_CELLS) -> tuple[np.ndarray, int]:
    """Every head's block-pooled map of the whole input: ((H, rows, cols) mean probabilities, block side)."""
    block = -(-cap.n_tokens // max_cells)
    m = pooled_attention(cap.q, cap.k, block_q=block, block_k=block, geometry=cap.geometry)
    return m[0].cpu().numpy(), block


def token_spans(cap: LayerCapture, extra: dict[str, tuple[int, int]] | None = None,
                sinks: Iterable[int] = ()) -> list[tuple[str, int, int]]:
    """The named spans a map draws, (name, start, end) with end exclusive: the layout's segments but text and
    padding (bos, cls, registers, image blocks, …), `extra` spans (e.g. a retrieval sample's needle), and one
    `sink` span per sink token."""
    spans = [(name, a, b) for name in cap.layout.names if name not in PLAIN_SEGMENTS
             for a, b in cap.layout.spans(name)]
    spans += [(name, int(a), int(b)) for name, (a, b) in (extra or {}).items() if 0 <= a < b <= cap.n_tokens]
    return spans + [("sink", i, i + 1) for i in sinks]


def live_inputs(model: Model, prompt: Prompt) -> dict:
    """Model inputs for a typed prompt: its text through the tokenizer (at most LIVE_MAX_TOKENS tokens), its image
    through the processor (ViTs read the image alone; vision-language models the text with the image)."""
    image = Image.open(BytesIO(prompt.image)).convert("RGB") if prompt.image else None
    kind = model.family.kind
    if kind == "vit":
        if image is None:
            raise ValueError(f"{model.name} is a vision transformer: upload an image")
        return fixed_masking(model, model.prepare(images=[image]))
    if not prompt.text.strip():
        raise ValueError("type a prompt first")
    if kind == "lvlm":
        return model.prepare(lvlm_prompt(model, prompt.text, image is not None), images=[image] if image else [])
    return model.prepare(prompt.text, truncation=True, max_length=LIVE_MAX_TOKENS)


def _check_position(i: int, n: int, what: str) -> None:
    if not 0 <= i < n:
        raise ValueError(f"{what} {i} is outside the input's {n} tokens")


def _clip(region: tuple[int, int] | None, n: int) -> tuple[int, int]:
    if region is None:
        return 0, n
    a, b = max(0, int(region[0])), min(n, int(region[1]))
    if a >= b:
        raise ValueError(f"the region [{region[0]}, {region[1]}) holds no token of the input's {n}")
    return a, b


def token_text(tokenizer, token: int) -> str:
    """One token as the text it stands for: a special token by its name (`<s>`, `[CLS]`), a word-initial marker
    (`Ġ`, `▁`) as the space it encodes, bytes (`<0x0A>`) as their character."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if token in tokenizer.all_special_ids:
        return piece
    text = tokenizer.decode([token])
    return " " + text if piece.startswith(("▁", "Ġ")) and not text.startswith(" ") else text


def _token_texts(model: Model, inputs: dict, layout: TokenLayout) -> list[str]:
    """Each position's text (`token_text`) for text, `patch r,c` for image patches, the segment name otherwise."""
    n = layout.segments.shape[1]
    ids = inputs.get("input_ids") if model.family.kind != "vit" else None
    texts = [token_text(model.tokenizer, i) for i in ids[0].tolist()] if ids is not None and ids.shape[1] == n \
        else [layout.names[s] for s in layout.segments[0].tolist()]
    for grid in layout.grids:
        if grid.batch == 0:
            for (r, c), pos in np.ndenumerate(grid.positions.cpu().numpy()):
                if pos >= 0:
                    texts[pos] = f"patch {r},{c}"
    return texts


def _image(model: Model, inputs: dict) -> np.ndarray | None:
    """The first image as the model saw it, (H, W, 3) uint8, undoing the processor's normalisation; None when
    the input has no single (3, H, W) image."""
    pixels = inputs.get("pixel_values")
    if pixels is None or pixels.ndim != 4 or pixels.shape[1] != 3:
        return None
    proc = getattr(model.processor, "image_processor", model.processor)
    mean = np.array(getattr(proc, "image_mean", None) or [0.0, 0.0, 0.0])
    std = np.array(getattr(proc, "image_std", None) or [1.0, 1.0, 1.0])
    img = pixels[0].float().cpu().numpy().transpose(1, 2, 0) * std + mean
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
