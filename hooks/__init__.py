"""Tracing: capture backends that stream per-layer queries, keys, values and head outputs to probes."""

from .backends import BACKENDS, generate, trace
from .capture import KNOCKOUT_MODES, AttentionCall, Probe, Recorder, capture, capture_residual, mask_heads
from .patching import (RunCache, activation_patch, cache_run, edge_attribution, patch_heads, patching_effects,
                       path_patch)
from .shared import Pass, alone, run_passes
from .var import VAR, phi, redistribute_visual_attention, sink_dimensions

__all__ = ["BACKENDS", "KNOCKOUT_MODES", "VAR", "AttentionCall", "Pass", "Probe", "Recorder", "RunCache", "activation_patch", "alone",
           "cache_run", "capture", "capture_residual", "edge_attribution", "generate", "mask_heads", "patch_heads", "patching_effects", "path_patch", "phi",
           "redistribute_visual_attention", "run_passes", "sink_dimensions", "trace"]
