"""Bundle-file integrity: every path a manifest names stays inside its bundle, every file is hashed, and what
one load read (BundleState) can be checked again after the engines are open.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import BundleError
from .hints import file_rebuild_hint
from .manifest import Manifest
from .records import MANIFEST

# Size limits per file role, checked by stat before a byte is hashed: a file over its role's limit cannot be a
# file of that role, so hashing it would only spend time. An ONNX graph cannot exceed protobuf's 2 GiB (bigger
# models keep their weights in external data); tokenizer files are a few MB (CLIP's vocab is 1 MB); weights
# (external data, TensorRT plans) stop at 64 GiB, several times the largest UNet in fp32.
MAX_TOKENIZER_FILE = 64 << 20
MAX_ONNX_GRAPH = 2 << 30
MAX_WEIGHTS_FILE = 64 << 30


Identity = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns: which file a path held, and which version


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class BundleState:
    """What one load read: the manifest's bytes and the identity of every file it hashed.

    A `--force` rebuild writes a new folder and renames it into place, so every file of the new build is a
    new inode: if, after the engines are open, the manifest reads the same and every path still holds the
    file that was hashed, the engines came from the build the manifest describes (`current`).
    """

    bundle: Path
    manifest_bytes: bytes
    files: Mapping[str, Identity] = field(default_factory=dict)

    def current(self) -> bool:
        try:
            if (self.bundle / MANIFEST).read_bytes() != self.manifest_bytes:
                return False
            return all(_identity(os.stat(self.bundle / rel)) == ident for rel, ident in self.files.items())
        except OSError:
            return False


def declared_schema(path: Path) -> object:
    """The `schema` a manifest file declares, without checking the rest; None where it is not a readable JSON object."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return raw.get("schema") if isinstance(raw, dict) else None


def load_manifest(bundle: str | Path, *, verify_files: bool = True) -> Manifest:
    """Read BUNDLE/manifest.json and check that every file it lists is present and unaltered."""
    return read_bundle(bundle, verify_files=verify_files)[0]


def read_bundle(bundle: str | Path, *, verify_files: bool = True) -> tuple[Manifest, BundleState]:
    """load_manifest, plus what it read (BundleState), so a loader can check that nothing changed while it opened engines.

    Every path the manifest names is checked to stay inside the bundle before any file is opened.
    """
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"no engine bundle at {bundle}: the folder does not exist; build one with `python -m export.build`")
    if not path.is_file():
        raise BundleError(
            f"{bundle} has no {MANIFEST}: it is not a finished engine bundle (an interrupted build?); "
            "rebuild it with `python -m export.build --force`"
        )
    data = path.read_bytes()
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); rebuild the bundle") from None
    except RecursionError:
        raise BundleError(
            f"{path}: malformed manifest (nested too deeply to read); rebuild the bundle with `python -m export.build --force`"
        ) from None
    manifest = Manifest.from_json(raw, str(path))
    check_bundle_paths(bundle, manifest)
    files: Mapping[str, Identity] = {}
    if verify_files:
        files = verify_bundle_files(bundle, manifest)
    return manifest, BundleState(bundle, data, files)


def _entries(manifest: Manifest) -> list[tuple[str, str]]:
    """Every path the manifest names, with what names it."""
    out = [(f"component {name}'s file", c.file) for name, c in manifest.components.items()]
    out += [(f"component {name}'s ONNX source", c.source_onnx.file) for name, c in manifest.components.items() if c.source_onnx]
    out += [("the tokenizer dir", tok) for tok in manifest.tokenizer_dirs]
    out += [("files entry", rel) for rel in manifest.files]
    return out


def check_bundle_paths(bundle: Path, manifest: Manifest) -> None:
    """The bundle is a boundary: every path the manifest names must resolve inside the bundle folder.

    Refused, naming the entry: absolute paths, '..', a NUL, and symlinks that lead out of the folder.
    """
    root = bundle.resolve()
    for what, rel in _entries(manifest):
        pure = PurePosixPath(rel)
        if not rel or "\x00" in rel or pure.is_absolute() or PureWindowsPath(rel).anchor or ".." in pure.parts:
            raise BundleError(
                f"bundle {bundle}: {what} {rel!r} is not a relative path inside the bundle; "
                "a manifest may name only its own bundle's files: this manifest was altered, rebuild the bundle"
            )
        try:
            resolved = (bundle / rel).resolve()
        except (OSError, RuntimeError) as e:
            raise BundleError(f"bundle {bundle}: {what} {rel!r} cannot be resolved ({e}); rebuild the bundle") from None
        if not resolved.is_relative_to(root):
            raise BundleError(
                f"bundle {bundle}: {what} {rel!r} is a symlink leading outside the bundle; "
                "a bundle may only read its own files: replace the link with the file, or rebuild the bundle"
            )


