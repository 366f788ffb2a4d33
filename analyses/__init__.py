"""Analyses: one module per method (retrieval, vhd, sinks, circuits, taxonomy, vit)."""
