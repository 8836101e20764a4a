"""Converters: source models to per-device artifacts (installed as edge_runtime.converters)."""
