"""MindFormers 2.x mcore (GPTModel) keys: qwen2-mcore, qwen3, qwen3-moe, glm4-mcore, glm4-moe, telechat2-mcore.

Spec: mindformers_other.md §3.3 (weight_mapping tables; fused training layouts: `linear_qkv` grouped per KV
head unless use_contiguous_weight_layout_attention, `linear_fc1` gate/up rows interleaved unless
use_interleaved_weight_layout_mlp is false; GroupedMLP experts weight1 [E·H, 2Fm], weight2 [E·Fm, H]).
Sizes: GQA 4 heads over 2 KV heads with head_dim 12 ≠ hidden 32 / 4 (telechat2: 8, it has no head_dim).
"""

import itertools
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import assert_same_tensors, example, tensors_of, write_hf
from test_qwen2 import forward_ok, logits, reverse_ok, save_tiny
from mindformers_conv.mapping import experts_matrix, grouped_rows

H, I, NH, NKV, HD, V, L, E, FM = 32, 48, 4, 2, 12, 64, 2, 3, 20
SIZES = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
             num_key_value_heads=NKV, head_dim=HD, max_position_embeddings=64, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=FM)
TD = H // NH  # telechat2's head_dim
LAYOUT_FLAGS = ("--use_contiguous_weight_layout_attention", "--use_interleaved_weight_layout_mlp")


def transformers_model(key: str):
    """(model class, config) of a tiny model of `key`."""
    import transformers as t

    return {
        "qwen2-mcore": lambda: (t.Qwen2ForCausalLM, t.Qwen2Config(**SIZES)),
        "qwen3": lambda: (t.Qwen3ForCausalLM, t.Qwen3Config(**SIZES)),
        "qwen3-moe": lambda: (t.Qwen3MoeForCausalLM, t.Qwen3MoeConfig(**SIZES, **MOE, num_experts=E,
                                                                        mlp_only_layers=[0])),
        "glm4-mcore": lambda: (t.Glm4ForCausalLM, t.Glm4Config(**SIZES, pad_token_id=0)),
        "glm4-moe": lambda: (t.Glm4MoeForCausalLM, t.Glm4MoeConfig(
            **SIZES, **MOE, n_routed_experts=E, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
            topk_group=1, use_qk_norm=True, attention_bias=True, pad_token_id=0)),
    }[key]()


def telechat2(folder):
    """TeleChat2's real names (remote code, so written directly); key_value: per KV head k rows then v rows."""
    gen, t = torch.Generator().manual_seed(0), {}
    shapes = {"transformer.word_embeddings.weight": (V, H), "transformer.ln_f.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"transformer.h.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (H,), f"{p}.self_attention.query.weight": (NH * TD, H),
                       f"{p}.self_attention.key_value.weight": (2 * NKV * TD, H),
                       f"{p}.self_attention.dense.weight": (H, NH * TD), f"{p}.self_attention.dense.bias": (H,),
                       f"{p}.post_attention_layernorm.weight": (H,), f"{p}.mlp.gate_proj.weight": (I, H),
                       f"{p}.mlp.up_proj.weight": (I, H), f"{p}.mlp.down_proj.weight": (H, I),
                       f"{p}.mlp.down_proj.bias": (H,)})
    t = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    return write_hf(folder, t, {"model_type": "telechat", "architectures": ["TelechatForCausalLM"],
                                "hidden_size": H, "n_head": NH, "num_key_value_heads": NKV, "n_layer": L,
                                "ffn_hidden_size": I, "vocab_size": V, "torch_dtype": "float32"})


KEYS = ("qwen2-mcore", "qwen3", "qwen3-moe", "glm4-mcore", "glm4-moe", "telechat2-mcore")


@example(*KEYS)
def build(folder, key):
    """The tiny fp32 HF folder of `key` (every parameter random, fixed seed)."""
    if key == "telechat2-mcore":
        return telechat2(folder), ()
    model_class, config = transformers_model(key)
    return save_tiny(folder, model_class, config, dtype=torch.float32), ()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """key → its HF folder, built once for the module."""
    root = tmp_path_factory.mktemp("mcore")
    return {key: build(root / key, key)[0] for key in KEYS}


# ---- names and shapes: spec §3.3 tables for the tiny sizes --------------------------------------------------

