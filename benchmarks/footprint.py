"""Install footprint: the bytes on disk of a set of installed packages and everything they require."""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import metadata
from typing import Any

from packaging.requirements import Requirement

RUNTIME = ("numpy", "tokenizers", "pillow", "onnxruntime")  # the runtime's dependencies plus its ONNX Runtime extra
DIFFUSERS_TORCH = ("torch", "diffusers", "transformers")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(dist: metadata.Distribution) -> list[str]:
    """Names a distribution requires unconditionally here (extras and other platforms' markers left out)."""
    names = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(canonical(req.name))
    return names


def closure(roots: Iterable[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions ROOTS pull in, transitively; requirements not installed are skipped."""
    found: dict[str, metadata.Distribution] = {}
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[name] = dist
        todo.extend(requirements(dist))
    return found


def installed_bytes(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or []:
        path = f.locate()
        if path.is_file():
            total += path.stat().st_size
    return total


def footprint(roots: Iterable[str]) -> dict[str, Any]:
    """Per-package and total installed bytes of ROOTS and their requirements."""
    sizes = {name: installed_bytes(dist) for name, dist in sorted(closure(roots).items())}
    return {"roots": list(roots), "packages": sizes, "total_bytes": sum(sizes.values())}
