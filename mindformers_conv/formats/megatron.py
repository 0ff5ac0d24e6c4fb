"""Megatron legacy checkpoints (spec §1.1): `<root>/latest_checkpointed_iteration.txt`,
`<root>/release|iter_XXXXXXX/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`.

Each rank file pickles `{"model": {name: tensor}, "checkpoint_version": 3.0}`, or one `model{v}` dict per
virtual-pipeline chunk. Reading never runs code from the file: the pickle is indexed with an allow-list
that has stand-ins for what Megatron training files also hold (argparse.Namespace `args`, RNG state,
enums); tensors become byte ranges of the file. This module knows paths and containers, not models.
"""

from __future__ import annotations

import argparse
import codecs
import re
from dataclasses import dataclass
from pathlib import Path


from ..errors import BadInput
from ..tensor_ref import TensorRef
from . import torch_pickle
from ..lazy import torch

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0  # gets past Megatron's version checks (QKV reorder < 2.0, VPP assert)
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?")
_CHUNK_KEY = re.compile(r"model(\d*)")


def rank_dir(tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> str:
    """`mp_rank_TT`, plus `_PPP` when PP > 1 and `_EEE` when EP > 1 (Megatron's get_checkpoint_name)."""
    name = f"mp_rank_{tp:02d}"
    if pp_size > 1:
        name += f"_{pp:03d}"
    if ep_size > 1:
        name += f"_{ep:03d}"
    return name


def iteration_dir(iteration: int | None) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def tracker_text(iteration: int | None) -> bytes:
    """The tracker file's content: `release` or the number, no trailing newline."""
    return b"release" if iteration is None else str(iteration).encode()


def chunk_key(chunk: int, vpp: int) -> str:
    return "model" if vpp == 1 else f"model{chunk}"


def rank_file_container(chunks: list[str], keys: list[tuple[str, str]]):
    """PickleWriter container for entries named by (chunk key, name): {chunk: {name: tensor}, version};
    every chunk is there, empty when its stage holds nothing (a pipeline stage without layers)."""

    def build(tensors: list) -> dict:
        state: dict = {chunk: {} for chunk in chunks}
        for (chunk, name), tensor in zip(keys, tensors):
            state.setdefault(chunk, {})[name] = tensor
        state["checkpoint_version"] = CHECKPOINT_VERSION
        return state

    return build


class Opaque:
    """Stands in for an allowed global whose value a conversion never needs (RNG state, enums in args)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


_OPAQUE = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_io", "BytesIO"),
}
_BUILTINS = {("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
             ("builtins", "complex"): complex, ("argparse", "Namespace"): argparse.Namespace,
             ("copyreg", "_reconstructor"): lambda cls, base, state: object.__new__(cls),
             ("_codecs", "encode"): codecs.encode}  # protocol-2 bytes (numpy RNG state)


def allow(module: str, name: str):
    """What Megatron files may name besides tensors: args (argparse.Namespace with torch dtypes and
    Megatron enums), numpy RNG state, TE extra state. Stand-ins run nothing from the file."""
    if (module, name) in _BUILTINS:
        return _BUILTINS[(module, name)]
    if module == "torch" and name in ("Size", "device"):
        return getattr(torch, name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if (module, name) in _OPAQUE or module.split(".")[0] in ("megatron", "mindspeed", "mindspeed_mm", "mindspeed_llm"):
        return Opaque
    return None


def read_rank_file(path: Path) -> dict[str, dict[str, TensorRef]]:
    """{chunk key: {name: TensorRef}} of one rank file (`model` or `model0`…); other keys are ignored,
    as are `*._extra_state` entries (Transformer Engine state, not weights)."""
    tree = torch_pickle.read_tree(path, allow)
    if not isinstance(tree, dict):
        raise BadInput(f"{path}: not a Megatron checkpoint (the pickle is not a dict)")
    chunks = {k: v for k, v in tree.items() if isinstance(k, str) and _CHUNK_KEY.fullmatch(k)}
    if not chunks:
        raise BadInput(f"{path}: not a Megatron checkpoint (no 'model' or 'model0' entry)")
    if "model" in chunks and len(chunks) > 1:
        raise BadInput(f"{path}: has both 'model' and 'model0'… entries")
    out = {}
    for key, state in chunks.items():
        if not isinstance(state, dict):
            raise BadInput(f"{path}: {key!r} is not a state dict")
        refs = {}
        for name, value in state.items():
            if str(name).endswith("._extra_state") or value is None:
                continue
            if not isinstance(value, TensorRef):
                raise BadInput(f"{path}: {key}[{name!r}] is a {type(value).__name__}, not a tensor")
            refs[name] = value
        out[key] = refs
    return out


def chunk_index(key: str) -> int:
    """`model` → 0, `model3` → 3."""
    digits = _CHUNK_KEY.fullmatch(key).group(1)
    return int(digits) if digits else 0


@dataclass
class MegatronDir:
    """A Megatron checkpoint found on disk: its rank files by (tp, pp, ep) and the grid sizes."""

    root: Path
    iteration: int | None
    files: dict[tuple[int, int, int], Path]
    tp: int
    pp: int
    ep: int


def find_iteration_dir(path: Path) -> tuple[Path, int | None]:
    """(iteration folder, iteration) for a checkpoint root (tracker file) or an iteration folder itself."""
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            return path / "release", None
        if not text.isdigit():
            raise BadInput(f"{tracker}: expected 'release' or an iteration number, got {text[:40]!r}")
        return path / iteration_dir(int(text)), int(text)
    match = re.fullmatch(r"iter_(\d{7})", path.name)
    return path, (int(match.group(1)) if match else None)


def is_megatron(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / TRACKER).is_file():
        from .checkpoint2 import is_checkpoint2  # MindFormers 2.x uses the same tracker file name
        return not is_checkpoint2(path)
    return any(_RANK_DIR.fullmatch(p.name) for p in path.iterdir() if p.is_dir())


def open_dir(path: str | Path) -> MegatronDir:
    """Find every rank file; the grid (TP, PP, EP) comes from the folder names, checked complete.

    `mp_rank_TT_NNN` is PP rank NNN or, when PP is 1, EP rank NNN (spec §1.1); the names alone do not
    say which, so the files decide: EP ranks hold the same names, PP stages never do.
    """
    root = Path(path)
    folder, iteration = find_iteration_dir(root)
    if not folder.is_dir():
        raise BadInput(f"{root}: the tracker names {folder.name}, which does not exist")
    found: dict[tuple, Path] = {}
    for sub in sorted(folder.iterdir()):
        match = _RANK_DIR.fullmatch(sub.name)
        if match and sub.is_dir():
            if not (sub / RANK_FILE).is_file():
                raise BadInput(f"{sub}: no {RANK_FILE}")
            found[tuple(int(g) if g is not None else None for g in match.groups())] = sub / RANK_FILE
    if not found:
        raise BadInput(f"{folder}: no mp_rank_* folders")
    arity = {sum(g is not None for g in key) for key in found}
    if len(arity) > 1:
        raise BadInput(f"{folder}: mp_rank_* folders of different layouts are mixed")
    if arity == {3}:
        files = {key: p for key, p in found.items()}
    elif arity == {2}:
        files = {(t, n, 0): p for (t, n, _), p in found.items()}
        if len({n for _, n, _ in files}) > 1 and _same_names([p for (t, _, _), p in files.items() if t == 0]):
            files = {(t, 0, n): p for (t, n, _), p in files.items()}
    else:
        files = {(t, 0, 0): p for (t, _, _), p in found.items()}
    sizes = [1 + max(key[i] for key in files) for i in range(3)]
    for key in ((t, p, e) for t in range(sizes[0]) for p in range(sizes[1]) for e in range(sizes[2])):
        if key not in files:
            raise BadInput(f"{folder}: {rank_dir(*key, sizes[1], sizes[2])} is missing (TP {sizes[0]}, "
                           f"PP {sizes[1]}, EP {sizes[2]})")
    return MegatronDir(root, iteration, files, *sizes)


def _same_names(paths: list[Path]) -> bool:
    sets = [{(k, n) for k, state in read_rank_file(p).items() for n in state} for p in paths]
    return all(s == sets[0] for s in sets)
