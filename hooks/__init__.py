"""Tracing: capture backends that stream per-layer queries, keys, values and head outputs to probes."""

from .backends import BACKENDS, generate, trace
from .capture import KNOCKOUT_MODES, AttentionCall, Probe, Recorder, capture, mask_heads

__all__ = ["BACKENDS", "KNOCKOUT_MODES", "AttentionCall", "Probe", "Recorder", "capture", "generate", "mask_heads", "trace"]
