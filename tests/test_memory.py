"""Memory is bounded by the largest tensor, never by the model (DESIGN §2 Executor, §6 Memory).

A synthetic llama of ~290 MB (fp32, many layers) whose largest tensor is 8 MiB is converted by the CLI
in a child process, both ways, with a cast so every tensor goes through memory (no file-to-file copy):
HF fp32 → MindSpore bf16 `.ckpt`, then that `.ckpt` → HF fp32 folder. The child's peak RSS minus the
peak of a child that only imports the same modules stays under 6 × largest tensor + 64 MiB.

Peak RSS comes from `os.wait4` in a small launcher process: the kernel carries a process's peak RSS
across fork/exec from its parent, so measuring a child of the (large) pytest process would measure
pytest. The launcher is a bare interpreter, and it is the same for the run and the baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from mindformers_conv.synthetic import LlamaShape, write_llama
from mindformers_conv.tensor_ref import numel

MiB = 1 << 20
# fp32: embedding / head 2048×1024 = 8 MiB, gate/up/down 2048×1024 = 8 MiB, q/o 4 MiB, k/v 1 MiB; 8 layers.
SHAPE = LlamaShape(vocab_size=2048, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4)
LARGEST = max(numel(s) for _, s in SHAPE.tensors()) * 4
TOTAL = sum(numel(s) for _, s in SHAPE.tensors()) * 4
BOUND = 6 * LARGEST + 64 * MiB

# The launcher: runs argv as a child, waits with wait4, prints {"code": …, "maxrss": bytes} last.
LAUNCHER = r"""
import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"code": child.returncode, "maxrss": usage.ru_maxrss * 1024}))
"""
# The same imports a conversion makes (convert_weight imports the CLI and registers every model).
BASELINE = "import torch, tqdm, numpy, convert_weight, mindformers_conv.cli, mindformers_conv.convert"


def peak_rss(argv: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True, cwd=ROOT)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, proc.stderr
    return report["maxrss"], proc.stdout


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("mem") / "hf", SHAPE, dtype="F32", max_shard_bytes=100 * MiB)


@pytest.fixture(scope="module")
def baseline() -> int:
    return min(peak_rss([sys.executable, "-c", BASELINE])[0] for _ in range(2))


def test_model_is_large_enough_to_tell():
    assert LARGEST == 8 * MiB
    assert TOTAL > 280 * MiB
    assert BOUND < TOTAL / 2


def convert(*args) -> tuple[int, str]:
    return peak_rss([sys.executable, str(ROOT / "convert_weight.py"), "--model", "llama", *map(str, args),
                     "--no-progress"])


def test_hf_to_ms_bf16_peak_rss_bounded_by_largest_tensor(big_model, baseline, tmp_path):
    out = tmp_path / "ms.ckpt"
    peak, report = convert("--input_path", big_model, "--output_path", out, "--dtype", "bf16")
    assert out.stat().st_size > TOTAL / 2 - MiB  # everything was written, cast to bf16
    assert "BF16" in report
    extra = peak - baseline
    assert extra < BOUND, f"peak {peak / MiB:.0f} MiB, baseline {baseline / MiB:.0f} MiB, bound {BOUND / MiB:.0f} MiB"


def test_ms_to_hf_peak_rss_bounded_by_largest_tensor(big_model, baseline, tmp_path):
    ckpt, back = tmp_path / "ms.ckpt", tmp_path / "back"
    convert("--input_path", big_model, "--output_path", ckpt, "--dtype", "bf16")
    peak, report = convert("--reversed", "--input_path", ckpt, "--output_path", f"{back}/",
                           "--config_path", big_model, "--dtype", "fp32", "--max_shard_size", "100MB")
    written = sum(p.stat().st_size for p in back.glob("*.safetensors"))
    assert written > TOTAL  # fp32 again: every tensor was cast up on the way
    extra = peak - baseline
    assert extra < BOUND, f"peak {peak / MiB:.0f} MiB, baseline {baseline / MiB:.0f} MiB, bound {BOUND / MiB:.0f} MiB"


def test_the_measurement_sees_a_whole_model_load(big_model, baseline):
    """Control: the same measurement on a child that holds every tensor at once goes far over the bound,
    so the bounds above are not met by a blind meter."""
    holds_all = (f"{BASELINE}; import glob, safetensors.torch as st; "
                 f"kept = [{{k: v.clone() for k, v in st.load_file(f).items()}} "
                 f"for f in glob.glob({str(big_model)!r} + '/*.safetensors')]")
    peak, _ = peak_rss([sys.executable, "-c", holds_all])
    assert peak - baseline > TOTAL * 0.9 > BOUND


def test_a_rename_only_conversion_never_imports_torch(tiny_llama, tmp_path):
    """Moving bytes needs no torch (its import costs ~1 s and ~200 MB): bf16 → bf16 both ways, in a fresh
    interpreter, and casts between fp32, fp16 and bf16; only without the compiled casts does a cast that
    rounds import it."""
    import subprocess
    import sys

    hf = tiny_llama(dtype="BF16")
    code = ("import sys; from mindformers_conv.cli import main; code = main(sys.argv[1:] + ['--no-progress']); "
            "print(code, 'torch' in sys.modules)")

    def run(*argv) -> str:
        proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)
        return proc.stdout.strip().splitlines()[-1]

    ckpt = tmp_path / "m.ckpt"
    assert run("--model", "llama", "--input_path", hf, "--output_path", ckpt, "--dtype", "bf16") == "0 False"
    assert run("--model", "llama", "--reversed", "--input_path", ckpt, "--output_path", f"{tmp_path}/back/",
               "--config_path", hf) == "0 False"
    # casts between fp32, fp16 and bf16 run in C (_floatcast.c); without it, bf16 → fp32 (llama's default) is
    # numpy's shift and casts that round take torch
    assert run("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "h.ckpt", "--dtype", "fp16") \
        == "0 False"
    code = "import sys; sys.modules['mindformers_conv._floatcast'] = None; " + code
    assert run("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "f.ckpt") == "0 False"
    assert run("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "h2.ckpt", "--dtype", "fp16") \
        == "0 True"
