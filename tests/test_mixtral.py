"""mixtral (§4.8): llama's names, router → feed_forward.router.dense, experts stacked into feed_forward.ffn."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_tensors, example, tensors_of
from test_qwen2 import (H, I, MS_DTYPE, SIZES, assert_bin_reverse_gives_the_bytes, assert_loads_in_mindspore,
                        assert_round_trip_gives_equal_logits, expert_stacks, forward_ok, reverse_ok, save_tiny,
                        with_feed_forward)

E = 4  # num_local_experts, from config.json (MindFormers hard-codes 8)


def build(folder, experts=E, **config):
    from transformers import MixtralConfig, MixtralForCausalLM

    return save_tiny(folder, MixtralForCausalLM, MixtralConfig(**SIZES, num_local_experts=experts, **config,
                                                                num_experts_per_tok=2, torch_dtype="bfloat16"))


@pytest.fixture
def mixtral_hf(tmp_path):
    return build(tmp_path / "hf")


def expected_ms(gmm=False, dtype="F32", experts=E) -> dict:
    """Spec §4.8 table: [E, out, in] stacks (w1/w3 [E, I, H], w2 [E, H, I]); gmm [E, in, out]."""
    up, down = expert_stacks(experts, I, gmm)
    return with_feed_forward(False, dtype, {"router.dense.weight": (experts, H), "ffn.w1.weight": up,
                                            "ffn.w2.weight": down, "ffn.w3.weight": up})


@pytest.mark.parametrize("gmm", [(), ("--use_gmm",), ("--use_gmm", "true")])
@pytest.mark.parametrize("flag", [None, "bf16", "fp16"])
def test_mixtral_forward_names_shapes_and_dtypes_and_ckpt_loads_in_mindspore(cli, mixtral_hf, tmp_path, gmm, flag):
    """Float32 without --dtype (everything through fp32 numpy, §4.8, 4), even from this bf16 checkpoint."""
    got = forward_ok(cli, "mixtral", mixtral_hf, tmp_path / "m.ckpt", *gmm, *(["--dtype", flag] if flag else []))
    assert got == expected_ms(bool(gmm), MS_DTYPE.get(flag, "F32"))
    assert_loads_in_mindspore(tmp_path / "m.ckpt", got)


@pytest.mark.parametrize("gmm", [False, True])
def test_mixtral_experts_stacked_in_expert_order(cli, mixtral_hf, tmp_path, gmm):
    from mindformers_conv.formats.inputs import open_input

    forward_ok(cli, "mixtral", mixtral_hf, tmp_path / "m.ckpt", "--dtype", "bf16", *(["--use_gmm"] if gmm else []))
    got, state = open_input(tmp_path / "m.ckpt").refs, load_file(str(mixtral_hf / "model.safetensors"))
    for w in ("w1", "w2", "w3"):
        stacked = got[f"model.layers.1.feed_forward.ffn.{w}.weight"].read()
        for e in range(E):
            expert = state[f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"]
            assert torch.equal(stacked[e], expert.t() if gmm else expert)
    router = got["model.layers.1.feed_forward.router.dense.weight"].read()
    assert torch.equal(router, state["model.layers.1.block_sparse_moe.gate.weight"])


def test_mixtral_use_gmm_false_means_off(cli, mixtral_hf, tmp_path):
    """MindFormers' root CLI passes `--use_gmm False` as the truthy string "False"; here it is a boolean."""
    assert forward_ok(cli, "mixtral", mixtral_hf, tmp_path / "m.ckpt", "--use_gmm", "False") == expected_ms()


@pytest.mark.parametrize("flags", [(), ("--dtype", "bf16"), ("--use_gmm",)])
def test_mixtral_round_trip_gives_back_the_hf_bytes_and_logits(cli, mixtral_hf, tmp_path, flags):
    from transformers import MixtralForCausalLM

    assert_round_trip_gives_equal_logits(cli, "mixtral", mixtral_hf, tmp_path, MixtralForCausalLM, flags)


