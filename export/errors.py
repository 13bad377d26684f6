"""The exporter's refusal of a model folder: one class, raised before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ModelError(ValueError):
    """The model folder is missing, incomplete, of another family, or not loadable as asked."""


def read_json_object(path: Path) -> dict[str, Any]:
    """A model folder's JSON file as a dict; a broken one is a ModelError naming the file, not a traceback."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e}); restore the file from the model's source") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path} holds a JSON {type(value).__name__}, not an object; restore the file from the model's source")
    return value
