"""The benchmarks' synthetic HF llama folders (random bf16 weights, real names and config.json).

    python benchmarks/sources.py LABEL FOLDER     # build one (what source_folder() runs in a child)

Built once into benchmarks/.cache/<label>-bf16-seed0 (gitignored) by mindformers_conv.synthetic, in a
child process so the measuring process never imports torch. `llama-70b-sparse` is headers only: shards
whose data are holes (sparse files, no disk used), for `--dry-run`, which must read headers only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"


@dataclass(frozen=True)
class Model:
    label: str
    base: str  # a LlamaShape in mindformers_conv.synthetic
    overrides: dict = field(default_factory=dict)  # LlamaShape fields changed from the base
    sparse: bool = False  # headers only; data are holes
    shard_bytes: int | None = None  # HF shards + index when set


QUICK = Model("quick", "TINYLLAMA_1B", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                            num_attention_heads=8, num_key_value_heads=4))
TINYLLAMA = Model("tinyllama-1.1b", "TINYLLAMA_1B")
TINYLLAMA_HALF = Model("tinyllama-1.1b-11l", "TINYLLAMA_1B", dict(num_hidden_layers=11))
LLAMA7B_2L = Model("llama-7b-2l", "LLAMA_7B", dict(num_hidden_layers=2))
LLAMA7B_4L = Model("llama-7b-4l", "LLAMA_7B", dict(num_hidden_layers=4))
LLAMA70B = Model("llama-70b-sparse", "LLAMA_7B", dict(hidden_size=8192, intermediate_size=28672,
                                                     num_hidden_layers=80, num_attention_heads=64,
                                                     num_key_value_heads=8), sparse=True, shard_bytes=10 ** 10)


def source_folder(model: Model) -> Path:
    """The cached folder of `model`; built (in a child, under a temporary name, then renamed) when missing."""
    folder = CACHE / f"{model.label}-bf16-seed0"
    if (folder / "config.json").is_file():
        return folder
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    print(f"building the synthetic source once: {folder} ...", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, model.label, str(building)], cwd=REPO, check=True)
    shutil.rmtree(folder, ignore_errors=True)
    building.rename(folder)
    print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    return folder


def _build(model: Model, folder: Path) -> None:
    from dataclasses import replace

    from mindformers_conv import synthetic

    shape = replace(getattr(synthetic, model.base), **model.overrides)
    if model.sparse:
        _write_sparse(folder, shape, model.shard_bytes)
    else:
        synthetic.write_llama(folder, shape, dtype="BF16", seed=0, max_shard_bytes=model.shard_bytes)


def _write_sparse(folder: Path, shape, shard_bytes: int | None) -> None:
    """Real safetensors headers (our writer's), shards and index; every data byte a hole (truncated up)."""
    from mindformers_conv.dtypes import BY_CODE
    from mindformers_conv.formats import hf_safetensors
    from mindformers_conv.formats.safetensors_file import SafetensorsWriter
    from mindformers_conv.outfile import OutputFile
    from mindformers_conv.tensor_ref import numel

    bf16 = BY_CODE["BF16"]
    shards = hf_safetensors.split_shards([(name, bf16, s) for name, s in shape.tensors()], shard_bytes)
    names = hf_safetensors.shard_names(len(shards))
    folder.mkdir(parents=True)
    total = 0
    for file, shard in zip(names, shards):
        out = OutputFile(folder / file)
        SafetensorsWriter(out, shard, hf_safetensors.METADATA)  # writes the header; no tensor is added
        out.commit()
        data = sum(numel(s) * dtype.itemsize for _, dtype, s in shard)
        os.truncate(folder / file, out.position + data)
        total += data
    weight_map = {name: file for file, shard in zip(names, shards) for name, _, _ in shard}
    (folder / hf_safetensors.INDEX).write_bytes(hf_safetensors.index_json(weight_map, total))
    (folder / "config.json").write_text(json.dumps(shape.config("BF16"), indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    models = {m.label: m for m in (QUICK, TINYLLAMA, TINYLLAMA_HALF, LLAMA7B_2L, LLAMA7B_4L, LLAMA70B)}
    _build(models[sys.argv[1]], Path(sys.argv[2]))