def test_mixtral_reverse_transposes_gmm_experts_back(cli, mixtral_hf, tmp_path):
    """MindFormers' reverse un-stacks a gmm ckpt without transposing, so every expert comes out [in, out];
    ours with --use_gmm gives the HF bytes back (here into MindFormers' own container, a torch pickle)."""
    assert_bin_reverse_gives_the_bytes(cli, "mixtral", mixtral_hf, tmp_path, ("--use_gmm",), ("--use_gmm",))


@pytest.mark.parametrize("forward_gmm, reverse_gmm", [(False, True), (True, False)])
def test_mixtral_reverse_refuses_experts_of_the_other_layout(cli, mixtral_hf, tmp_path, forward_gmm, reverse_gmm):
    ckpt = tmp_path / "m.ckpt"
    forward_ok(cli, "mixtral", mixtral_hf, ckpt, *(["--use_gmm"] if forward_gmm else []))
    result = cli("--model", "mixtral", "--reversed", "--input_path", ckpt, "--output_path", tmp_path / "b.bin",
                 "--config_path", mixtral_hf, *(["--use_gmm"] if reverse_gmm else []))
    assert result.code == 3 and "--use_gmm" in result.err and "feed_forward.ffn.w" in result.err
    assert not (tmp_path / "b.bin").exists()


def test_mixtral_reverse_to_one_safetensors_file(cli, mixtral_hf, tmp_path):
    """MindFormers' mixtral reverse writes one safetensors file when output_path ends in .safetensors."""
    ckpt, back = tmp_path / "m.ckpt", tmp_path / "mixtral8_7b.safetensors"
    forward_ok(cli, "mixtral", mixtral_hf, ckpt)
    reverse_ok(cli, "mixtral", ckpt, back, "--config_path", mixtral_hf)
    assert_same_tensors(tensors_of(back), tensors_of(mixtral_hf))  # bf16 again: config.json's dtype


@pytest.mark.parametrize("experts", [3, 10])
def test_mixtral_expert_count_comes_from_config_not_8(cli, tmp_path, experts):
    """MindFormers flushes the stack after a hard-coded 24 tensors (8 experts) and un-stacks range(8)."""
    from transformers import MixtralForCausalLM

    hf = build(tmp_path / "hf", experts)
    got = forward_ok(cli, "mixtral", hf, tmp_path / "m.ckpt")
    assert got == expected_ms(experts=experts)
    assert_round_trip_gives_equal_logits(cli, "mixtral", hf, tmp_path, MixtralForCausalLM)


def test_mixtral_python_api_with_use_gmm(mixtral_hf, tmp_path):
    from models.mixtral.convert_reversed import convert_ms_to_pt
    from models.mixtral.convert_weight import convert_pt_to_ms

    assert convert_pt_to_ms(mixtral_hf, tmp_path / "m.ckpt", use_gmm=True)
    assert tensors_of(tmp_path / "m.ckpt")["model.layers.0.feed_forward.ffn.w1.weight"][1] == (E, H, I)
    assert convert_ms_to_pt(tmp_path / "m.ckpt", tmp_path / "m.safetensors", use_gmm=True, config_path=mixtral_hf)
    assert_same_tensors(tensors_of(tmp_path / "m.safetensors"), tensors_of(mixtral_hf))


@pytest.mark.parametrize("key", ["mixtral", "qwen2-moe"])
def test_moe_tied_head_emitted_where_mindformers_reads_none(cli, tmp_path, key):
    """MindFormers' MoE converters read the safetensors files, where a tied model stores no head, so its
    ckpt has no `lm_head.weight`; ours writes the embedding there, as the state_dict() converters do, and a
    reversed folder leaves it out again."""
    import test_qwen2_moe

    hf = (build if key == "mixtral" else test_qwen2_moe.build)(tmp_path / "hf", tie_word_embeddings=True)
    assert "lm_head.weight" not in tensors_of(hf)
    forward_ok(cli, key, hf, tmp_path / "t.ckpt")
    got = tensors_of(tmp_path / "t.ckpt")
    assert got["lm_head.weight"][2].equal(got["model.tok_embeddings.embedding_weight"][2])
    reverse_ok(cli, key, tmp_path / "t.ckpt", f"{tmp_path}/back/", "--config_path", hf)
    assert_same_tensors(tensors_of(tmp_path / "back"), tensors_of(hf))


@example("mixtral")
def mixtral_example(folder, key):
    return build(folder), ()
