"""Serving a bundle from NVIDIA Triton Inference Server (Python backend).

- handler: what one `execute` call does with a batch of requests (validate each, group the ones that can
  share a UNet batch, run them through `runtime.Pipeline`, answer each); pure numpy, testable without Triton.
- model: the TritonPythonModel that the generated repository runs (a thin shell around handler).
- repository: writes the model repository (config.pbtxt, model.py, a copy of this runtime, the bundle).

`python -m export.triton` writes a repository; `python -m runtime.serve` starts a local Triton on one.
"""
