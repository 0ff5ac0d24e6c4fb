"""deepseek2 (DeepSeek-V2, MLA + MoE): spec §4.4 — names, stacked experts, fp32 norms/router, bf16 rest."""

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import assert_same_tensors, example, tensors_of, write_hf

H, V, NH, QL, KVL, NOPE, ROPE, VD, I, IM, E, SHARED, L = 16, 32, 2, 12, 8, 4, 2, 4, 24, 6, 4, 2, 2
CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
    "hidden_size": H, "intermediate_size": I, "moe_intermediate_size": IM, "n_routed_experts": E,
    "n_shared_experts": SHARED, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "kv_lora_rank": KVL, "q_lora_rank": QL, "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE, "v_head_dim": VD,
    "num_attention_heads": NH, "num_key_value_heads": NH, "num_hidden_layers": L, "vocab_size": V,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    "norm_topk_prob": False, "aux_loss_alpha": 0.001, "seq_aux": True, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LITE = {**CONFIG, "q_lora_rank": None}  # DeepSeek-V2-Lite: a plain q_proj


def deepseek2_state(lite=False, experts=E, seed=0) -> dict:
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        a = f"model.layers.{i}.self_attn"
        if lite:
            shapes[f"{a}.q_proj.weight"] = (NH * (NOPE + ROPE), H)
        else:
            shapes.update({f"{a}.q_a_proj.weight": (QL, H), f"{a}.q_a_layernorm.weight": (QL,),
                           f"{a}.q_b_proj.weight": (NH * (NOPE + ROPE), QL)})
        shapes.update({f"{a}.kv_a_proj_with_mqa.weight": (KVL + ROPE, H), f"{a}.kv_a_layernorm.weight": (KVL,),
                       f"{a}.kv_b_proj.weight": (NH * (NOPE + VD), KVL), f"{a}.o_proj.weight": (H, NH * VD),
                       f"model.layers.{i}.input_layernorm.weight": (H,),
                       f"model.layers.{i}.post_attention_layernorm.weight": (H,)})
    m = "model.layers.0.mlp"  # dense (first_k_dense_replace = 1)
    shapes.update({f"{m}.gate_proj.weight": (I, H), f"{m}.up_proj.weight": (I, H), f"{m}.down_proj.weight": (H, I)})
    m = "model.layers.1.mlp"
    for e in range(experts):
        shapes.update({f"{m}.experts.{e}.gate_proj.weight": (IM, H), f"{m}.experts.{e}.up_proj.weight": (IM, H),
                       f"{m}.experts.{e}.down_proj.weight": (H, IM)})
    shapes.update({f"{m}.gate.weight": (experts, H), f"{m}.shared_experts.gate_proj.weight": (SHARED * IM, H),
                   f"{m}.shared_experts.up_proj.weight": (SHARED * IM, H),
                   f"{m}.shared_experts.down_proj.weight": (H, SHARED * IM)})
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in shapes.items()}


@pytest.fixture(params=["v2", "lite"])
def deepseek2_hf(request, tmp_path):
    """(lite?, HF folder)."""
    lite = request.param == "lite"
    return lite, write_hf(tmp_path / "hf", deepseek2_state(lite), LITE if lite else CONFIG)


def expected_ms(lite: bool, gmm: bool = False, dtype: str | None = None) -> dict:
    """Spec §4.4: norms and router Float32, everything else BFloat16 (without --dtype)."""
    bf, f32 = dtype or "BF16", dtype or "F32"
    out = {"model.tok_embeddings.embedding_weight": (bf, (V, H)), "model.norm_out.weight": (f32, (H,)),
           "lm_head.weight": (bf, (V, H))}
    for i in range(L):
        a = f"model.layers.{i}.attention"
        if lite:
            out[f"{a}.q_proj.weight"] = (bf, (NH * (NOPE + ROPE), H))
        else:
            out.update({f"{a}.q2l_proj.weight": (bf, (QL, H)), f"{a}.lq_norm.weight": (f32, (QL,)),
                        f"{a}.l2q_proj.weight": (bf, (NH * (NOPE + ROPE), QL))})
        out.update({f"{a}.kv2l.weight": (bf, (KVL + ROPE, H)), f"{a}.lkv_norm.weight": (f32, (KVL,)),
                    f"{a}.lkv2kv.weight": (bf, (NH * (NOPE + VD), KVL)), f"{a}.wo.weight": (bf, (H, NH * VD)),
                    f"model.layers.{i}.attention_norm.weight": (f32, (H,)),
                    f"model.layers.{i}.ffn_norm.weight": (f32, (H,))})
    f = "model.layers.0.feed_forward"
    out.update({f"{f}.w1.weight": (bf, (I, H)), f"{f}.w3.weight": (bf, (I, H)), f"{f}.w2.weight": (bf, (H, I))})
    f = "model.layers.1.feed_forward"
    up, down = ((E, H, IM), (E, IM, H)) if gmm else ((E, IM, H), (E, H, IM))
    out.update({f"{f}.routed_experts.ffn.w1.weight": (bf, up), f"{f}.routed_experts.ffn.w3.weight": (bf, up),
                f"{f}.routed_experts.ffn.w2.weight": (bf, down),
                f"{f}.routed_experts.router.dense.weight": (f32, (E, H)),
                f"{f}.shared_experts.w1.weight": (bf, (SHARED * IM, H)),
                f"{f}.shared_experts.w3.weight": (bf, (SHARED * IM, H)),
                f"{f}.shared_experts.w2.weight": (bf, (H, SHARED * IM))})
    return out


