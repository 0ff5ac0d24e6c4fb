"""The model registry: `register(spec)` in a model's declaration fills convert_map / reversed_convert_map.

Built-in families live in `models/<family>/declaration.py`; other packages add theirs through the
`mindformers_conv.models` entry-point group (each entry point names a module that registers on import).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

from .errors import BadInput, UsageError
from .mapping import ModelSpec
from .plan import match_rule

MODELS: dict[str, ModelSpec] = {}
MEGATRON: dict[str, ModelSpec] = {}  # family key → its Megatron declaration (spec.megatron is the layout)
ENTRY_POINT_GROUP = "mindformers_conv.models"
_loaded = False


def register(spec: ModelSpec) -> ModelSpec:
    if spec.key in MODELS and MODELS[spec.key] is not spec:
        raise ValueError(f"model key {spec.key!r} is registered twice")
    MODELS[spec.key] = spec
    return spec


def register_megatron(spec: ModelSpec) -> ModelSpec:
    """A family's HF ↔ Megatron declaration (models/<family>/megatron.py), used with --target megatron."""
    if spec.megatron is None:
        raise ValueError(f"{spec.key}: a Megatron declaration needs its MegatronLayout")
    if spec.key in MEGATRON and MEGATRON[spec.key] is not spec:
        raise ValueError(f"Megatron model key {spec.key!r} is registered twice")
    MEGATRON[spec.key] = spec
    return spec


def load_models() -> dict[str, ModelSpec]:
    """Import every built-in declaration and every plugin once; returns the registry."""
    global _loaded
    if not _loaded:
        _loaded = True
        import models
        from importlib.metadata import entry_points

        for info in pkgutil.iter_modules(models.__path__):
            if info.ispkg:
                _import_family(info.name)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            importlib.import_module(ep.value)
    return MODELS


def _import_family(family: str) -> None:
    """models/<family>/'s declarations (declaration.py, and megatron.py: its Megatron declaration)."""
    for module in ("declaration", "megatron"):
        if importlib.util.find_spec(f"models.{family}.{module}"):
            importlib.import_module(f"models.{family}.{module}")


def get(key: str) -> ModelSpec:
    """A key's declaration: its own folder's when models/<key>/ declares it (start-up imports one family),
    else found among them all and the plugins."""
    if key not in MODELS and key.isidentifier() and importlib.util.find_spec(f"models.{key}"):
        _import_family(key)
    models = MODELS if key in MODELS else load_models()
    if key not in models:
        raise UsageError(f"unknown --model {key!r}; known: {', '.join(sorted(models))} (or auto)")
    return models[key]


def get_megatron(key: str) -> ModelSpec:
    """The Megatron declaration of a key (a variant such as yi uses its family's)."""
    models = load_models()
    family = (models[key].family or key) if key in models else key
    if family not in MEGATRON:
        raise UsageError(f"no Megatron layout for --model {key!r}; known: {', '.join(sorted(MEGATRON))}")
    return MEGATRON[family]


def detect_megatron(cfg: dict) -> tuple[ModelSpec, str]:
    """--model auto for Megatron conversions: config.json's model_type or architectures."""
    load_models()
    archs = set(cfg.get("architectures") or [])
    fits = [m for m in MEGATRON.values() if cfg.get("model_type") in m.model_types or archs & set(m.architectures)]
    if len(fits) != 1:
        raise BadInput("--model auto: config.json does not name one model with a Megatron layout; pass --model "
                       "(and --config_path for a Megatron input)")
    return fits[0], "config.json"


def detect(cfg: dict, names: list[str], reverse: bool) -> tuple[ModelSpec, str]:
    """--model auto: from config.json (model_type, then architectures), else from the tensor names."""
    models = list(load_models().values())
    by_config, evidence = _by_config(models, cfg)
    fitting = _by_names(by_config, cfg, names, reverse)
    if fitting:
        if len({m.family or m.key for m in by_config}) == 1:
            return _one(by_config, evidence), evidence
        evidence = f"{evidence} and the tensor names"  # e.g. model_type "chatglm": ChatGLM-6B and GLM2-4
        return _one(fitting, evidence), evidence
    fits = _by_names([m for m in models if m not in by_config], cfg, names, reverse)
    if by_config and not fits:
        return _one(by_config, evidence), evidence  # the plan then names the tensor it does not know
    evidence = "the tensor names" + (f" ({evidence} names a layout they do not fit)" if by_config else "")
    if not fits:
        raise BadInput("--model auto: no registered model knows these tensor names; pass --model")
    return _one(fits, evidence), evidence


def resolve(spec: ModelSpec, cfg: dict, names: list[str], reverse: bool) -> tuple[ModelSpec, str | None]:
    """A key that covers others (`qwen` → Qwen1.5/Qwen2) picks the layout the input has; says why."""
    if not spec.covers:
        return spec, None
    candidates = [spec, *(get(key) for key in spec.covers)]
    by_config, evidence = _by_config(candidates, cfg)
    if not by_config:
        by_config, evidence = _by_names(candidates, cfg, names, reverse), "the tensor names"
    if not by_config or any(m is spec for m in by_config):
        return spec, None
    picked = _one(by_config, evidence)
    return picked, f"--model {spec.key}: {picked.key} layout (from {evidence})"


def _by_config(models: list[ModelSpec], cfg: dict) -> tuple[list[ModelSpec], str]:
    model_type = cfg.get("model_type")
    found = [m for m in models if model_type in m.model_types]
    if found:
        return found, f"config.json model_type {model_type!r}"
    archs = set(cfg.get("architectures") or [])
    return [m for m in models if archs & set(m.architectures)], "config.json architectures"


def _by_names(models: list[ModelSpec], cfg: dict, names: list[str], reverse: bool) -> list[ModelSpec]:
    return [m for m in models if _knows(m.all_rules(cfg), names, reverse)]


def _knows(rules, names: list[str], reverse: bool) -> bool:
    return all(match_rule(rules, n, reverse) for n in names)


def _one(candidates: list[ModelSpec], evidence: str) -> ModelSpec:
    """Variants that reuse one declaration are the same conversion: pick the family they share.

    A key whose MindSpore names are another candidate's (`ms_names_of`) yields to it: from those names
    alone the other key is the plain reading (baichuan's fused W_pack needs config.json to be chosen).
    """
    if len(candidates) == 1:
        return candidates[0]
    keys = {m.key for m in candidates}
    candidates = [m for m in candidates if m.ms_names_of not in keys] or candidates
    families = {m.family or m.key for m in candidates}
    if len(families) > 1:
        raise BadInput(f"--model auto: {evidence} fit {', '.join(sorted(families))}; pass --model")
    family = families.pop()
    return load_models().get(family) or candidates[0]
