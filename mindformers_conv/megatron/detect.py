"""Whether a conversion has a Megatron side, and which declaration it takes. Every run asks; the
Megatron backend itself (`run.py`) is imported only by the runs that have one."""

from __future__ import annotations

from pathlib import Path

from .. import registry
from ..convert import load_config_in
from ..formats import dcp as dcp_fmt
from ..formats import megatron as fmt
from ..formats.inputs import open_input
from ..mapping import ModelSpec

TARGETS = ("megatron", "dcp")


def megatron_spec(model: str, target: str | None, input_path: str, config_path: str | None,
                   flags: dict) -> ModelSpec | None:
    """The Megatron declaration to use when the output or the input is Megatron, else None."""
    megatron_input = fmt.is_megatron(input_path) or dcp_fmt.is_dcp(input_path)
    if target not in TARGETS and not megatron_input:
        return None
    if model != "auto":
        return registry.get_megatron(model)
    folder = Path(input_path) if megatron_input else open_input(input_path).folder
    spec, evidence = registry.detect_megatron(load_config_in(folder, config_path, flags))
    print(f"model: {spec.key} (detected from {evidence})")
    return spec
