"""ONNX Runtime backend: CPU, CUDA or TensorRT execution provider behind the engine protocol."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from ..bundle import Component
from ..errors import BundleError
from ..protocol import check_feed

Spin = Literal["always", "in-run", "never"]
# What the idle intra-op workers do: spin between runs (the next run is this session's), spin only within a run
# (the next is often another session's, whose workers need the cores), or sleep (one run per image).
SPIN: tuple[Spin, ...] = get_args(Spin)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BundleError(
            "this bundle needs ONNX Runtime, which is not installed: `pip install onnxruntime` "
            "(or onnxruntime-gpu for the CUDA and TensorRT execution providers)"
        ) from None
    return onnxruntime


def resolve_providers(device: str | None) -> list[str]:
    """'cpu' | 'cuda' | 'tensorrt' -> provider list; None takes CUDA where installed, else CPU."""
    ort = _import_ort()
    available = ort.get_available_providers()
    if device is None:
        device = "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if device not in PROVIDERS:
        raise ValueError(f"unknown ONNX Runtime device {device!r}; choose one of {sorted(PROVIDERS)}")
    wanted = PROVIDERS[device]
    if wanted not in available:
        raise BundleError(
            f"ONNX Runtime here has no {wanted} (available: {', '.join(available)}); "
            "install onnxruntime-gpu for cuda/tensorrt, or choose device 'cpu'"
        )
    return [wanted] if device == "cpu" else [wanted, PROVIDERS["cpu"]]


class OrtEngine:
    """One InferenceSession, created once; each call checks the feed against the manifest.

    A component with a stepped input (the UNet's context on a bundle built for prompts of several chunks) gets one
    session per length, each with that length fixed (a free-dimension override), so ONNX Runtime optimizes it as the
    static graph it then is: a one-chunk prompt runs exactly the computation of a one-chunk bundle, bit for bit.
    The one-step session stays open; a longer length opens its own session, which the next other length replaces.
    """

    def __init__(
        self, component: Component, path: Path, device: str | None = None, threads: int | None = None, spin: Spin = "always"
    ):
        if spin not in SPIN:
            raise ValueError(f"spin={spin!r}: choose one of {', '.join(SPIN)}")
        self.component = component
        self.providers = resolve_providers(device)
        self._path, self._threads, self._spin = path, threads, spin
        self._stepped = [t for t in component.inputs if t.steps]
        # export.build names a stepped axis INPUT_AXIS; one step: the shortest length
        self._axes = {f"{t.name}_{a}": s for t in self._stepped for a, s in enumerate(t.steps) if s}
        self._sizes = tuple(self._axes.values())
        self.session: Any = self._open(self._sizes)
        self._longer: tuple[tuple[int, ...], Any] | None = None  # the session of the last longer length
        self._output_names: Sequence[str] = [t.name for t in component.outputs]

    def _open(self, sizes: tuple[int, ...]) -> Any:
        """A session, each stepped axis fixed at its size in `sizes`."""
        ort = _import_ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self._threads:
            options.intra_op_num_threads = self._threads
        if self._spin == "never":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif self._spin == "in-run":
            options.add_session_config_entry("session.force_spinning_stop", "1")
        for name, size in zip(self._axes, sizes):
            options.add_free_dimension_override_by_name(name, size)
        try:
            session = ort.InferenceSession(str(self._path), options, providers=self.providers)
        except Exception as e:  # ORT raises its own untyped errors for unreadable models
            raise BundleError(f"{self.component.name}: ONNX Runtime could not load {self._path}: {e}") from None
        dynamic = [i.name for i in session.get_inputs() if self._axes and any(not isinstance(d, int) for d in i.shape)]
        if dynamic:
            raise BundleError(
                f"{self.component.name}: {self._path} has dynamic axes on {', '.join(dynamic)} not named as export.build names "
                f"them ({', '.join(self._axes)}); rebuild the bundle"
            )
        return session

    def _session_for(self, feed: Mapping[str, np.ndarray]) -> Any:
        sizes = tuple(int(feed[t.name].shape[a]) for t in self._stepped for a, s in enumerate(t.steps) if s)
        if sizes == self._sizes:
            return self.session
        if self._longer is None or self._longer[0] != sizes:
            self._longer = None  # the old one's memory goes before the new one's arrives
            self._longer = (sizes, self._open(sizes))
        return self._longer[1]

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.component, feed)
        if self.session is None:
            raise BundleError(f"{self.component.name}: this ONNX Runtime engine was closed; load the bundle again")
        session = self._session_for(feed) if self._stepped else self.session
        values = session.run(self._output_names, dict(feed))
        return dict(zip(self._output_names, values))

    def close(self) -> None:
        """Drop the session: its weights and activation arena are freed now, not whenever the garbage collector
        breaks a reference cycle (SD 1.5's pipeline held 9 GB past its with-block until gc ran). Safe to call twice."""
        self.session = None
        self._longer = None

