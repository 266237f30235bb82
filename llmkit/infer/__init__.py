"""Inference: generation, sampling, streaming."""