@pytest.mark.parametrize("gmm", [False, True])
@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_deepseek2_forward_names_shapes_and_dtypes(cli, deepseek2_hf, tmp_path, gmm, dtype):
    """V2-Lite's q_proj included (MindFormers v1.3.2 has no rule for it; v1.5.0 maps it to attention.q_proj)."""
    lite, hf = deepseek2_hf
    out = tmp_path / "d.ckpt"
    result = cli("--model", "deepseek2", "--input_path", hf, "--output_path", out,
                 *(["--use_gmm"] if gmm else []), *(["--dtype", dtype] if dtype else []))
    assert result.code == 0, result.err
    got = {n: (d, s) for n, (d, s, _) in tensors_of(out).items()}
    assert got == expected_ms(lite, gmm, "F16" if dtype else None)


@pytest.mark.parametrize("gmm", [False, True])
def test_deepseek2_experts_stacked_in_expert_order(cli, deepseek2_hf, tmp_path, gmm):
    lite, hf = deepseek2_hf
    out = tmp_path / "d.ckpt"
    assert cli("--model", "deepseek2", "--input_path", hf, "--output_path", out,
               *(["--use_gmm"] if gmm else [])).code == 0
    from mindformers_conv.formats.inputs import open_input

    got, state = open_input(out).refs, deepseek2_state(lite)
    for ms_w, hf_w in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
        stacked = got[f"model.layers.1.feed_forward.routed_experts.ffn.{ms_w}.weight"].read()
        for e in range(E):
            expert = state[f"model.layers.1.mlp.experts.{e}.{hf_w}.weight"]
            assert torch.equal(stacked[e], expert.t() if gmm else expert)
    router = got["model.layers.1.feed_forward.routed_experts.router.dense.weight"].read()
    assert router.dtype == torch.float32 and torch.equal(router, state["model.layers.1.mlp.gate.weight"].float())


def test_deepseek2_v2_lite_q_proj_maps_to_attention_q_proj(cli, tmp_path):
    """v1.3.2 has no rule for `self_attn.q_proj` (V2-Lite, q_lora_rank null); v1.5.0 maps it to `attention.q_proj`."""
    hf = write_hf(tmp_path / "hf", deepseek2_state(lite=True), LITE)
    out = tmp_path / "d.ckpt"
    assert cli("--model", "deepseek2", "--input_path", hf, "--output_path", out).code == 0
    from mindformers_conv.formats.inputs import open_input

    q = open_input(out).refs["model.layers.1.attention.q_proj.weight"].read()
    assert torch.equal(q, deepseek2_state(lite=True)["model.layers.1.self_attn.q_proj.weight"])


def test_deepseek2_ckpt_loads_in_mindspore(cli, deepseek2_hf, tmp_path):
    import mindspore as ms

    lite, hf = deepseek2_hf
    out = tmp_path / "d.ckpt"
    assert cli("--model", "deepseek2", "--input_path", hf, "--output_path", out).code == 0
    params = ms.load_checkpoint(str(out))
    names = {"F32": ms.float32, "BF16": ms.bfloat16}
    assert {n: (p.dtype, tuple(p.shape)) for n, p in params.items()} == \
        {n: (names[d], s) for n, (d, s) in expected_ms(lite).items()}


@pytest.mark.parametrize("flags", [(), ("--use_gmm",), ("--dtype", "bf16")])
@pytest.mark.parametrize("reverse_out", ["folder", "bin"])
def test_deepseek2_round_trip_gives_back_the_hf_bytes(cli, deepseek2_hf, tmp_path, flags, reverse_out):
    """MindFormers has no deepseek2 reverse; ours is the exact inverse (gmm included)."""
    lite, hf = deepseek2_hf
    ckpt = tmp_path / "d.ckpt"
    assert cli("--model", "deepseek2", "--input_path", hf, "--output_path", ckpt, *flags, "--verify").code == 0
    target = f"{tmp_path}/back/" if reverse_out == "folder" else tmp_path / "back.bin"
    gmm = [f for f in flags if f == "--use_gmm"]
    cast = ["--dtype", "bf16"] if reverse_out == "bin" else []  # a .bin keeps the fp32 norms otherwise
    result = cli("--model", "deepseek2", "--reversed", "--input_path", ckpt, "--output_path", target,
                 "--config_path", hf, *gmm, *cast)
    assert result.code == 0, result.err
    assert_same_tensors(tensors_of(tmp_path / "back" if reverse_out == "folder" else target), tensors_of(hf))


