"""`mindformers-conv inspect PATH` and `mindformers-conv diff A B [--model K]`: headers-only tables
and streaming tensor-by-tensor comparison, across formats when a model mapping is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from . import registry
from .convert import load_config, load_config_in
from .errors import ConvError
from .formats import checkpoint2, dcp, megatron
from .formats.inputs import Source, open_input
from .mapping import ModelSpec
from .plan import Planned, build_plan
from .tensor_ref import raw_bytes
from .lazy import torch


def inspect_checkpoint(path: str) -> dict:
    """Names, dtypes, shapes and bytes of every tensor (headers only), totals, format and family."""
    if dcp.is_dcp(path):  # before is_megatron: a DCP root has the same tracker file
        from .megatron.dcp import inspect_dcp
        return inspect_dcp(path)
    if megatron.is_megatron(path):
        return _inspect_megatron(path)
    source = open_input(path)
    try:
        cfg = load_config(source, None, {})
        spec, evidence = registry.detect(cfg, list(source.refs), reverse=source.format in ("ckpt", "ms-safetensors"))
        family = {"key": spec.key, "from": evidence}
    except ConvError as e:
        family = {"key": None, "from": str(e).removeprefix("--model auto: ")}
    tensors = [{"name": r.name, "dtype": r.dtype.code, "shape": list(r.shape), "bytes": r.nbytes}
               for r in source.refs.values()]
    info = {"path": str(path), "format": source.format, "files": [str(f) for f in source.files],
            "family": family, "tensors": tensors, "total_tensors": len(tensors),
            "total_bytes": sum(t["bytes"] for t in tensors)}
    folder = next((p for p in (Path(path), Path(path).parent) if checkpoint2.is_checkpoint2(p)), None)
    if folder is not None:  # a MindFormers 2.x folder (or one of its files): which iteration
        info["format"], info["parallel"] = "checkpoint2", {"iteration": checkpoint2.find(folder).iteration}
    return info


def _inspect_megatron(path: str) -> dict:
    """A Megatron folder: every rank file's tensors as stored (`mp_rank_…/model0/name`) and the grid."""
    found = megatron.open_dir(path)
    tensors, chunks = [], set()
    for key, file in sorted(found.files.items()):
        rank = file.parent.name
        for chunk, state in megatron.read_rank_file(file).items():
            chunks.add(chunk)
            tensors += [{"name": f"{rank}/{chunk}/{r.name}", "dtype": r.dtype.code, "shape": list(r.shape),
                         "bytes": r.nbytes} for r in state.values()]
    try:
        spec, evidence = registry.detect_megatron(load_config_in(Path(path), None, {}))
        family = {"key": spec.key, "from": evidence}
    except ConvError:
        family = {"key": None, "from": "no config.json in the folder (pass --model and --config_path to convert)"}
    layout = {"tp": found.tp, "pp": found.pp, "vpp": len(chunks), "ep": found.ep,
              "iteration": found.iteration if found.iteration is not None else "release"}
    return {"path": str(path), "format": "megatron", "files": [str(f) for _, f in sorted(found.files.items())],
            "family": family, "parallel": layout, "tensors": tensors, "total_tensors": len(tensors),
            "total_bytes": sum(t["bytes"] for t in tensors)}


@dataclass
class Diff:
    missing: list[str] = field(default_factory=list)  # in A (mapped), not in B
    extra: list[str] = field(default_factory=list)  # in B, not in A
    different: list[str] = field(default_factory=list)  # one line per tensor that differs
    compared: int = 0

    @property
    def equal(self) -> bool:
        return not (self.missing or self.extra or self.different)


def diff_checkpoints(a: str, b: str, spec: ModelSpec | None = None) -> Diff:
    """Compare B with A; with a model, A is first mapped into B's naming (either direction), no cast."""
    first, second = open_input(a), open_input(b)
    tensors = _as_named_tensors(first, second, spec)
    result = Diff()
    for name in second.refs:
        if name not in tensors:
            result.extra.append(name)
    for name, produce in tensors.items():
        if name not in second.refs:
            result.missing.append(name)
            continue
        result.compared += 1
        problem = _compare(produce(), second.refs[name].read())
        if problem:
            result.different.append(f"{name}: {problem}")
    return result


def _as_named_tensors(first: Source, second: Source, spec: ModelSpec | None) -> dict:
    """name → thunk giving A's tensor under B's naming."""
    if spec is None:
        return {name: ref.read for name, ref in first.refs.items()}
    plans = []
    for reverse in (False, True):
        try:
            plans.append(build_plan(spec, first.refs, reverse=reverse, dtype=None, cfg={}, allow_unmapped=True,
                                    mindformers_defaults=False))
        except ConvError:
            continue
    if not plans:
        raise ConvError(f"diff: the {spec.key} mapping does not apply to {first.files[0]}")
    best = max(plans, key=lambda p: len({t.name for t in p.tensors} & second.refs.keys()))
    return {t.name: (lambda t=t: _output(t)) for t in best.tensors}


def _output(planned: Planned) -> torch.Tensor:
    return planned.group.compute()[planned.index]


def _compare(a: torch.Tensor, b: torch.Tensor) -> str:
    if tuple(a.shape) != tuple(b.shape):
        return f"shape {list(a.shape)} vs {list(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    x, y = raw_bytes(a), raw_bytes(b)
    if x.equal(y):
        return ""
    index = int((x != y).nonzero()[0]) // max(a.element_size(), 1)
    detail = f"first difference at element {index}"
    if a.dtype.is_floating_point:
        delta = (a.double() - b.double()).abs().nan_to_num(nan=float("inf"))
        detail += f", max abs difference {float(delta.max()):.6g}"
    return detail
