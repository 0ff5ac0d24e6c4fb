"""The Megatron on-disk format: folder names (spec §1.1), rank-file contents, and a reader that loads
training checkpoints (argparse.Namespace args, RNG state) without ever running code from the pickle."""

import argparse
import os
import random

import numpy as np
import pytest
import torch
from conftest import assert_same_tensors, tensors_of

from mindformers_conv.errors import BadInput
from mindformers_conv.formats import megatron as fmt
from mindformers_conv.synthetic import LlamaShape, write_llama


@pytest.mark.parametrize("tp,pp,ep,pp_size,ep_size,name", [
    (0, 0, 0, 1, 1, "mp_rank_00"), (1, 2, 0, 4, 1, "mp_rank_01_002"),
    (3, 0, 1, 1, 2, "mp_rank_03_001"), (1, 1, 1, 2, 2, "mp_rank_01_001_001"),
])
def test_rank_folder_names_follow_megatron(tp, pp, ep, pp_size, ep_size, name):
    assert fmt.rank_dir(tp, pp, ep, pp_size, ep_size) == name


def test_iteration_folder_and_tracker_text():
    assert fmt.iteration_dir(None) == "release" and fmt.iteration_dir(100) == "iter_0000100"
    assert fmt.tracker_text(None) == b"release" and fmt.tracker_text(7) == b"7"


def hf_tiny(tmp_path):
    return write_llama(tmp_path / "hf", LlamaShape(num_hidden_layers=2))


def megatron_like(tmp_path, extra: dict, name: str = "trained") -> "os.PathLike":
    """A one-rank Megatron checkpoint as training writes it, from a converted one plus `extra` keys."""
    state = torch.load(tmp_path / "mg/release/mp_rank_00/model_optim_rng.pt", weights_only=True)
    state["model"]["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
    folder = tmp_path / name / "iter_0000100" / "mp_rank_00"
    folder.mkdir(parents=True)
    torch.save({**state, **extra}, folder / "model_optim_rng.pt")
    (tmp_path / name / fmt.TRACKER).write_text("100")
    return tmp_path / name


def test_written_rank_files_load_with_weights_only_and_hold_model_and_version(cli, tmp_path):
    hf = hf_tiny(tmp_path)
    assert cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron").code == 0
    state = torch.load(tmp_path / "mg/release/mp_rank_00/model_optim_rng.pt", weights_only=True)
    assert set(state) == {"model", "checkpoint_version"} and state["checkpoint_version"] == 3.0
    assert (tmp_path / "mg" / fmt.TRACKER).read_bytes() == b"release"


def test_training_checkpoint_with_args_namespace_and_rng_state_is_read(cli, tmp_path):
    hf = hf_tiny(tmp_path)
    assert cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron").code == 0
    args = argparse.Namespace(tensor_model_parallel_size=1, params_dtype=torch.bfloat16, num_layers=2)
    rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state()}]
    trained = megatron_like(tmp_path, {"args": args, "iteration": 100, "rng_state": rng,
                                       "optimizer": {"param_groups": [{"lr": 1e-4, "params": [0, 1]}]}})
    r = cli("--model", "llama", "--reversed", "--input_path", trained, "--output_path", f"{tmp_path}/back/",
            "--config_path", hf)
    assert r.code == 0, r.err
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))


class Exploit:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_rank_file_with_a_malicious_reduce_is_refused_and_nothing_runs(cli, tmp_path):
    hf = hf_tiny(tmp_path)
    assert cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron").code == 0
    exploit = Exploit()
    exploit.marker = tmp_path / "pwned"
    trained = megatron_like(tmp_path, {"args": exploit})
    r = cli("--model", "llama", "--reversed", "--input_path", trained, "--output_path", f"{tmp_path}/back/",
            "--config_path", hf)
    assert r.code == 3 and "refused" in r.err and "system" in r.err, r.err
    assert not exploit.marker.exists() and not (tmp_path / "back").exists()
    with pytest.raises(BadInput, match="refused"):
        fmt.read_rank_file(trained / "iter_0000100/mp_rank_00/model_optim_rng.pt")


def test_missing_rank_folder_is_named(cli, tmp_path):
    hf = hf_tiny(tmp_path)
    assert cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron",
               "--tp", "2", "--llm_pp_layers", "1,1").code == 0
    (tmp_path / "mg/release/mp_rank_01_001/model_optim_rng.pt").unlink()
    (tmp_path / "mg/release/mp_rank_01_001").rmdir()
    r = cli("--model", "llama", "--reversed", "--input_path", tmp_path / "mg", "--output_path", f"{tmp_path}/back/",
            "--config_path", hf)
    assert r.code == 3 and "mp_rank_01_001 is missing" in r.err, r.err


def test_output_holding_another_layout_is_refused_and_the_tracker_comes_last(cli, tmp_path):
    hf = hf_tiny(tmp_path)
    assert cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron",
               "--tp", "2").code == 0
    (tmp_path / "mg" / fmt.TRACKER).unlink()
    r = cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron",
            "--llm_pp_layers", "1,1")
    assert r.code == 2 and "mp_rank_00 of another layout" in r.err, r.err
    assert not (tmp_path / "mg" / fmt.TRACKER).exists()
    assert sorted(p.name for p in (tmp_path / "mg/release").iterdir()) == ["mp_rank_00", "mp_rank_01"]


def test_megatron_input_without_reversed_or_target_says_what_to_pass(cli, tmp_path):
    hf = hf_tiny(tmp_path)
    assert cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron").code == 0
    r = cli("--model", "llama", "--input_path", tmp_path / "mg", "--output_path", f"{tmp_path}/back/")
    assert r.code == 2 and "--reversed" in r.err and "--target megatron" in r.err, r.err