def test_deepseek2_expert_count_comes_from_config_not_160(cli, tmp_path):
    """MindFormers v1.3.2 flushes the expert stack after a hard-coded 3·160 tensors."""
    hf = write_hf(tmp_path / "hf", deepseek2_state(experts=3), {**CONFIG, "n_routed_experts": 3})
    out = tmp_path / "d.ckpt"
    assert cli("--model", "deepseek2", "--input_path", hf, "--output_path", out).code == 0
    assert tensors_of(out)["model.layers.1.feed_forward.routed_experts.ffn.w1.weight"][1] == (3, IM, H)

    (hf / "config.json").write_text(json.dumps({**CONFIG, "n_routed_experts": 5}))  # experts 3, 4 missing
    short = cli("--model", "deepseek2", "--input_path", hf, "--output_path", tmp_path / "a.ckpt")
    assert short.code == 3 and "experts.3." in short.err and "does not have" in short.err
    (hf / "config.json").write_text(json.dumps({**CONFIG, "n_routed_experts": 2}))  # one too many
    extra = cli("--model", "deepseek2", "--input_path", hf, "--output_path", tmp_path / "b.ckpt")
    assert extra.code == 3 and "2 experts" in extra.err
    assert not (tmp_path / "a.ckpt").exists() and not (tmp_path / "b.ckpt").exists()


def test_deepseek2_python_api_with_use_gmm(deepseek2_hf, tmp_path):
    from models.deepseek2.convert_reversed import convert_ms_to_pt
    from models.deepseek2.convert_weight import convert_pt_to_ms

    lite, hf = deepseek2_hf
    assert convert_pt_to_ms(hf, tmp_path / "d.ckpt", use_gmm=True)
    got = tensors_of(tmp_path / "d.ckpt")
    assert got["model.layers.1.feed_forward.routed_experts.ffn.w1.weight"][1] == (E, H, IM)
    assert convert_ms_to_pt(tmp_path / "d.ckpt", tmp_path / "d.bin", dtype="bf16", use_gmm=True)
    assert_same_tensors(tensors_of(tmp_path / "d.bin"), tensors_of(hf))


@pytest.mark.parametrize("forward_gmm, reverse_gmm", [(False, True), (True, False)])
def test_deepseek2_reverse_refuses_experts_of_the_other_layout(cli, tmp_path, forward_gmm, reverse_gmm):
    """[E, out, in] and [E, in, out] differ only in shape: a wrong --use_gmm would transpose every expert."""
    hf = write_hf(tmp_path / "hf", deepseek2_state(), CONFIG)
    ckpt = tmp_path / "d.ckpt"
    assert cli("--model", "deepseek2", "--input_path", hf, "--output_path", ckpt,
               *(["--use_gmm"] if forward_gmm else [])).code == 0
    result = cli("--model", "deepseek2", "--reversed", "--input_path", ckpt, "--output_path", tmp_path / "b.bin",
                 "--config_path", hf, *(["--use_gmm"] if reverse_gmm else []))
    assert result.code == 3 and "--use_gmm" in result.err and "routed_experts.ffn.w" in result.err
    assert not (tmp_path / "b.bin").exists()


@settings(max_examples=30, deadline=None)
@given(e=st.integers(1, 4), rows=st.integers(1, 5), cols=st.integers(1, 5), axis=st.sampled_from([1, 2]),
       seed=st.integers(0, 1000))
def test_hidden_at_op_is_an_identity_that_checks_the_hidden_axis(e, rows, cols, axis, seed):
    """Forward then backward gives the input back; a stack in the other layout is refused."""
    from mindformers_conv.mapping import hidden_at

    x = torch.randn((e, rows, cols), generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    op, cfg = hidden_at(axis), {"hidden_size": x.shape[axis]}
    (y,) = op.forward([x], cfg)
    (back,) = op.backward([y], cfg)
    assert back is x and y is x
    assert op.forward([x], {})[0] is x  # no hidden_size known: nothing to check
    with pytest.raises(ValueError, match="hidden_size"):
        op.backward([x], {"hidden_size": x.shape[axis] + 1})


@pytest.mark.parametrize("evidence", ["config", "names"])
def test_deepseek_key_picks_the_v2_layout_from_the_input(cli, deepseek2_hf, tmp_path, evidence):
    """The guide's `--model deepseek` covers DeepSeek-V2: the input decides, and the CLI says so."""
    _, hf = deepseek2_hf
    if evidence == "names":
        (hf / "config.json").unlink()
    out = tmp_path / "ds.ckpt"
    result = cli("--model", "deepseek", "--input_path", hf, "--output_path", out)
    assert result.code == 0, result.err
    assert "model: deepseek2 (--model deepseek: deepseek2 layout" in result.out
    assert any(".feed_forward.routed_experts.ffn.w1.weight" in name for name in tensors_of(out))


@example("deepseek2")
def deepseek2_example(folder, key):
    return write_hf(folder, deepseek2_state(), CONFIG), ()  # bf16; norms and router come back from F32