def dense(qkv_rows=(NH + 2 * NKV) * HD, proj_in=NH * HD, qkv_bias=False, extra=()) -> dict:
    out = {"embedding.word_embeddings.weight": (V, H), "decoder.final_layernorm.weight": (H,),
           "output_layer.weight": (V, H)}
    for i in range(L):
        p = f"decoder.layers.{i}"
        out.update({f"{p}.input_layernorm.weight": (H,), f"{p}.pre_mlp_layernorm.weight": (H,),
                    f"{p}.self_attention.linear_qkv.weight": (qkv_rows, H),
                    f"{p}.self_attention.linear_proj.weight": (H, proj_in),
                    f"{p}.mlp.linear_fc1.weight": (2 * I, H), f"{p}.mlp.linear_fc2.weight": (H, I)})
        out.update({f"{p}.{name}": shape for name, shape in extra})
        if qkv_bias:
            out[f"{p}.self_attention.linear_qkv.bias"] = (qkv_rows,)
    return out


QK_NORMS = (("self_attention.q_layernorm.weight", (HD,)), ("self_attention.k_layernorm.weight", (HD,)))


def moe_layer_1(names: dict, shared: bool, expert_bias: bool) -> dict:
    """Layer 1 becomes a MoE layer: router, GroupedMLP weight1 [E·H, 2Fm] / weight2 [E·Fm, H], shared experts."""
    p = "decoder.layers.1.mlp"
    out = {n: s for n, s in names.items() if not n.startswith(f"{p}.linear_fc")}
    out.update({f"{p}.router.weight": (E, H), f"{p}.experts.weight1": (E * H, 2 * FM),
                f"{p}.experts.weight2": (E * FM, H)})
    if expert_bias:
        out[f"{p}.router.expert_bias"] = (E,)
    if shared:
        out.update({f"{p}.shared_experts.linear_fc1.weight": (2 * FM, H),
                    f"{p}.shared_experts.linear_fc2.weight": (H, FM)})
    return out


EXPECTED = {
    "qwen2-mcore": dense(qkv_bias=True),
    "qwen3": dense(extra=QK_NORMS),
    "qwen3-moe": moe_layer_1(dense(extra=QK_NORMS), shared=False, expert_bias=False),
    "glm4-mcore": dense(qkv_bias=True, extra=(("post_self_attn_layernorm.weight", (H,)),
                                              ("post_mlp_layernorm.weight", (H,)))),
    "glm4-moe": moe_layer_1(dense(qkv_bias=True, extra=QK_NORMS), shared=True, expert_bias=True),
    "telechat2-mcore": {**dense(qkv_rows=(NH + 2 * NKV) * TD, proj_in=NH * TD),
                        **{f"decoder.layers.{i}.{n}.bias": (H,) for i in range(L)
                           for n in ("self_attention.linear_proj", "mlp.linear_fc2")}},
}


@pytest.mark.parametrize("key", KEYS)
def test_forward_names_shapes_keep_the_source_dtype_and_load_in_mindspore(cli, hf, tmp_path, key):
    import mindspore as ms

    got = forward_ok(cli, key, hf[key], tmp_path / "m.ckpt")
    assert got == {n: ("F32", s) for n, s in EXPECTED[key].items()}
    params = ms.load_checkpoint(str(tmp_path / "m.ckpt"))
    assert {n: (p.dtype, tuple(p.shape)) for n, p in params.items()} == \
        {n: (ms.float32, s) for n, s in EXPECTED[key].items()}


# ---- fused bytes, against a direct torch computation ---------------------------------------------------------

def hf_parts(key: str, state: dict, i: int) -> dict:
    """q, k, v (each {p: tensor}), gate, up (None in a MoE layer) of layer i, from the HF names of `key`."""
    if key == "telechat2-mcore":
        a, m = f"transformer.h.{i}.self_attention", f"transformer.h.{i}.mlp"
        kv = state[f"{a}.key_value.weight"].reshape(NKV, 2, TD, H)  # per KV head: k rows, then v rows
        return {"q": {"weight": state[f"{a}.query.weight"]}, "k": {"weight": kv[:, 0].reshape(-1, H)},
                "v": {"weight": kv[:, 1].reshape(-1, H)}, "gate": state[f"{m}.gate_proj.weight"],
                "up": state[f"{m}.up_proj.weight"], "hd": TD}
    a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
    qkv = {x: {p: state[f"{a}.{x}_proj.{p}"] for p in ("weight", "bias") if f"{a}.{x}_proj.{p}" in state}
           for x in "qkv"}
    gate, up = (state[f"{m}.gate_up_proj.weight"].chunk(2) if key == "glm4-mcore"  # MoE layers have none
                else (state.get(f"{m}.gate_proj.weight"), state.get(f"{m}.up_proj.weight")))
    return {**qkv, "gate": gate, "up": up, "hd": HD}


