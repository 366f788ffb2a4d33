"""Tracing: capture backends that stream per-layer queries, keys, values and head outputs to probes."""

from .capture import AttentionCall, Probe, Recorder, capture

__all__ = ["AttentionCall", "Probe", "Recorder", "capture"]
