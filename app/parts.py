"""Pieces the dashboard's pages share: layout styles, the error box, a sample's label, the zoom region of a map."""

from __future__ import annotations

import math
import os

from dash import html

ROW = {"display": "flex", "gap": "16px", "flexWrap": "wrap", "alignItems": "flex-start"}
ERROR = {"color": "#a61b1b", "background": "#fdecea", "padding": "8px 12px", "borderRadius": "4px"}


def error_box(message: str):
    return html.Div(message, className="error", style=ERROR)


SAMPLE_TEXT = 70  # characters of a sample's text in the sample picker


def sample_label(i: int, entry: dict) -> str:
    """A planned sample in a few words: its short scalar fields, then its text, truncated (a question, a text; a batch
    of prompts: how many and the first; an image: its file name)."""
    parts = [f"{k} {v}" for k, v in entry.items()
             if isinstance(v, (int, float)) or (isinstance(v, str) and len(v) <= 20)][:4]
    text = next((entry[k] for k in ("question", "text", "prompt") if isinstance(entry.get(k), str) and len(entry[k]) > 20),
                None)
    prompts = entry.get("prompts")
    if text is None and isinstance(prompts, list) and prompts and isinstance(prompts[0], dict):
        text = f"{len(prompts)} prompts: {prompts[0].get('clean', '')}"
    if text is None and isinstance(entry.get("image"), str) and len(entry["image"]) > 20:
        text = os.path.basename(entry["image"])
    if text is not None:
        text = " ".join(text.split())
        parts.append(text if len(text) <= SAMPLE_TEXT else text[:SAMPLE_TEXT - 1] + "…")
    return f"{i}: " + ", ".join(parts)


def zoom_region(relayout: dict | None, region: dict | None) -> dict | None:
    """The token region a zoom box (plotly relayoutData) asks for: {"q": [q0, q1], "k": [k0, k1]}, None for the
    whole input (double-click), the current region for anything else."""
    if not relayout:
        return region
    if relayout.get("xaxis.autorange") or relayout.get("yaxis.autorange"):
        return None
    new = {key: list(value) for key, value in (region or {}).items()}
    for axis, key in (("xaxis", "k"), ("yaxis", "q")):
        lo, hi = relayout.get(f"{axis}.range[0]"), relayout.get(f"{axis}.range[1]")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi)):
            continue  # absent, or not a finite number (a crafted request: NaN, Infinity, text)
        if lo is not None and hi is not None:  # token i spans [i − 0.5, i + 0.5]
            lo, hi = sorted((lo, hi))
            new[key] = [max(0, math.floor(lo + 0.5)), math.ceil(hi + 0.5)]
    if "q" not in new or "k" not in new:
        return region
    return new
