"""MindSpore safetensors: standard safetensors with `__metadata__ = {"format": "ms"}`.

A folder of several complete files is described by `param_name_map.json` (name → file, flat or under
`weight_map`), as MindFormers' unified checkpoints are; MindSpore's unifier also writes non-network values
(`global_step`, optimizer scalars) to `hyper_param.safetensors`, which is no part of the model.
"""

from __future__ import annotations

import json

METADATA = {"format": "ms"}
PARAM_NAME_MAP = "param_name_map.json"
HYPER_PARAM = "hyper_param.safetensors"


def is_ms(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == "ms"


def param_name_map(weight_map: dict[str, str]) -> bytes:
    return json.dumps(weight_map, indent=2).encode() + b"\n"
