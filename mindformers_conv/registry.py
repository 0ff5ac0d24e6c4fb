"""The model registry: `register(spec)` in a model's declaration fills convert_map / reversed_convert_map.

Built-in families live in `models/<family>/declaration.py`; other packages add theirs through the
`mindformers_conv.models` entry-point group (each entry point names a module that registers on import).
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from .errors import BadInput, UsageError
from .mapping import ModelSpec
from .plan import match_rule

MODELS: dict[str, ModelSpec] = {}
ENTRY_POINT_GROUP = "mindformers_conv.models"
_loaded = False


def register(spec: ModelSpec) -> ModelSpec:
    if spec.key in MODELS and MODELS[spec.key] is not spec:
        raise ValueError(f"model key {spec.key!r} is registered twice")
    MODELS[spec.key] = spec
    return spec


def load_models() -> dict[str, ModelSpec]:
    """Import every built-in declaration and every plugin once; returns the registry."""
    global _loaded
    if not _loaded:
        _loaded = True
        import models

        for info in pkgutil.iter_modules(models.__path__):
            if info.ispkg:
                importlib.import_module(f"models.{info.name}.declaration")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            importlib.import_module(ep.value)
    return MODELS


def get(key: str) -> ModelSpec:
    models = load_models()
    if key not in models:
        raise UsageError(f"unknown --model {key!r}; known: {', '.join(sorted(models))} (or auto)")
    return models[key]


def detect(cfg: dict, names: list[str], reverse: bool) -> tuple[ModelSpec, str]:
    """--model auto: from config.json (model_type, then architectures), else from the tensor names."""
    models = load_models()
    model_type = cfg.get("model_type")
    by_type = [m for m in models.values() if model_type in m.model_types]
    if not by_type:
        archs = cfg.get("architectures") or []
        by_type = [m for m in models.values() if set(archs) & set(m.architectures)]
    if by_type:
        evidence = f"config.json model_type {model_type!r}" if model_type else "config.json architectures"
        return _one(by_type, evidence), evidence
    fits = [m for m in models.values() if all(match_rule(m.all_rules(cfg), n, reverse) for n in names)]
    if not fits:
        raise BadInput("--model auto: no registered model knows these tensor names; pass --model")
    return _one(fits, "the tensor names"), "the tensor names"


def _one(candidates: list[ModelSpec], evidence: str) -> ModelSpec:
    """Variants that reuse one declaration are the same conversion: pick the family they share."""
    if len(candidates) == 1:
        return candidates[0]
    families = {m.family or m.key for m in candidates}
    if len(families) > 1:
        raise BadInput(f"--model auto: {evidence} fit {', '.join(sorted(families))}; pass --model")
    family = families.pop()
    return load_models().get(family) or candidates[0]
