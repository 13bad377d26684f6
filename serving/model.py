"""The Triton Python-backend model of a generated repository (copied there as <model>/1/model.py).

It runs in Triton's Python backend stub, beside a copy of the runtime package and of serving/handler.py (the version folder is put
first on sys.path, so the copy serves, matched to the repository it was written with). One
`runtime.Pipeline` per model instance; serving.handler does the work, this file only speaks Triton.
config.pbtxt parameters: bundle (a path, relative to this folder or absolute), onnx_device (for ONNX
bundles on a GPU instance: cuda | tensorrt), max_prompt_chars, max_steps.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from serving.handler import INPUTS, Handler, Limits  # noqa: E402

pb_utils: Any = importlib.import_module("triton_python_backend_utils")  # the stub provides it: importable inside Triton only


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        bundle = Path(params["bundle"])
        bundle = bundle if bundle.is_absolute() else HERE / bundle
        gpu = args.get("model_instance_kind") == "GPU"
        if gpu:  # one process per instance, CUDA not yet initialised in it: the instance's GPU becomes device 0
            os.environ["CUDA_VISIBLE_DEVICES"] = args.get("model_instance_device_id", "0")
        from runtime import Pipeline

        # the execution provider applies to ONNX bundles; TensorRT bundles (plan files) run on the instance's GPU
        onnx = params.get("backend") == "onnxruntime"
        pipe = Pipeline.load(bundle, device=(params.get("onnx_device", "cuda") if gpu else "cpu") if onnx else None)
        limits = Limits(max_prompt_chars=int(params.get("max_prompt_chars", 2000)), max_steps=int(params.get("max_steps", 200)))
        self.handler = Handler(pipe, limits)

    def execute(self, requests: list[Any]) -> list[Any]:
        inputs = [{name: _input(request, name) for name in INPUTS} for request in requests]
        responses = []
        for answer in self.handler.handle(inputs):
            if answer.error is not None:
                responses.append(pb_utils.InferenceResponse(error=_error(answer.error)))
            else:
                tensors = [pb_utils.Tensor("image", answer.images), pb_utils.Tensor("seed_used", answer.seeds)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.handler.pipe.close()


def _input(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _error(message: str) -> Any:
    """INVALID_ARG (HTTP 400) for a refused request, where this Triton's Python backend has error codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    if message.startswith("generation failed") or code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)
