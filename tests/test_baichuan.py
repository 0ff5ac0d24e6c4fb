"""baichuan / baichuan2: spec §4.11 — llama names, W_pack split by config.json hidden_size, NormHead raw."""

import json

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of, write_hf

H, V, I, L = 8, 16, 20, 2
BASE = {"model_type": "baichuan", "hidden_size": H, "intermediate_size": I, "num_attention_heads": 2,
        "num_hidden_layers": L, "vocab_size": V, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                                                   "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}}
# Baichuan-7B v1 (rotary, fp32 files with a persistent inv_freq) and Baichuan2-13B (alibi, NormHead, bf16)
MODELS = {
    "baichuan": ({**BASE, "architectures": ["BaiChuanForCausalLM"], "max_position_embeddings": 32,
                  "torch_dtype": "float32"}, torch.float32, True),
    "baichuan2": ({**BASE, "architectures": ["BaichuanForCausalLM"], "model_max_length": 32, "z_loss_weight": 0,
                   "torch_dtype": "bfloat16"}, torch.bfloat16, False),
}


def baichuan_state(dtype, inv_freq: bool, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.W_pack.weight": (3 * H, H), f"{p}.self_attn.o_proj.weight": (H, H),
                       f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.down_proj.weight": (H, I),
                       f"{p}.mlp.up_proj.weight": (I, H), f"{p}.input_layernorm.weight": (H,),
                       f"{p}.post_attention_layernorm.weight": (H,)})
    state = {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}
    if inv_freq:
        for i in range(L):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(2, generator=gen)
    return state


@pytest.fixture(params=sorted(MODELS))
def baichuan_hf(request, tmp_path):
    """(key, HF folder with pytorch_model.bin, as Baichuan ships)."""
    config, dtype, inv_freq = MODELS[request.param]
    return request.param, write_hf(tmp_path / "hf", baichuan_state(dtype, inv_freq), config, fmt="bin")


def expected_ms(dtype: str) -> dict:
    out = {"model.tok_embeddings.embedding_weight": (V, H), "model.norm_out.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}"
        out.update({f"{p}.attention.wq.weight": (H, H), f"{p}.attention.wk.weight": (H, H),
                    f"{p}.attention.wv.weight": (H, H), f"{p}.attention.wo.weight": (H, H),
                    f"{p}.feed_forward.w1.weight": (I, H), f"{p}.feed_forward.w2.weight": (H, I),
                    f"{p}.feed_forward.w3.weight": (I, H), f"{p}.attention_norm.weight": (H,),
                    f"{p}.ffn_norm.weight": (H,)})
    return {n: (dtype, s) for n, s in out.items()}


@pytest.mark.parametrize("flag, dtype", [(None, "F32"), ("fp16", "F16")])
def test_baichuan_forward_names_shapes_and_dtypes(cli, baichuan_hf, tmp_path, flag, dtype):
    key, hf = baichuan_hf
    out = tmp_path / "b.ckpt"
    result = cli("--model", key, "--input_path", hf / "pytorch_model.bin", "--output_path", out,
                 *(["--dtype", flag] if flag else []))
    assert result.code == 0, result.err
    assert {n: (d, s) for n, (d, s, _) in tensors_of(out).items()} == expected_ms(dtype)
    if key == "baichuan":
        assert "left out 2 (rotary inv_freq buffer" in result.out


def test_baichuan_ckpt_loads_in_mindspore(cli, baichuan_hf, tmp_path):
    import mindspore as ms

    key, hf = baichuan_hf
    assert cli("--model", key, "--input_path", hf, "--output_path", tmp_path / "b.ckpt").code == 0
    params = ms.load_checkpoint(str(tmp_path / "b.ckpt"))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected_ms("F32").items()}
    assert {p.dtype for p in params.values()} == {ms.float32}


