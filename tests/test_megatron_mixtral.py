"""mixtral ↔ Megatron GPT MoE: experts placed over EP ranks (spec §5) and gathered back, bit-exactly."""

import pytest
import torch
from conftest import assert_same_tensors, tensors_of
from megatron_helpers import assert_same_rank_files, rank_files

EXPERTS, FFN, HIDDEN = 4, 48, 32


def write_mixtral(folder):
    """A tiny random Mixtral in bf16: 2 layers of width 32, 4 experts of ffn 48, vocab 99."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=99, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                           num_experts_per_tok=2, tie_word_embeddings=False)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_mixtral(tmp_path_factory.mktemp("mixtral") / "hf")


def to_megatron(cli, source, out, *flags):
    r = cli("--model", "mixtral", "--input_path", source, "--output_path", out, "--target", "megatron", *flags)
    assert r.code == 0, r.err


@pytest.mark.parametrize("pp", [None, "1,1"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("ep", [1, 2])
def test_mixtral_hf_to_megatron_to_hf_is_byte_identical(cli, hf, tmp_path, ep, tp, pp):
    to_megatron(cli, hf, tmp_path / "mg", "--ep", ep, "--tp", tp, *(["--llm_pp_layers", pp] if pp else []))
    r = cli("--model", "mixtral", "--reversed", "--input_path", tmp_path / "mg", "--output_path",
            f"{tmp_path}/back/", "--config_path", hf)
    assert r.code == 0, r.err
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))


def test_mixtral_ep_ranks_hold_their_experts_renumbered_locally(cli, hf, tmp_path):
    to_megatron(cli, hf, tmp_path / "mg", "--ep", "2", "--tp", "2", "--llm_pp_layers", "1,1")
    files = rank_files(tmp_path / "mg")
    assert sorted(files) == [f"release/mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2)
                             for e in range(2)]
    source = tensors_of(hf)
    for e in range(2):
        state = files[f"release/mp_rank_01_001_{e:03d}"]["model"]
        experts = sorted({n.split(".")[6] for n in state if ".local_experts." in n})
        assert experts == ["0", "1"]
        fc1 = state["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"]
        assert tuple(fc1.shape) == (2 * FFN // 2, HIDDEN)  # GLU halves per TP rank (spec §5: ETP = TP)
        w1 = source[f"model.layers.1.block_sparse_moe.experts.{2 * e + 1}.w1.weight"]  # global expert 2e+1
        gate = w1[2].view(torch.bfloat16).reshape(w1[1])[FFN // 2:]  # TP rank 1's half
        assert fc1[:FFN // 2].equal(gate)
        assert tuple(state["decoder.layers.0.mlp.router.weight"].shape) == (EXPERTS, HIDDEN)


def test_mixtral_ep_only_folders_are_told_apart_from_pp(cli, hf, tmp_path):
    # mp_rank_00_000 / mp_rank_00_001 mean EP ranks here (PP 1), PP stages in the second checkpoint.
    to_megatron(cli, hf, tmp_path / "ep", "--ep", "2")
    to_megatron(cli, hf, tmp_path / "pp", "--llm_pp_layers", "1,1")
    assert sorted(rank_files(tmp_path / "ep")) == sorted(rank_files(tmp_path / "pp"))
    for name in ("ep", "pp"):
        r = cli("--model", "mixtral", "--reversed", "--input_path", tmp_path / name, "--output_path",
                f"{tmp_path}/{name}_back/", "--config_path", hf)
        assert r.code == 0, r.err
        assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / f"{name}_back"))


def test_mixtral_reshard_ep2_to_ep1_and_back_is_identical(cli, hf, tmp_path):
    to_megatron(cli, hf, tmp_path / "a", "--ep", "2", "--tp", "2")
    r = cli("--model", "mixtral", "--input_path", tmp_path / "a", "--output_path", tmp_path / "b", "--target",
            "megatron", "--ep", "1", "--tp", "1", "--llm_pp_layers", "1,1", "--config_path", hf, "--verify")
    assert r.code == 0, r.err
    r = cli("--model", "mixtral", "--input_path", tmp_path / "b", "--output_path", tmp_path / "a2", "--target",
            "megatron", "--ep", "2", "--tp", "2", "--llm_pp_layers", "2", "--config_path", hf)
    assert r.code == 0, r.err
    assert_same_rank_files(rank_files(tmp_path / "a"), rank_files(tmp_path / "a2"))


def test_mixtral_experts_not_dividing_ep_and_ep_on_a_dense_model_are_errors(cli, hf, tiny_llama, tmp_path):
    r = cli("--model", "mixtral", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron",
            "--ep", "3")
    assert r.code == 2 and "4 experts do not divide over --ep 3" in r.err, r.err
    r = cli("--model", "llama", "--input_path", tiny_llama(), "--output_path", tmp_path / "mg", "--target",
            "megatron", "--ep", "2")
    assert r.code == 2 and "needs a model with experts" in r.err, r.err
    assert not (tmp_path / "mg").exists()
