"""Under torchrun the ranks share the output files: the same bytes as one process, all or nothing."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_script
from mindformers_conv.distributed import assign

pytestmark = pytest.mark.filterwarnings("ignore")


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    """convert_weight.py on 2 local ranks (gloo, CPU), as `torchrun --nproc_per_node 2` starts it."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "convert_weight.py"), *map(str, argv), "--no-progress"],
                          capture_output=True, text=True, timeout=600)


def files_of(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def shares(stdout: str) -> dict[int, list[str]]:
    """rank → the files it says it wrote."""
    found = re.findall(r"rank (\d) of 2 wrote (\d+) of \d+ file\(s\): (.*)", stdout)
    return {int(rank): names.split(", ") for rank, count, names in found if len(names.split(", ")) == int(count)}


@pytest.mark.parametrize("reverse", [False, True], ids=["hf-to-ms-folder", "ms-to-hf-folder"])
def test_two_ranks_write_the_bytes_one_process_writes(tiny_llama, tmp_path, reverse):
    hf = tiny_llama()
    source, extra = hf, ["--dtype", "fp32"]
    if reverse:
        source = tmp_path / "in.ckpt"
        assert run_script("--model", "llama", "--input_path", hf, "--output_path", source, "--dtype", "bf16").code == 0
        extra = ["--reversed", "--config_path", str(hf)]
    argv = ["--model", "llama", "--input_path", source, "--max_shard_size", "40000", *extra]
    one = run_script(*argv, "--output_path", f"{tmp_path / 'one'}/")
    assert one.code == 0, one.err
    two = torchrun(*argv, "--output_path", f"{tmp_path / 'two'}/")
    assert two.returncode == 0, two.stderr[-3000:]

    expected = files_of(tmp_path / "one")
    assert files_of(tmp_path / "two") == expected
    index = "model.safetensors.index.json" if reverse else "param_name_map.json"
    assert index in expected and "config.json" in expected
    written = shares(two.stdout)
    assert sorted(written) == [0, 1] and all(written.values()), two.stdout  # both ranks wrote files
    weights = sorted(n for n in expected if n.endswith(".safetensors"))
    assert len(weights) > 2 and sorted(written[0] + written[1]) == weights


def test_a_failing_rank_leaves_nothing_that_loads(tiny_llama, tmp_path):
    hf = tiny_llama()
    argv = ["--model", "llama", "--input_path", hf, "--max_shard_size", "40000"]
    first = torchrun(*argv, "--output_path", f"{tmp_path / 'first'}/")
    assert first.returncode == 0, first.stderr[-3000:]
    victim = shares(first.stdout)[1][-1]  # a file rank 1 writes; a folder in its place fails its rename
    out = tmp_path / "out"
    (out / victim).mkdir(parents=True)

    failed = torchrun(*argv, "--output_path", f"{out}/")
    assert failed.returncode != 0
    assert f"error: cannot write {out / victim}: Is a directory" in failed.stderr
    assert f"error: rank 1 of 2 failed (cannot write {out / victim}: Is a directory); nothing was written" \
        in failed.stderr  # rank 0 stops with rank 1's reason
    assert [p.name for p in out.iterdir()] == [victim]  # no weights, no index, no temporary files
    assert "exitcode  : 5" in failed.stderr  # both ranks exit as one process would (output error)


def test_files_go_largest_first_to_the_least_loaded_rank():
    assert assign([5, 1, 4, 2, 3], 2) == [0, 0, 1, 0, 1]
    assert assign([1, 1, 1], 4) == [0, 1, 2]
    assert assign([7], 2) == [0]


def test_megatron_targets_are_refused_under_torchrun(cli, tiny_llama, tmp_path, monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    result = cli("--model", "llama", "--input_path", tiny_llama(), "--output_path", tmp_path / "mm",
                 "--target", "megatron", "--tp", "2")
    assert result.code == 2
    assert result.err.strip() == "error: --target megatron is written by one process; run it without torchrun"
    assert not (tmp_path / "mm").exists()
