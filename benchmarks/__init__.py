"""Benchmarks: runtime_bench (torch-free, numpy only) times a bundle on the target; compare, sd15,
export_cost and chart measure against diffusers and import torch. Never imported by runtime/.

Keep this file free of imports: `python -m benchmarks.runtime_bench` must run where only the
runtime is installed (a Jetson without torch).
"""