def expected_linear_qkv(parts: dict, p: str, contiguous: bool) -> torch.Tensor:
    q, k, v, hd = parts["q"][p], parts["k"][p], parts["v"][p], parts["hd"]
    if contiguous:
        return torch.cat([q, k, v])
    rest = q.shape[1:]  # per KV head: its NH/NKV query heads, its k head, its v head
    return torch.cat([q.reshape(NKV, NH // NKV * hd, *rest), k.reshape(NKV, hd, *rest),
                      v.reshape(NKV, hd, *rest)], dim=1).reshape(-1, *rest)


def expected_fc1(gate, up, interleaved: bool) -> torch.Tensor:
    return torch.stack([gate, up], dim=1).reshape(-1, H) if interleaved else torch.cat([gate, up])


@pytest.mark.parametrize("contiguous,interleaved", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("key", KEYS)
def test_fused_layouts_follow_both_switches(cli, hf, tmp_path, key, contiguous, interleaved):
    """Defaults (no flag) are grouped qkv + interleaved fc1; each switch flips its tensor only."""
    import mindspore as ms
    from safetensors.torch import load_file

    flags = [f for f, on in zip(LAYOUT_FLAGS, (contiguous, not interleaved)) if on]
    flags = [x for f in flags for x in (f, "false" if "interleaved" in f else "true")]
    forward_ok(cli, key, hf[key], tmp_path / "m.ckpt", *flags)
    got = {n: torch.from_numpy(p.asnumpy()) for n, p in ms.load_checkpoint(str(tmp_path / "m.ckpt")).items()}
    state = load_file(str(hf[key] / "model.safetensors"))
    for i in range(L):
        parts, p = hf_parts(key, state, i), f"decoder.layers.{i}"
        for x in parts["q"]:
            assert torch.equal(got[f"{p}.self_attention.linear_qkv.{x}"], expected_linear_qkv(parts, x, contiguous))
        if parts["gate"] is not None:
            assert torch.equal(got[f"{p}.mlp.linear_fc1.weight"], expected_fc1(parts["gate"], parts["up"], interleaved))


@pytest.mark.parametrize("key", ["qwen3-moe", "glm4-moe"])
def test_routed_experts_are_gate_up_contiguous_per_expert_and_shared_experts_follow_the_mlp_switch(
        cli, hf, tmp_path, key):
    import mindspore as ms
    from safetensors.torch import load_file

    forward_ok(cli, key, hf[key], tmp_path / "m.ckpt")
    got = {n: torch.from_numpy(p.asnumpy()) for n, p in ms.load_checkpoint(str(tmp_path / "m.ckpt")).items()}
    state, m, p = load_file(str(hf[key] / "model.safetensors")), "model.layers.1.mlp", "decoder.layers.1.mlp"
    expert = [{w: state[f"{m}.experts.{e}.{w}_proj.weight"] for w in ("gate", "up", "down")} for e in range(E)]
    assert torch.equal(got[f"{p}.experts.weight1"], torch.cat([torch.cat([x["gate"], x["up"]]).t() for x in expert]))
    assert torch.equal(got[f"{p}.experts.weight2"], torch.cat([x["down"].t() for x in expert]))
    assert torch.equal(got[f"{p}.router.weight"], state[f"{m}.gate.weight"])
    if key == "glm4-moe":
        assert torch.equal(got[f"{p}.router.expert_bias"], state[f"{m}.gate.e_score_correction_bias"])
        assert torch.equal(got[f"{p}.shared_experts.linear_fc1.weight"],
                           expected_fc1(state[f"{m}.shared_experts.gate_proj.weight"],
                                        state[f"{m}.shared_experts.up_proj.weight"], interleaved=True))


# ---- round trips --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("contiguous,interleaved", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("key", KEYS)
def test_hf_to_mcore_to_hf_gives_back_every_byte(cli, hf, tmp_path, key, contiguous, interleaved):
    flags = [LAYOUT_FLAGS[0], str(contiguous), LAYOUT_FLAGS[1], str(interleaved)]
    ckpt, back = tmp_path / "m.ckpt", tmp_path / "back"
    forward_ok(cli, key, hf[key], ckpt, *flags, "--verify")
    reverse_ok(cli, key, ckpt, f"{back}/", "--config_path", hf[key], *flags)
    assert_same_tensors(tensors_of(back), tensors_of(hf[key]))


@pytest.mark.parametrize("key", KEYS[:-1])  # telechat2 is remote code: no transformers class
def test_reversed_folder_loads_in_transformers_with_equal_logits(cli, hf, tmp_path, key):
    model_class = transformers_model(key)[0]
    ckpt, back = tmp_path / "m.ckpt", tmp_path / "back"
    forward_ok(cli, key, hf[key], ckpt)
    reverse_ok(cli, key, ckpt, f"{back}/", "--config_path", hf[key])
    assert torch.equal(logits(back, model_class), logits(hf[key], model_class))


def test_tied_embedding_writes_no_output_layer_and_comes_back_tied(cli, tmp_path):
    """A tied model (Qwen3-0.6B-like) has no lm_head on disk; mcore shares the embedding, so no output_layer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tied = save_tiny(tmp_path / "hf", Qwen3ForCausalLM, Qwen3Config(**{**SIZES, "tie_word_embeddings": True}),
                     dtype=torch.float32)
    got = forward_ok(cli, "qwen3", tied, tmp_path / "m.ckpt")
    assert got == {n: ("F32", s) for n, s in EXPECTED["qwen3"].items() if n != "output_layer.weight"}
    reverse_ok(cli, "qwen3", tmp_path / "m.ckpt", f"{tmp_path / 'back'}/", "--config_path", tied)
    assert_same_tensors(tensors_of(tmp_path / "back"), tensors_of(tied))
    assert torch.equal(logits(tmp_path / "back", Qwen3ForCausalLM), logits(tied, Qwen3ForCausalLM))


def test_layout_switches_come_from_config_json_and_the_flags_override_it(cli, hf, tmp_path):
    """config.json's TransformerConfig keys choose the layout; an explicit flag wins over them."""
    folder = tmp_path / "hf"
    folder.mkdir()
    config = json.loads((hf["qwen3"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "use_contiguous_weight_layout_attention": True,
                                                    "use_interleaved_weight_layout_mlp": False}))
    (folder / "model.safetensors").symlink_to(hf["qwen3"] / "model.safetensors")
    both = {n: t for n, t in tensors_of(forward_path(cli, folder, tmp_path / "cfg.ckpt")).items()}
    flags = [LAYOUT_FLAGS[0], "true", LAYOUT_FLAGS[1], "false"]
    assert_same_tensors(both, tensors_of(forward_path(cli, hf["qwen3"], tmp_path / "flags.ckpt", *flags)))
    overridden = forward_path(cli, folder, tmp_path / "over.ckpt", LAYOUT_FLAGS[0], "false", LAYOUT_FLAGS[1], "true")
    assert_same_tensors(tensors_of(overridden), tensors_of(forward_path(cli, hf["qwen3"], tmp_path / "d.ckpt")))


def forward_path(cli, source, out, *flags):
    forward_ok(cli, "qwen3", source, out, *flags)
    return out


@pytest.mark.parametrize("key", ["qwen3", "qwen3-moe", "glm4-mcore", "glm4-moe"])
def test_model_auto_picks_the_mcore_key_from_config_json(cli, hf, tmp_path, key):
    result = cli("--model", "auto", "--input_path", hf[key], "--output_path", tmp_path / "m.ckpt", "--dry-run")
    assert result.code == 0 and f"model: {key} (detected from config.json" in result.out, result.out + result.err


def test_model_auto_keeps_qwen2_on_the_legacy_layout(cli, hf, tmp_path):
    result = cli("--model", "auto", "--input_path", hf["qwen2-mcore"], "--output_path", tmp_path / "m.ckpt",
                 "--dry-run")
    assert result.code == 0 and "model: qwen2 (detected from config.json" in result.out, result.out + result.err


def test_model_auto_reverse_of_mcore_names_with_a_qwen2_config_picks_qwen2_mcore(cli, hf, tmp_path):
    """config.json says qwen2 (the legacy key), but the names are mcore ones: the names decide, and say so."""
    ckpt, back = tmp_path / "m.ckpt", tmp_path / "back"
    forward_ok(cli, "qwen2-mcore", hf["qwen2-mcore"], ckpt)
    result = cli("--model", "auto", "--reversed", "--input_path", ckpt, "--output_path", f"{back}/",
                 "--config_path", hf["qwen2-mcore"])
    assert result.code == 0, result.err
    assert "model: qwen2-mcore (detected from the tensor names (config.json model_type 'qwen2'" in result.out
    assert_same_tensors(tensors_of(back), tensors_of(hf["qwen2-mcore"]))


def test_a_missing_expert_projection_is_named(cli, hf, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(hf["qwen3-moe"] / "model.safetensors"))
    del state["model.layers.1.mlp.experts.2.up_proj.weight"]
    folder = write_hf(tmp_path / "hf", state, json.loads((hf["qwen3-moe"] / "config.json").read_text()))
    result = cli("--model", "qwen3-moe", "--input_path", folder, "--output_path", tmp_path / "m.ckpt")
    assert result.code == 3 and "'model.layers.1.mlp.experts.2.up_proj.weight'" in result.err, result.err
    assert not (tmp_path / "m.ckpt").exists()


def test_reversing_experts_without_their_sizes_in_config_json_is_refused(cli, hf, tmp_path):
    """E·Fm rows cannot be told apart without moe_intermediate_size; guessing would scramble every expert."""
    forward_ok(cli, "qwen3-moe", hf["qwen3-moe"], tmp_path / "m.ckpt")
    config = json.loads((hf["qwen3-moe"] / "config.json").read_text())
    del config["moe_intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = cli("--model", "qwen3-moe", "--reversed", "--input_path", tmp_path / "m.ckpt", "--output_path",
                 f"{tmp_path / 'back'}/", "--config_path", tmp_path / "config.json")
    assert result.code == 3 and "config.json has no moe_intermediate_size" in result.err, result.err
    assert not (tmp_path / "back").exists()


# ---- the new ops: each inverts the other way exactly ------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(experts=st.integers(1, 4), parts=st.integers(1, 2), out=st.integers(1, 5), inner=st.integers(1, 5))
def test_experts_matrix_round_trips(experts, parts, out, inner):
    op = experts_matrix(parts, lambda cfg: inner)
    xs = list(torch.randn(parts * experts, out, inner).unbind(0))
    (fused,) = op.forward(xs, {})
    assert fused.shape == (experts * inner, parts * out)
    assert all(torch.equal(a, b) for a, b in zip(op.backward([fused], {}), xs, strict=True))


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 4), sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3), cols=st.integers(0, 3))
def test_grouped_rows_round_trips(groups, sizes, cols):
    op = grouped_rows(lambda cfg: (groups, sizes))
    x = torch.randn(groups * sum(sizes), *([cols] if cols else []))
    parts = op.forward([x], {})
    assert [p.shape[0] for p in parts] == [groups * s for s in sizes]
    assert torch.equal(op.backward(parts, {})[0], x)


