"""Small JSON files beside checkpoints (config.json, adapter_config.json), read with a one-line error."""

from __future__ import annotations

from pathlib import Path

from .errors import BadInput


def read_object(path: Path) -> dict:
    """The JSON object in `path`; BadInput when the file is not valid JSON or not an object."""
    import json

    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise BadInput(f"{path}: not a JSON object")
    return value
