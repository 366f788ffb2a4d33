"""Tracing: capture backends that stream per-layer queries, keys, values and head outputs to probes."""

from .backends import BACKENDS, generate, trace
from .capture import AttentionCall, Probe, Recorder, capture

__all__ = ["BACKENDS", "AttentionCall", "Probe", "Recorder", "capture", "generate", "trace"]
