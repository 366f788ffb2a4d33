"""Tracing: capture backends that stream per-layer queries, keys, values and head outputs to probes."""

from .backends import BACKENDS, generate, trace
from .capture import KNOCKOUT_MODES, AttentionCall, Probe, Recorder, capture, capture_residual, mask_heads
from .var import VAR, phi, redistribute_visual_attention, sink_dimensions

__all__ = ["BACKENDS", "KNOCKOUT_MODES", "VAR", "AttentionCall", "Probe", "Recorder", "capture", "capture_residual",
           "generate", "mask_heads", "phi", "redistribute_visual_attention", "sink_dimensions", "trace"]
