"""qwen2-moe (§4.7): qwen2's attention (with biases), routed experts stacked, shared expert and its gate."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_tensors, example, tensors_of
from test_qwen2 import (H, MS_DTYPE, SIZES, assert_bin_reverse_gives_the_bytes, assert_loads_in_mindspore,
                        assert_round_trip_gives_equal_logits, expert_stacks, forward_ok, save_tiny, with_feed_forward)

E, IM, IS = 12, 8, 20  # num_experts (12: expert 10 sorts before 2 by name), moe / shared-expert intermediate


def build(folder, experts=E, **config):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return save_tiny(folder, Qwen2MoeForCausalLM, Qwen2MoeConfig(
        **SIZES, num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=IM,
        shared_expert_intermediate_size=IS, torch_dtype="bfloat16", **config))


@pytest.fixture
def qwen2_moe_hf(tmp_path):
    return build(tmp_path / "hf")


def expected_ms(gmm=False, dtype="F32", experts=E) -> dict:
    """Spec §4.7 table: routed stacks [E, out, in] (gmm [E, in, out]), shared expert, its [1, H] gate."""
    up, down = expert_stacks(experts, IM, gmm)
    return with_feed_forward(True, dtype, {
        "routed_experts.router.dense.weight": (experts, H), "routed_experts.ffn.w1.weight": up,
        "routed_experts.ffn.w2.weight": down, "routed_experts.ffn.w3.weight": up,
        "shared_experts.w1.weight": (IS, H), "shared_experts.w2.weight": (H, IS), "shared_experts.w3.weight": (IS, H),
        "shared_experts_gate.weight": (1, H)})


@pytest.mark.parametrize("gmm", [False, True])
@pytest.mark.parametrize("flag", [None, "bf16"])
def test_qwen2_moe_forward_names_shapes_and_dtypes_and_ckpt_loads_in_mindspore(cli, qwen2_moe_hf, tmp_path, gmm,
                                                                                flag):
    """Float32 without --dtype at v1.3.2 (fp32 numpy for every tensor), even from this bf16 checkpoint."""
    got = forward_ok(cli, "qwen2-moe", qwen2_moe_hf, tmp_path / "q.ckpt", *(["--use_gmm"] if gmm else []),
                     *(["--dtype", flag] if flag else []))
    assert got == expected_ms(gmm, MS_DTYPE.get(flag, "F32"))
    assert_loads_in_mindspore(tmp_path / "q.ckpt", got)


@pytest.mark.parametrize("gmm", [False, True])
def test_qwen2_moe_experts_stacked_in_numeric_expert_order(cli, qwen2_moe_hf, tmp_path, gmm):
    """Stack index e is expert e (MindFormers re-sorts the lexicographic 0, 1, 10, 11, 2, … numerically)."""
    from mindformers_conv.formats.inputs import open_input

    forward_ok(cli, "qwen2-moe", qwen2_moe_hf, tmp_path / "q.ckpt", "--dtype", "bf16", *(["--use_gmm"] if gmm else []))
    got, state = open_input(tmp_path / "q.ckpt").refs, load_file(str(qwen2_moe_hf / "model.safetensors"))
    m, f = "model.layers.1.mlp", "model.layers.1.feed_forward"
    for ms_w, hf_w in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
        stacked = got[f"{f}.routed_experts.ffn.{ms_w}.weight"].read()
        for e in range(E):
            expert = state[f"{m}.experts.{e}.{hf_w}.weight"]
            assert torch.equal(stacked[e], expert.t() if gmm else expert)
        shared = got[f"{f}.shared_experts.{ms_w}.weight"].read()
        assert torch.equal(shared, state[f"{m}.shared_expert.{hf_w}.weight"])
    assert torch.equal(got[f"{f}.shared_experts_gate.weight"].read(), state[f"{m}.shared_expert_gate.weight"])
    assert torch.equal(got[f"{f}.routed_experts.router.dense.weight"].read(), state[f"{m}.gate.weight"])


@pytest.mark.parametrize("flags", [(), ("--dtype", "bf16"), ("--use_gmm",)])
def test_qwen2_moe_round_trip_gives_back_the_hf_bytes_and_logits(cli, qwen2_moe_hf, tmp_path, flags):
    """MindFormers has no qwen2-moe reverse; ours is the exact inverse (gmm included)."""
    from transformers import Qwen2MoeForCausalLM

    assert_round_trip_gives_equal_logits(cli, "qwen2-moe", qwen2_moe_hf, tmp_path, Qwen2MoeForCausalLM, flags)


def test_qwen2_moe_bin_reverse_gives_back_the_hf_bytes(cli, qwen2_moe_hf, tmp_path):
    assert_bin_reverse_gives_the_bytes(cli, "qwen2-moe", qwen2_moe_hf, tmp_path, ("--use_gmm",), ("--use_gmm",))


@pytest.mark.parametrize("experts", [4, 60])
def test_qwen2_moe_expert_count_comes_from_config_not_64(cli, tmp_path, experts):
    """MindFormers flushes the stack after a hard-coded 64·3 tensors, so Qwen1.5-MoE-A2.7B's 60 experts (or
    any count but 64) are mis-grouped; here config.json's num_experts decides."""
    hf = build(tmp_path / "hf", experts)
    assert forward_ok(cli, "qwen2-moe", hf, tmp_path / "q.ckpt") == expected_ms(experts=experts)
    assert_bin_reverse_gives_the_bytes(cli, "qwen2-moe", hf, tmp_path)


def test_qwen2_moe_python_api(qwen2_moe_hf, tmp_path):
    from models.qwen2_moe.convert_reversed import convert_ms_to_pt
    from models.qwen2_moe.convert_weight import convert_pt_to_ms

    assert convert_pt_to_ms(qwen2_moe_hf, tmp_path / "q.ckpt", dtype="bf16", use_gmm=True)
    assert tensors_of(tmp_path / "q.ckpt")["model.layers.0.feed_forward.routed_experts.ffn.w2.weight"][1] == \
        (E, IM, H)
    assert convert_ms_to_pt(tmp_path / "q.ckpt", tmp_path / "q.bin", use_gmm=True)
    assert_same_tensors(tensors_of(tmp_path / "q.bin"), tensors_of(qwen2_moe_hf))


@example("qwen2-moe")
def qwen2_moe_example(folder, key):
    return build(folder), ()
