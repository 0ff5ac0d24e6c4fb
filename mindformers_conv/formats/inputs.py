"""Find and open whatever checkpoint a path names: a HF folder, a MindSpore file or folder, or one file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput, UsageError
from ..tensor_ref import TensorRef
from . import checkpoint2, hf_safetensors, ms_ckpt, ms_distributed, ms_safetensors, safetensors_file, torch_pickle


@dataclass
class Source:
    """An opened input: its tensors (headers only), the files behind them and the folder they live in."""

    refs: dict[str, TensorRef]
    files: list[Path]
    folder: Path
    format: str  # "safetensors" | "ms-safetensors" | "ckpt" | "pickle"

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.refs.values())


def _safetensors(path: Path) -> dict[str, TensorRef]:
    return safetensors_file.read_header(path)[0]


_READERS = {".safetensors": _safetensors, ".ckpt": ms_ckpt.read_index,
            ".bin": torch_pickle.read, ".pt": torch_pickle.read, ".pth": torch_pickle.read}
_INDEXES = (hf_safetensors.INDEX, hf_safetensors.BIN_INDEX, ms_safetensors.PARAM_NAME_MAP)
_SINGLES = ("model.safetensors", "pytorch_model.bin")


def open_input(path: str | Path, strategy: str | None = None) -> Source:
    """A folder is searched for an index, then a known single file, then one weight file of any name.

    A file that belongs to its folder's checkpoint (named in the index, or the folder's only weight
    file) stands for the whole folder, as MindFormers' `--input_path` documents; any other file is
    read alone. A folder of `rank_*/` checkpoints is merged by its strategy (`strategy`, or a `strategy/`
    folder inside or beside it).
    """
    path = Path(path)
    if not path.exists():
        raise BadInput(f"input {path} does not exist")
    if path.is_dir() and ms_distributed.rank_folders(path):
        refs, files = ms_distributed.open_distributed(path, strategy)
        return Source(refs, files, path, _format_of(refs, files))
    if strategy:
        raise UsageError(f"--strategy applies to a folder of rank_*/ checkpoints, and {path} is not one")
    if path.is_dir():
        return _open_folder(path)
    folder = path.parent
    try:
        whole = _open_folder(folder)
    except BadInput:
        whole = None
    if whole is not None and path.resolve() in {f.resolve() for f in whole.files}:
        return whole
    return _open_files([path], folder)


def _open_folder(folder: Path) -> Source:
    if checkpoint2.is_checkpoint2(folder):
        found, refs, files = checkpoint2.read(folder)
        return Source(refs, files, found.root, "ms-safetensors")
    for name in _INDEXES:
        index = folder / name
        if index.is_file():
            reader = _reader(Path(_first_file(index)))
            refs = hf_safetensors.read_indexed(index, reader)
            files = sorted({Path(r.ranges[0][0]) for r in refs.values() if r.ranges} or {index})
            return Source(refs, files, folder, _format_of(refs, files))
    for name in _SINGLES:
        if (folder / name).is_file():
            return _open_files([folder / name], folder)
    weights = sorted(p for p in folder.iterdir() if p.suffix in _READERS and p.is_file() and not p.name.startswith(".")
                     and p.name != ms_safetensors.HYPER_PARAM)  # optimizer scalars, not weights
    if not weights:
        raise BadInput(f"no checkpoint in {folder} (looked for an index, *.safetensors, *.ckpt, *.bin, *.pt)")
    kinds = {p.suffix for p in weights}
    if len(kinds) > 1 or kinds != {".safetensors"} and len(weights) > 1:
        names = ", ".join(p.name for p in weights[:4])
        raise BadInput(f"{folder} holds several checkpoints ({names}); name one file as --input_path")
    return _open_files(weights, folder)


def _first_file(index: Path) -> str:
    """The suffix of the files an index points to decides the reader."""
    return {hf_safetensors.BIN_INDEX: "x.bin"}.get(index.name, "x.safetensors")


def _reader(path: Path):
    try:
        return _READERS[path.suffix]
    except KeyError:
        raise BadInput(f"{path}: unknown checkpoint type (expected .safetensors, .ckpt, .bin, .pt or .pth)") from None


def _open_files(files: list[Path], folder: Path) -> Source:
    reader = _reader(files[0])
    refs = hf_safetensors.read_files(files, reader)
    if not refs:
        raise BadInput(f"{files[0]} holds no tensors")
    return Source(refs, files, folder, _format_of(refs, files))


def _format_of(refs: dict[str, TensorRef], files: list[Path]) -> str:
    suffix = files[0].suffix
    if suffix == ".safetensors":
        return "ms-safetensors" if ms_safetensors.is_ms(safetensors_file.read_header(files[0])[1]) else "safetensors"
    return {".ckpt": "ckpt"}.get(suffix, "pickle")
