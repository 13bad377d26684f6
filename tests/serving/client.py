"""Run in the serving environment (`.venv-triton/bin/python -m tests.serving.client JOB.json OUT.npz`): send a test's requests.

JOB: {"protocol": "http"|"grpc", "url": "host:port", "concurrent": bool, "requests": [[name, triton dtype, value], ...] per request,
"stats": bool}. OUT.npz holds image_<i> for each answered request, and a JSON string under "report": each request's error
(or null) and, with stats, Triton's executions by batch size. tritonclient lives in the serving environment only
(its dependencies would change packages of the main one), hence this separate process.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from benchmarks.triton_load import batch_histogram, client_module, infer, raw_input

NUMPY = {"BYTES": object, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32}


def inputs(protocol: str, spec: list[list[Any]]) -> list[Any]:
    module = client_module(protocol)
    out = []
    for name, dtype, value in spec:
        array = np.array([[value.encode() if isinstance(value, str) else value]], dtype=NUMPY[dtype])
        out.append(raw_input(module, name, array, dtype))
    return out


def main(job_path: str, out_path: str) -> None:
    job = json.loads(open(job_path).read())
    protocol, url = job["protocol"], job["url"]

    def send(spec: list[list[Any]]) -> Any:
        return infer(protocol, url, inputs(protocol, spec))

    if job.get("concurrent"):
        with ThreadPoolExecutor(max_workers=len(job["requests"])) as pool:
            results = list(pool.map(send, job["requests"]))
    else:
        results = [send(spec) for spec in job["requests"]]
    report: dict[str, Any] = {"errors": [r.error for r in results]}
    if job.get("stats"):
        report["batches"] = batch_histogram(protocol, url)
    images = {f"image_{i}": r.image for i, r in enumerate(results) if r.image is not None}
    np.savez(out_path, report=np.array(json.dumps(report)), **images)


if __name__ == "__main__":
    main(*sys.argv[1:3])
