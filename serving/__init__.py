"""Serving engine bundles from NVIDIA Triton Inference Server (Python backend): a layer on top of the runtime.

- handler: what one `execute` call does with a batch of requests (validate each, group the ones that can
  share a UNet batch, run them through `runtime.Pipeline`, answer each); pure numpy, testable without Triton.
- model: the TritonPythonModel that the generated repository runs (a thin shell around handler).
- repository: writes the model repository (config.pbtxt, model.py, a copy of the runtime and of handler.py, the bundle).
- serve: the local launcher (a tritonserver process, its signals and shared memory).

`python -m serving.write_repository BUNDLE --out DIR` writes a repository; `python -m serving BUNDLE` serves one locally.
Nothing here is imported by runtime/ or export/.
"""