def test_baichuan_w_pack_is_q_k_v_and_norm_head_copied_raw(cli, baichuan_hf, tmp_path):
    key, hf = baichuan_hf
    config, dtype, inv_freq = MODELS[key]
    out = tmp_path / "b.ckpt"
    assert cli("--model", key, "--input_path", hf, "--output_path", out, "--dtype", "fp32").code == 0
    from mindformers_conv.formats.inputs import open_input

    got, state = open_input(out).refs, baichuan_state(dtype, inv_freq)
    w_pack = state["model.layers.1.self_attn.W_pack.weight"].float()
    for k, part in enumerate(("wq", "wk", "wv")):
        assert torch.equal(got[f"model.layers.1.attention.{part}.weight"].read(), w_pack[k * H:(k + 1) * H])
    head = state["lm_head.weight"].float()
    assert torch.equal(got["lm_head.weight"].read(), head)  # not row-normalised
    assert not torch.allclose(head.norm(dim=1), torch.ones(V))


def test_baichuan_w_pack_split_uses_config_hidden_size_and_refuses_a_contradicting_flag(cli, baichuan_hf, tmp_path):
    """§8: the split size is config.json's hidden_size; --hidden_size fills in when config.json lacks it."""
    key, hf = baichuan_hf
    contradicts = cli("--model", key, "--input_path", hf, "--output_path", tmp_path / "a.ckpt", "--hidden_size", 5)
    assert contradicts.code == 2 and "--hidden_size 5 contradicts config.json" in contradicts.err
    assert cli("--model", key, "--input_path", hf, "--output_path", tmp_path / "a.ckpt", "--hidden_size", H).code == 0
    config = {k: v for k, v in MODELS[key][0].items() if k != "hidden_size"}
    (hf / "config.json").write_text(json.dumps(config))
    assert cli("--model", key, "--input_path", hf, "--output_path", tmp_path / "b.ckpt", "--hidden_size", H).code == 0
    assert_same_tensors(tensors_of(tmp_path / "a.ckpt"), tensors_of(tmp_path / "b.ckpt"))
    missing = cli("--model", key, "--input_path", hf, "--output_path", tmp_path / "c.ckpt")
    assert missing.code == 3 and "hidden_size" in missing.err
    wrong = cli("--model", key, "--input_path", hf, "--output_path", tmp_path / "d.ckpt", "--hidden_size", 5)
    assert wrong.code == 3 and "W_pack" in wrong.err
    assert not any((tmp_path / n).exists() for n in ("c.ckpt", "d.ckpt"))


@pytest.mark.parametrize("cast_to_source", [False, True])
@pytest.mark.parametrize("reverse_out", ["folder", "bin"])
def test_baichuan_round_trip_gives_back_the_hf_bytes(cli, baichuan_hf, tmp_path, reverse_out, cast_to_source):
    key, hf = baichuan_hf
    ckpt = tmp_path / "b.ckpt"
    forward_cast = ["--dtype", "fp32" if key == "baichuan" else "bf16"] if cast_to_source else []
    assert cli("--model", key, "--input_path", hf, "--output_path", ckpt, *forward_cast, "--verify").code == 0
    target = f"{tmp_path}/back/" if reverse_out == "folder" else tmp_path / "back.bin"
    cast = ["--dtype", "bf16"] if key == "baichuan2" and reverse_out == "bin" else []
    assert cli("--model", key, "--reversed", "--input_path", ckpt, "--output_path", target,
               "--config_path", hf, *cast).code == 0
    original = {n: t for n, t in tensors_of(hf).items() if "inv_freq" not in n}
    assert_same_tensors(tensors_of(tmp_path / "back" if reverse_out == "folder" else target), original)


def test_baichuan_python_api_with_bf16(baichuan_hf, tmp_path):
    from models.baichuan.convert_reversed import convert_ms_to_pt
    from models.baichuan.convert_weight import convert_pt_to_ms

    key, hf = baichuan_hf
    assert convert_pt_to_ms(hf / "pytorch_model.bin", tmp_path / "b.ckpt", dtype="bf16")
    assert {d for d, _, _ in tensors_of(tmp_path / "b.ckpt").values()} == {"BF16"}
    assert convert_ms_to_pt(tmp_path / "b.ckpt", tmp_path / "b.bin", dtype="fp32" if key == "baichuan" else None)
    back = tensors_of(tmp_path / "b.bin")
    assert "model.layers.0.self_attn.W_pack.weight" in back and len(back) == 3 + 7 * L


@example("baichuan", "baichuan2")
def baichuan_example(folder, key):
    config, dtype, inv_freq = MODELS[key]
    return write_hf(folder, baichuan_state(dtype, inv_freq), config, fmt="bin"), ()