def test_fp32_router_bias_of_a_bf16_model_comes_back_fp32(cli, tmp_path):
    """GLM-4.5 / DeepSeek-V3 store `e_score_correction_bias` in Float32 beside bf16 weights: a reverse to a HF
    folder takes config.json's bf16 for the rest but keeps that bias Float32, so the bytes come back."""
    model_class, config = transformers_model("glm4-moe")
    from safetensors.torch import load_file

    bf16 = save_tiny(tmp_path / "hf", model_class, config, dtype=torch.bfloat16)
    state = load_file(str(bf16 / "model.safetensors"))
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    state[bias] = torch.randn(E, generator=torch.Generator().manual_seed(5))  # fp32, as on the hub
    source = write_hf(tmp_path / "mixed", state, json.loads((bf16 / "config.json").read_text()))
    ckpt, back = tmp_path / "m.ckpt", tmp_path / "back"
    forward_ok(cli, "glm4-moe", source, ckpt)
    reverse_ok(cli, "glm4-moe", ckpt, f"{back}/", "--config_path", source)
    assert tensors_of(back)[bias][0] == "F32"
    assert_same_tensors(tensors_of(back), tensors_of(source))


def test_mindspore_to_mindspore_keeps_a_bf16_router_bias_bf16(cli, hf, tmp_path):
    """The hub's Float32 router bias is a HF-file matter: re-laying out a MindSpore checkpoint keeps dtypes."""
    cast, again = tmp_path / "bf16.ckpt", tmp_path / "again.ckpt"
    forward_ok(cli, "glm4-moe", hf["glm4-moe"], cast, "--dtype", "bf16")
    result = cli("--model", "glm4-moe", "--input_path", cast, "--output_path", again, "--config_path", hf["glm4-moe"])
    assert result.code == 0, result.err
    assert tensors_of(again)["decoder.layers.1.mlp.router.expert_bias"][0] == "BF16"
    assert_same_tensors(tensors_of(again), tensors_of(cast))
