"""The benchmarks' own parts (benchmarks/): the measuring harness, the sparse 70B-shaped source, the output check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import check_outputs  # noqa: E402
import sources  # noqa: E402
from harness import MIB, evict, run_child  # noqa: E402

LLAMA2_70B_BYTES = 137_953_296_384  # Llama-2-70b-hf's index total_size: 68,976,648,192 bf16 parameters


def test_run_child_counts_bytes_read_and_peak_memory(tmp_path):
    data = tmp_path / "data"
    data.write_bytes(os.urandom(8 * MIB))
    code = f"b = open({str(data)!r}, 'rb').read(); x = b'x' * (64 << 20)"
    warm = run_child([sys.executable, "-c", code], tmp_path / "warm.log")
    assert 8 * MIB <= warm.rchar < 8 * MIB + 16 * MIB  # the interpreter's own start-up reads are small
    assert warm.rss >= 72 * MIB
    assert warm.wall > 0 and warm.cpu > 0
    evict(data)
    cold = run_child([sys.executable, "-c", code], tmp_path / "cold.log")
    assert cold.read_bytes >= 8 * MIB  # from storage once evicted


def test_run_child_stops_on_failure_with_the_log(tmp_path):
    with pytest.raises(SystemExit, match="exited 3:\nboom"):
        run_child([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "log")


def test_sparse_70b_source_is_headers_and_dry_run_reads_only_them(tmp_path):
    folder = tmp_path / "70b"
    subprocess.run([sys.executable, sources.__file__, "llama-70b-sparse", str(folder)], check=True)
    shards = sorted(folder.glob("*.safetensors"))
    assert [s.name for s in shards] == [f"model-{k:05d}-of-00015.safetensors" for k in range(1, 16)]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == LLAMA2_70B_BYTES
    assert len(index["weight_map"]) == 723
    assert sum(s.stat().st_blocks * 512 for s in shards) < 16 * MIB  # holes: no data on disk
    assert sum(s.stat().st_size for s in shards) > LLAMA2_70B_BYTES

    log = tmp_path / "dry.log"
    run = run_child([sys.executable, str(ROOT / "convert_weight.py"), "--model", "llama", "--input_path", str(folder),
                     "--output_path", str(tmp_path / "out.ckpt"), "--dtype", "bf16", "--dry-run", "--no-progress"], log)
    assert "read 723 tensors, 128.48 GiB from 15 file(s)" in log.read_text()
    assert run.rchar < 64 * MIB
    assert not (tmp_path / "out.ckpt").exists()


def test_check_outputs_passes_a_right_ckpt_and_catches_wrong_ones(tiny_llama, cli, tmp_path):
    src = tiny_llama()
    out = tmp_path / "out.ckpt"
    assert cli("--model", "llama", "--input_path", src, "--output_path", out, "--dtype", "bf16").code == 0
    assert check_outputs.check(src, "ckpt", "bf16", out) == []
    assert check_outputs.check(src, "hf", "bf16", src) == []
    as_fp32 = check_outputs.check(src, "ckpt", "fp32", out)
    assert len(as_fp32) == 21 and "differs from the source (torch.bfloat16" in as_fp32[0]
    other = tiny_llama(seed=1, name="other")
    assert len(check_outputs.check(src, "hf", "bf16", other)) == 21


def test_check_outputs_names_missing_and_unexpected_tensors(tiny_llama):
    from mindformers_conv.synthetic import LlamaShape

    src, three_layers = tiny_llama(), tiny_llama(LlamaShape(num_hidden_layers=3), name="three")
    problems = check_outputs.check(src, "hf", "bf16", three_layers)
    assert problems[0] == "three: unexpected tensor model.layers.2.input_layernorm.weight"
    assert sum("unexpected tensor model.layers.2." in p for p in problems) == 9
