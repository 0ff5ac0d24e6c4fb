"""Shared fixtures: tiny random llama checkpoints built in code (fixed seeds), and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import pytest

from mindformers_conv.cli import main
from mindformers_conv.formats.inputs import open_input
from mindformers_conv.synthetic import LlamaShape, write_llama
from mindformers_conv.tensor_ref import raw_bytes

ROOT = Path(__file__).resolve().parent.parent
GQA = LlamaShape()  # 4 heads, 2 KV heads
MHA = LlamaShape(num_attention_heads=4, num_key_value_heads=4)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: cli("--model", "llama", ...) → CliResult (progress off)."""

    def run(*argv: str) -> CliResult:
        code = main([*map(str, argv), "--no-progress"])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_script(*argv: str, env: dict | None = None) -> CliResult:
    """Run the root convert_weight.py in a fresh interpreter (for exit codes, signals, memory)."""
    proc = subprocess.run([sys.executable, str(ROOT / "convert_weight.py"), *map(str, argv), "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def tensors_of(path) -> dict:
    """name → (dtype code, shape, raw bytes) of any checkpoint we read; for exact comparisons."""
    return {n: (r.dtype.code, r.shape, raw_bytes(r.read())) for n, r in open_input(path).refs.items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], name
        assert a[name][1] == b[name][1], name
        assert a[name][2].equal(b[name][2]), name


@pytest.fixture
def tiny_llama(tmp_path):
    """Factory: tiny_llama(shape=GQA, dtype="BF16", max_shard_bytes=None, fmt="safetensors") → HF folder."""

    def build(shape: LlamaShape = GQA, dtype: str = "BF16", max_shard_bytes: int | None = None,
              fmt: str = "safetensors", seed: int = 0, name: str = "hf") -> Path:
        return write_llama(tmp_path / name, shape, dtype=dtype, seed=seed, max_shard_bytes=max_shard_bytes, fmt=fmt)

    return build


def write_hf(folder: Path, tensors: dict, config: dict | None = None, fmt: str = "safetensors") -> Path:
    """A HF-style folder from a {name: torch.Tensor} dict (for families without a synthetic builder)."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if fmt == "safetensors":
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(tensors, folder / "pytorch_model.bin")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


# Contract examples: each family's test module registers, per key, how to build its tiny HF input.
Example = Callable[[Path, str], tuple[Path, tuple[str, ...]]]  # (folder, key) → (input path, extra CLI flags)
EXAMPLES: dict[str, Example] = {}


def example(*keys: str):
    """Decorator: `@example("qwen2", "qwen1_5")` on a builder makes those keys part of tests/test_contract.py.

    The input must survive the key's default dtypes (e.g. fp16 where MindFormers writes fp16 or fp32).
    """

    def register(builder: Example) -> Example:
        for key in keys:
            EXAMPLES[key] = builder
        return builder

    return register


@example("llama")
def llama_example(folder: Path, key: str) -> tuple[Path, tuple[str, ...]]:
    return write_llama(folder, GQA, dtype="F16", seed=0), ()  # F16: exact under both F32 and F16 defaults
