"""manifest.json as strict JSON with its own digest: written by export, checked before the manifest is parsed.

Python's json reads and writes NaN and Infinity, which RFC 8259 (and every strict parser) refuses: we never write them
and refuse them on reading. `manifest_sha256` is the sha256 of the manifest's other keys, serialised canonically: it
catches a hand edit or a damaged copy of the manifest itself, as the file hashes catch them in the engines. A checksum,
not a signature (manifests written before it carry none; their values are still bounded by Manifest.from_json).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import BundleError

DIGEST = "manifest_sha256"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:40]} is past float's range")
    return value


def strict_json(data: bytes) -> Any:
    """JSON as RFC 8259 has it: NaN, Infinity and -Infinity are refused (Python's json reads them by default), and so is
    a number that only parses to infinity (1e400)."""
    return json.loads(data.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)


def dumps(doc: Any, **options: Any) -> str:
    """json.dumps that refuses NaN and infinities (ValueError) instead of writing JSON no strict parser reads."""
    return json.dumps(doc, allow_nan=False, **options)


def manifest_digest(doc: Mapping[str, Any]) -> str:
    """sha256 of the manifest without its digest key, serialised canonically (sorted keys, no spaces)."""
    body = {k: v for k, v in doc.items() if k != DIGEST}
    return hashlib.sha256(dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest document with its digest, as export writes it."""
    return {**doc, DIGEST: manifest_digest(doc)}


def parse_manifest(data: bytes, path: Path) -> Any:
    """manifest.json's bytes -> its document: strict JSON, and its digest (where recorded) matching its content."""
    try:
        raw = strict_json(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); rebuild the bundle with `python -m export.build --force`") from None
    except RecursionError:
        raise BundleError(
            f"{path}: malformed manifest (nested too deeply to read); rebuild the bundle with `python -m export.build --force`"
        ) from None
    if isinstance(raw, dict) and DIGEST in raw and raw[DIGEST] != manifest_digest(raw):
        raise BundleError(
            f"{path} was altered after export (its content does not match its {DIGEST}); a bundle's manifest is written once, "
            "by export: rebuild the bundle with `python -m export.build --force`"
        )
    return raw
