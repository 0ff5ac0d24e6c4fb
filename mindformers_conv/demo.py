"""`make demo`: build a tiny llama, convert HF → MindSpore → HF through the CLI, check every byte."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .cli import main
from .formats.inputs import open_input
from .synthetic import LlamaShape, write_llama
from .tensor_ref import raw_bytes


def run(workdir: Path) -> int:
    shutil.rmtree(workdir, ignore_errors=True)
    hf = write_llama(workdir / "tiny-llama-hf", LlamaShape(), dtype="BF16", max_shard_bytes=64 << 10)
    ckpt, back = workdir / "tiny-llama.ckpt", workdir / "tiny-llama-roundtrip"
    print(f"built a tiny random llama (bf16, sharded) at {hf}")
    steps = [
        ["--model", "llama", "--input_path", str(hf), "--output_path", str(ckpt), "--dtype", "bf16", "--verify"],
        ["--model", "auto", "--reversed", "--input_path", str(ckpt), "--output_path", f"{back}/",
         "--config_path", str(hf), "--verify"],
    ]
    for argv in steps:
        print("$ python convert_weight.py " + " ".join(argv))
        if main(argv + ["--no-progress"]) != 0:
            return 1
    before, after = open_input(hf).refs, open_input(back).refs
    same = before.keys() == after.keys() and all(
        before[n].dtype == after[n].dtype and raw_bytes(before[n].read()).equal(raw_bytes(after[n].read()))
        for n in before)
    print(f"HF → MindSpore → HF: {len(after)} tensors, {'byte-identical' if same else 'DIFFERENT'} to the input")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-out")))
