"""Fixtures for the samples' tests: the reference model's default bundle, built once into a temporary folder."""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.samples.common import SAMPLES


def import_sample(name: str) -> ModuleType:
    """A sample (or _common) as a module, imported from samples/ as the scripts import each other."""
    if str(SAMPLES) not in sys.path:
        sys.path.append(str(SAMPLES))  # last: a sample's module name never hides an installed one
        importlib.invalidate_caches()
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def sample_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `python -m export.build` with no arguments builds (reference model, fp16, ONNX Runtime), built by the
    samples' own first-use path (_common.build_reference), into a temporary folder: the tests neither need nor touch engines/."""
    out = tmp_path_factory.mktemp("samples") / "shapes-ldm-64x64-b1-fp16-onnxruntime"
    with contextlib.redirect_stderr(io.StringIO()):
        import_sample("_common").build_reference(out)
    return out


@pytest.fixture(scope="session")
def sample_pipe(sample_bundle: Path):
    """The runtime's own pipeline on the same bundle: what the samples' images are compared with."""
    import runtime

    return runtime.Pipeline.load(sample_bundle)


@pytest.fixture
def sample():
    """import_sample, for tests that call a sample's main() in-process."""
    return import_sample
