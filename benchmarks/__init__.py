"""Benchmarks against other pipelines (imports torch and diffusers; never imported by runtime/)."""
