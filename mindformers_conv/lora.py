"""LoRA around the mapping: PEFT adapter names, folding an adapter into its base weights, adapter_config.json.

The renames themselves are rules (`mapping.lora_rules`); this module handles what is not a rename.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


from .dtypes import DType
from .errors import BadInput, UsageError
from .jsonfile import read_object
from .mapping import LORA_STYLES
from .tensor_ref import Shape, TensorRef
from .lazy import torch

PEFT_PREFIX = "base_model.model."
ADAPTER_FOLDER = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
HF_LORA = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight\Z")
MS_LORA = re.compile(rf"(?P<module>.+)\.(?:{'|'.join(LORA_STYLES)})_(?P<ab>[ab])\Z")


def is_hf_lora(name: str) -> bool:
    return HF_LORA.match(name) is not None


def from_peft(refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """PEFT adapter names (`base_model.model.….lora_A[.default].weight`) → the plain `….lora_A.weight`."""

    def plain(name: str) -> str:
        name = name.removeprefix(PEFT_PREFIX)
        m = HF_LORA.match(name)
        return f"{m['module']}.lora_{m['ab']}.weight" if m else name

    if not any(n.startswith(PEFT_PREFIX) or ".default." in n for n in refs):
        return refs
    return {plain(n): r.renamed(plain(n)) for n, r in refs.items()}


def merge(refs: dict[str, TensorRef], alpha: float | None) -> dict[str, TensorRef]:
    """Fold every LoRA pair into its base weight: W + (alpha / r) · B·A in fp32, stored in W's dtype.

    Works on either side's names (`X.lora_A.weight` + `X.weight`, or `X.{style}_a` + `X.weight`); the
    merged weight replaces the base one and the pair leaves the input.
    """
    pairs: dict[str, dict[str, TensorRef]] = {}
    for name, ref in refs.items():
        m = HF_LORA.match(name) or MS_LORA.match(name)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"].lower()] = ref
    if not pairs:
        raise BadInput("--merge_lora: the input has no LoRA parameters")
    if alpha is None:
        raise UsageError("--merge_lora needs --lora_alpha (the scale is lora_alpha / r)")
    merged = dict(refs)
    for module, pair in pairs.items():
        base = refs.get(f"{module}.weight")
        if base is None or set(pair) != {"a", "b"}:
            raise BadInput(f"--merge_lora: LoRA of {module!r} lacks its {'base weight' if base is None else 'A or B'}")
        a, b = pair["a"], pair["b"]
        if a.shape[0] != b.shape[-1] or (b.shape[0], a.shape[-1]) != tuple(base.shape):
            raise BadInput(f"--merge_lora: {module!r}: A {a.shape} and B {b.shape} do not fit weight {base.shape}")
        merged[base.name] = TensorRef(base.name, base.dtype, base.shape,
                                      loader=_merged(base, a, b, alpha / a.shape[0]))
        del merged[a.name], merged[b.name]
    return merged


def _merged(base: TensorRef, a: TensorRef, b: TensorRef, scale: float):
    def load() -> torch.Tensor:
        delta = b.read().float() @ a.read().float()
        return (base.read().float() + scale * delta).to(base.dtype.torch)

    return load


def module_renames(rules) -> dict[str, str]:
    """HF module names → MindFormers' (`q_proj` → `wq`), read off a model's LoRA rules."""
    renames = {}
    for rule in rules:
        if len(rule.hf) == len(rule.ms) == 1 and rule.hf[0].text.endswith(".lora_A.weight"):
            renames[rule.hf[0].text.split(".")[-3]] = rule.ms[0].text.split(".")[-2]
    return renames


def read_adapter_config(folder: Path) -> dict | None:
    """The adapter_config.json beside an input, if there is one."""
    path = folder / ADAPTER_CONFIG
    return read_object(path) if path.is_file() else None


def adapter_config(tensors: list[tuple[str, DType, Shape]], alpha: float | None, base: dict | None = None,
                   renames: dict[str, str] | None = None) -> bytes:
    """A PEFT `adapter_config.json` for LoRA tensors (HF name, dtype, shape): `r` from an A's rows, the
    adapted modules (HF names, or `renames` of them).

    `base`: the input's adapter_config.json, whose other settings are kept; `lora_alpha` only when known.
    """
    rank = next(shape[0] for name, _, shape in tensors if ".lora_A." in name)
    modules = sorted({(renames or {}).get(m, m) for m in (HF_LORA.match(n)["module"].rsplit(".", 1)[-1]
                                                           for n, _, _ in tensors)})
    config = dict(base) if base else {"peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
                                      "bias": "none", "fan_in_fan_out": False, "inference_mode": True}
    config.update(r=rank, target_modules=modules)
    if alpha is not None:
        config["lora_alpha"] = alpha
    return (json.dumps(config, indent=2) + "\n").encode()
