"""Where TensorRT for RTX keeps the kernels it compiles for this GPU at load, so the second load skips compiling.

A TensorRT-for-RTX engine is built ahead of time for a set of compute capabilities and finished just in
time for the GPU it lands on. What that compiles goes into a runtime cache, one file per engine and GPU:

    $LDM_DEPLOY_RUNTIME_CACHE/<gpu>-sm<cc>-<library version>/<engine sha256, 16 hex>.cache
    (default folder: $XDG_CACHE_HOME/ldm-deploy/tensorrt-rtx, else ~/.cache/ldm-deploy/tensorrt-rtx)

One file per engine rather than one per GPU: several engines load in one process (and several processes
share a machine), and a shared file would be overwritten by whichever saved last. The files are written
atomically (temporary file, then rename); a damaged one is ignored and rewritten.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..bundle.fit import Device

ENV = "LDM_DEPLOY_RUNTIME_CACHE"


def cache_root() -> Path:
    """The runtime caches' folder: $LDM_DEPLOY_RUNTIME_CACHE, else the user's cache folder."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ldm-deploy" / "tensorrt-rtx"


def cache_file(device: Device, engine_sha256: str, root: Path | None = None) -> Path:
    """The runtime cache of one engine on one GPU model and library version."""
    return (root or cache_root()) / device.key / f"{engine_sha256[:16]}.cache"


def read(path: Path) -> bytes:
    """The cache's bytes, or b"" when there is none yet (or it cannot be read: it is then rebuilt)."""
    try:
        return path.read_bytes()
    except OSError:
        return b""


def write(path: Path, data: bytes) -> None:
    """Write atomically, so a concurrent load never reads half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
