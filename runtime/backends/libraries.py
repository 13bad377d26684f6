"""The two TensorRT libraries behind one API: NVIDIA TensorRT (`tensorrt`) and TensorRT for RTX (`tensorrt_rtx`).

TensorRT for RTX has TensorRT's Python API (Builder, OnnxParser, Runtime, execute_async_v3) under another
module name. Its builder needs no GPU: it compiles ahead of time for a set of compute capabilities, and the
engine is finished for the GPU at hand when it is loaded (just in time, kept in a runtime cache). Classic
TensorRT builds and tunes on the GPU the engine will run on. A manifest records which one built an engine
(`library`), and everything that imports TensorRT asks this module for the right one.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from ..errors import BundleError


class TensorRTMissing(BundleError):
    """TensorRT (or cuda-python) is not installed: the TensorRT path is refused, never replaced by another backend."""


@dataclass(frozen=True)
class Library:
    """One TensorRT library: its --backend name, its module, what to install, and whether it builds without a GPU."""

    key: str  # tensorrt | tensorrt-rtx: the --backend name, and what a manifest records as `library`
    module: str  # tensorrt | tensorrt_rtx
    title: str  # TensorRT | TensorRT for RTX: how messages name it
    install: str  # how to install it, as a message's tail
    ahead_of_time: bool  # builds without a GPU, for target compute capabilities; finished for the GPU at load

    def load(self) -> ModuleType:
        """The library's Python module (import on first use: it loads CUDA libraries)."""
        return importlib.import_module(self.module)

    def installed(self) -> bool:
        """Is the module really installed (not just tensorrt-stubs' namespace folder of .pyi files)? Asks without importing."""
        return _installed(self.module)


TENSORRT = Library(
    "tensorrt",
    "tensorrt",
    "TensorRT",
    "install TensorRT's Python package and cuda-python: `pip install tensorrt cuda-python` on a desktop "
    "(CUDA 12), or on a Jetson the JetPack 6 TensorRT packages (python3-libnvinfer) plus `pip install cuda-python`",
    ahead_of_time=False,
)
TENSORRT_RTX = Library(
    "tensorrt-rtx",
    "tensorrt_rtx",
    "TensorRT for RTX",
    "install it with `pip install tensorrt-rtx-cu13 cuda-python` (or `pip install 'ldm-deploy[tensorrt-rtx]'`)",
    ahead_of_time=True,
)
LIBRARIES = {lib.key: lib for lib in (TENSORRT, TENSORRT_RTX)}
CUDART = ("cuda-python >= 12.6 (cuda.bindings)", "cuda.bindings.runtime")


def library(key: str | None) -> Library:
    """The library a manifest names (None: classic TensorRT, which every bundle before TensorRT for RTX used)."""
    if key is None:
        return TENSORRT
    if key not in LIBRARIES:
        raise BundleError(f"unknown TensorRT library {key!r} in the manifest: this runtime knows {', '.join(LIBRARIES)}")
    return LIBRARIES[key]


def _installed(module: str) -> bool:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # find_spec imports the parent package (`cuda` for cuda.bindings)
        return False
    return spec is not None and spec.origin is not None


def importable(module: str) -> bool:
    """Does `module` import as code? tensorrt-stubs' folder of .pyi files imports too, as a namespace package (no origin)."""
    try:
        imported = importlib.import_module(module)
    except ImportError:  # absent, or installed with libraries that do not load
        return False
    spec = imported.__spec__
    return spec is None or spec.origin is not None  # None: a module made at runtime (the tests' stand-ins)


def require(lib: Library, what: str, *, cuda: bool = True, instead: str = "") -> None:
    """Raise TensorRTMissing, naming what is missing and how to install it, unless the library (and cudart) import.

    what: the task, as the message's subject; cuda: cuda-python is needed too (running, or building on a GPU);
    instead: an alternative to offer.
    """
    packages = [(lib.title, lib.module), *([CUDART] if cuda else [])]
    missing = [name for name, module in packages if not importable(module)]
    if not missing:
        return
    needs = f"{lib.title} and cuda-python" if cuda else lib.title
    which = "which are not installed here" if len(missing) == len(packages) else f"and {missing[0]} is not installed here"
    if not cuda:
        which = "which is not installed here"
    raise TensorRTMissing(f"{what} needs {needs}, {which}: {lib.install}" + (f"; {instead}" if instead else ""))
