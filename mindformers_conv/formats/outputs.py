"""Where and how the output goes: the files to write (with their tensors) and the small files after them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import lora
from ..dtypes import DType
from ..errors import UsageError
from ..outfile import OutputFile
from ..tensor_ref import Shape, numel
from . import hf_safetensors, ms_ckpt, ms_safetensors
from .safetensors_file import SafetensorsWriter
from .torch_pickle import PickleWriter

Entry = tuple[str, DType, Shape]

CARRIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)


@dataclass
class FileSpec:
    """One weight file to write."""

    path: Path
    kind: str  # "ckpt" | "safetensors" | "pickle"
    entries: list[Entry]
    metadata: dict[str, str] = field(default_factory=dict)
    pickle_wrap: str | None = None  # torch pickle holds {pickle_wrap: state_dict} instead of a flat dict
    name_prefix: str = ""  # stored names are prefixed (a PEFT adapter's `base_model.model.`)

    def open_writer(self, out: OutputFile, ckpt_slice_bytes: int = ms_ckpt.SLICE_BYTES):
        if self.kind == "ckpt":
            return ms_ckpt.CkptWriter(out, ckpt_slice_bytes)
        entries = [(self.name_prefix + n, d, s) for n, d, s in self.entries]
        if self.kind == "safetensors":
            return SafetensorsWriter(out, entries, self.metadata)
        return PickleWriter(out, entries, self.pickle_wrap)


@dataclass
class Layout:
    files: list[FileSpec]
    extras: dict[Path, bytes] = field(default_factory=dict)  # index files, written after the weights
    folder: Path | None = None  # set when the output is a folder (config/tokenizer files go there)

    def remove(self) -> None:
        """Delete what this layout wrote (weights first, then index files), e.g. after a failed --verify."""
        for path in [f.path for f in self.files] + list(self.extras):
            path.unlink(missing_ok=True)


def output_kind(path: str, reverse: bool) -> str:
    """By suffix, as MindFormers' CLI: .ckpt, .safetensors, .bin/.pt/.pth, or a folder (existing or ending in /)."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return "folder"
    suffix = Path(path).suffix
    if suffix in (".ckpt", ".safetensors"):
        return suffix[1:]
    if suffix in (".bin", ".pt", ".pth") or reverse:
        return "pickle"  # MindFormers' reverse writes torch.save() at exactly the given path
    return "ckpt"


def plan_layout(output_path: str, reverse: bool, entries: list[Entry], max_shard_bytes: int,
                pickle_wrap: str | None = None, lora_alpha: float | None = None,
                adapter_base: dict | None = None) -> Layout:
    """`adapter_base`: the input's adapter_config.json, whose settings a PEFT adapter output keeps."""
    kind = output_kind(output_path, reverse)
    metadata = hf_safetensors.METADATA if reverse else ms_safetensors.METADATA
    if kind == "folder":
        adapter = [e for e in entries if reverse and lora.is_hf_lora(e[0])]
        base = [e for e in entries if e not in adapter]
        folder = Path(output_path)
        layout = _folder(folder, reverse, base, max_shard_bytes, metadata) if base else Layout([], {}, folder)
        if adapter:
            _add_adapter(layout, adapter, lora_alpha, adapter_base)
        return layout
    path = Path(output_path)
    if kind == "ckpt" and path.suffix != ".ckpt":
        path = path.with_name(path.name + ".ckpt")  # as mindspore.save_checkpoint does
    if path.parent and not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise UsageError(f"output folder {path.parent} {what}")
    return Layout([FileSpec(path, kind, entries, metadata if kind == "safetensors" else {}, pickle_wrap)])


def _folder(folder: Path, reverse: bool, entries: list[Entry], max_shard_bytes: int, metadata) -> Layout:
    shards = hf_safetensors.split_shards(entries, max_shard_bytes)
    names = hf_safetensors.shard_names(len(shards))
    files = [FileSpec(folder / n, "safetensors", s, metadata) for n, s in zip(names, shards)]
    weight_map = {e[0]: n for n, s in zip(names, shards) for e in s}
    extras = {}
    if reverse and len(files) > 1:
        total = sum(numel(e[2]) * e[1].itemsize for e in entries)
        extras[folder / hf_safetensors.INDEX] = hf_safetensors.index_json(weight_map, total)
    elif not reverse:
        extras[folder / ms_safetensors.PARAM_NAME_MAP] = ms_safetensors.param_name_map(weight_map)
    return Layout(files, extras, folder)


def _add_adapter(layout: Layout, entries: list[Entry], alpha: float | None, base: dict | None) -> None:
    """LoRA of a HF output is a PEFT adapter: in `adapter/` beside the base weights, or the folder itself."""
    folder = layout.folder / lora.ADAPTER_FOLDER if layout.files else layout.folder
    layout.files.append(FileSpec(folder / lora.ADAPTER_WEIGHTS, "safetensors", entries, hf_safetensors.METADATA,
                                 name_prefix=lora.PEFT_PREFIX))
    layout.extras[folder / lora.ADAPTER_CONFIG] = lora.adapter_config(entries, alpha, base)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' → bytes (decimal units as transformers reads them)."""
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            number = upper[: -len(unit)].strip()
            break
    else:
        number, factor = upper, 1
    try:
        value = float(number) * factor
    except ValueError:
        raise UsageError(f"invalid size {text!r}; use e.g. 5GB or 500MB") from None
    if value <= 0:
        raise UsageError(f"invalid size {text!r}; it must be positive")
    return int(value)