def _uncovered(bundle: Path, manifest: Manifest) -> tuple[str, str] | None:
    """The first file a component or the tokenizer would read that `files` does not hash, with who reads it."""
    listed = {PurePosixPath(rel).as_posix() for rel in manifest.files}
    needed: list[tuple[str, str]] = []
    folders: list[tuple[str, str]] = []
    for name, c in manifest.components.items():
        for comp in (c, c.source_onnx) if c.source_onnx is not None else (c,):
            needed.append((f"component {name}", comp.file))
            if comp.format == "onnx":  # ONNX external data, as export writes it
                data = f"{comp.file}.data"
                if (bundle / data).exists() or data in listed:
                    needed.append((f"component {name}'s external data", data))
            parent = PurePosixPath(comp.file).parent.as_posix()
            if parent != ".":
                folders.append((f"component {name}'s folder", parent))
    for tok in (PurePosixPath(d).as_posix() for d in manifest.tokenizer_dirs):
        needed += [("the tokenizer", f"{tok}/{name}" if tok != "." else name) for name in ("vocab.json", "merges.txt")]
        folders.append(("the tokenizer folder", tok))
    for who, rel in needed:
        if PurePosixPath(rel).as_posix() not in listed:
            return who, rel
    for who, folder in folders:
        base = bundle / folder
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*")):
            rel = f.relative_to(bundle).as_posix()
            if (f.is_file() or f.is_symlink()) and rel != MANIFEST and rel not in listed:
                return who, rel
    return None


def _size_limit(manifest: Manifest, rel: str) -> tuple[int, str]:
    for tok in (PurePosixPath(d).as_posix() for d in manifest.tokenizer_dirs):
        if tok == "." or PurePosixPath(rel).is_relative_to(tok):
            return MAX_TOKENIZER_FILE, "a tokenizer file"
    if any(c.format == "onnx" and c.file == rel for c in manifest.components.values()):
        return MAX_ONNX_GRAPH, "an ONNX graph (protobuf's limit; larger models keep weights in external data)"
    return MAX_WEIGHTS_FILE, "a bundle file"


def verify_bundle_files(bundle: Path, manifest: Manifest) -> dict[str, Identity]:
    """Every listed file must exist with the recorded sha256: a bundle is content-addressed.

    First, without reading a byte: every file a component or the tokenizer reads must be listed (else it is
    not covered by the hashes), each listed file must be a regular file within its role's size limit.
    Then each file is hashed through one handle; what that handle was (inode, size, mtime) is returned.
    The paths were checked to stay inside the bundle by read_bundle (check_bundle_paths) first.
    """
    gap = _uncovered(bundle, manifest)
    if gap is not None:
        who, rel = gap
        raise BundleError(
            f"bundle {bundle}: {rel} (read by {who}) is not covered by the manifest's hashes; a bundle's files "
            f"must all be listed in its manifest: remove the file or rebuild with `{file_rebuild_hint(bundle, manifest, rel)}`"
        )
    for rel in manifest.files:
        f = bundle / rel
        if not f.is_file():
            raise BundleError(f"bundle {bundle} is missing {rel}; rebuild it with `{file_rebuild_hint(bundle, manifest, rel)}`")
        limit, role = _size_limit(manifest, rel)
        size = f.stat().st_size
        if size > limit:
            raise BundleError(
                f"bundle {bundle}: {rel} is {size} bytes, more than {role} can be ({limit} bytes); "
                f"refused without hashing it: rebuild the bundle with `{file_rebuild_hint(bundle, manifest, rel)}`"
            )
    seen: dict[str, Identity] = {}
    for rel, digest in manifest.files.items():
        f = bundle / rel
        try:
            actual, seen[rel] = _hash_one(f)
        except OSError as e:
            raise BundleError(
                f"bundle {bundle}: {rel} could not be read ({e.strerror or e}); rebuild it with "
                f"`{file_rebuild_hint(bundle, manifest, rel)}`"
            ) from None
        if actual != digest:
            raise BundleError(
                f"bundle {bundle}: {rel} was altered or corrupted (sha256 {actual[:12]}..., manifest says {digest[:12]}...); "
                f"rebuild it with `{file_rebuild_hint(bundle, manifest, rel)}`"
            )
    return seen


def _hash_one(path: Path, chunk: int = 1 << 22) -> tuple[str, Identity]:
    """sha256 of a regular file and the identity of the very file read (fstat of the same handle)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        h = hashlib.sha256()
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest(), _identity(st)


def sha256_file(path: Path) -> str:
    return _hash_one(path)[0]
