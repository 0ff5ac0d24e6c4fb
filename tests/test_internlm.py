"""internlm (§4.9: llama names with q/k/v/o biases) and internlm2 (§4.10: grouped `wqkv`, `output` head)."""

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of, write_hf

V, L = 16, 2


def random_state(shapes: dict, dtype, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}


def read_ckpt(path) -> dict:
    from mindformers_conv.formats.inputs import open_input

    return {n: r.read() for n, r in open_input(path).refs.items()}


# --- internlm (InternLM-7B style: fp16 pytorch_model.bin, bias: true, a persistent rotary inv_freq) --------

H1, I1 = 8, 20
INTERNLM_CONFIG = {
    "architectures": ["InternLMForCausalLM"], "model_type": "internlm", "bias": True, "hidden_act": "silu",
    "hidden_size": H1, "intermediate_size": I1, "num_attention_heads": 2, "num_hidden_layers": L,
    "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "vocab_size": V, "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "auto_map": {"AutoConfig": "configuration_internlm.InternLMConfig",
                 "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
}


def internlm_state() -> dict:
    shapes = {"model.embed_tokens.weight": (V, H1), "model.norm.weight": (H1,), "lm_head.weight": (V, H1)}
    for i in range(L):
        p = f"model.layers.{i}"
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}.self_attn.{proj}_proj.weight"] = (H1, H1)
            shapes[f"{p}.self_attn.{proj}_proj.bias"] = (H1,)
        shapes.update({f"{p}.mlp.gate_proj.weight": (I1, H1), f"{p}.mlp.down_proj.weight": (H1, I1),
                       f"{p}.mlp.up_proj.weight": (I1, H1), f"{p}.input_layernorm.weight": (H1,),
                       f"{p}.post_attention_layernorm.weight": (H1,), f"{p}.self_attn.rotary_emb.inv_freq": (2,)})
    state = random_state(shapes, torch.float16)
    return {n: t.float() if n.endswith("inv_freq") else t for n, t in state.items()}


@pytest.fixture
def internlm_hf(tmp_path):
    return write_hf(tmp_path / "internlm_hf", internlm_state(), INTERNLM_CONFIG, fmt="bin")


def internlm_expected(dtype: str) -> dict:
    out = {"model.tok_embeddings.embedding_weight": (V, H1), "model.norm_out.weight": (H1,),
           "lm_head.weight": (V, H1)}
    for i in range(L):
        p = f"model.layers.{i}"
        for w in ("wq", "wk", "wv", "wo"):
            out[f"{p}.attention.{w}.weight"] = (H1, H1)
            out[f"{p}.attention.{w}.bias"] = (H1,)
        out.update({f"{p}.feed_forward.w1.weight": (I1, H1), f"{p}.feed_forward.w2.weight": (H1, I1),
                    f"{p}.feed_forward.w3.weight": (I1, H1), f"{p}.attention_norm.weight": (H1,),
                    f"{p}.ffn_norm.weight": (H1,)})
    return {n: (dtype, s) for n, s in out.items()}


@pytest.mark.parametrize("flag, dtype", [(None, "F32"), ("bf16", "BF16"), ("fp16", "F16")])
def test_internlm_forward_names_shapes_and_dtypes(cli, internlm_hf, tmp_path, flag, dtype):
    out = tmp_path / "i.ckpt"
    result = cli("--model", "internlm", "--input_path", internlm_hf, "--output_path", out,
                 *(["--dtype", flag] if flag else []))
    assert result.code == 0, result.err
    assert {n: (d, s) for n, (d, s, _) in tensors_of(out).items()} == internlm_expected(dtype)
    assert "left out 2 (rotary inv_freq buffer" in result.out


@pytest.mark.parametrize("dtype", [None, "fp16"])
@pytest.mark.parametrize("reverse_out", ["folder", "bin"])
def test_internlm_round_trip_gives_back_the_hf_bytes(cli, internlm_hf, tmp_path, reverse_out, dtype):
    ckpt = tmp_path / "i.ckpt"
    assert cli("--model", "internlm", "--input_path", internlm_hf, "--output_path", ckpt,
               *(["--dtype", dtype] if dtype else []), "--verify").code == 0
    target = f"{tmp_path}/back/" if reverse_out == "folder" else tmp_path / "back.bin"
    cast = ["--dtype", "fp16"] if reverse_out == "bin" else []
    assert cli("--model", "internlm", "--reversed", "--input_path", ckpt, "--output_path", target,
               "--config_path", internlm_hf, *cast).code == 0
    original = {n: t for n, t in tensors_of(internlm_hf).items() if not n.endswith("inv_freq")}
    assert_same_tensors(tensors_of(tmp_path / "back" if reverse_out == "folder" else target), original)


# --- internlm2 (GQA: 4 heads over 2 KV heads of head_dim 4; bf16 safetensors) --------------------------

H2, I2, NH, NKV, HD = 16, 24, 4, 2, 4
QKV_ROWS = NKV * (NH // NKV + 2) * HD  # 32
INTERNLM2_CONFIG = {
    "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False, "hidden_act": "silu",
    "hidden_size": H2, "intermediate_size": I2, "num_attention_heads": NH, "num_key_value_heads": NKV,
    "num_hidden_layers": L, "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
    "vocab_size": V, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attn_implementation": "eager",
    "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                 "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
}


def internlm2_state() -> dict:
    shapes = {"model.tok_embeddings.weight": (V, H2), "model.norm.weight": (H2,), "output.weight": (V, H2)}
    for i in range(L):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.attention.wqkv.weight": (QKV_ROWS, H2), f"{p}.attention.wo.weight": (H2, H2),
                       f"{p}.feed_forward.w1.weight": (I2, H2), f"{p}.feed_forward.w3.weight": (I2, H2),
                       f"{p}.feed_forward.w2.weight": (H2, I2), f"{p}.attention_norm.weight": (H2,),
                       f"{p}.ffn_norm.weight": (H2,)})
    return random_state(shapes, torch.bfloat16)


@pytest.fixture
def internlm2_hf(tmp_path):
    return write_hf(tmp_path / "internlm2_hf", internlm2_state(), INTERNLM2_CONFIG)


def internlm2_expected(fused: bool, dtype: str = "F32") -> dict:
    out = {"model.tok_embeddings.embedding_weight": (V, H2), "model.norm_out.weight": (H2,),
           "lm_head.weight": (V, H2)}
    for i in range(L):
        p = f"model.layers.{i}"
        if fused:
            out[f"{p}.attention.w.weight"] = (QKV_ROWS, H2)
        else:
            out.update({f"{p}.attention.wq.weight": (NH * HD, H2), f"{p}.attention.wk.weight": (NKV * HD, H2),
                        f"{p}.attention.wv.weight": (NKV * HD, H2)})
        out.update({f"{p}.attention.wo.weight": (H2, H2), f"{p}.feed_forward.w1.weight": (I2, H2),
                    f"{p}.feed_forward.w3.weight": (I2, H2), f"{p}.feed_forward.w2.weight": (H2, I2),
                    f"{p}.attention_norm.weight": (H2,), f"{p}.ffn_norm.weight": (H2,)})
    return {n: (dtype, s) for n, s in out.items()}


# (CLI flags, fused?): split unless --qkv_concat (MindFormers ≥ v1.4.0-beta1 default; see the declaration)
QKV_FLAGS = [((), False), (("--qkv_concat", "false"), False), (("--qkv_concat",), True),
             (("--qkv_concat", "true"), True)]


@pytest.mark.parametrize("flags, fused", QKV_FLAGS)
def test_internlm2_forward_names_shapes_and_dtypes(cli, internlm2_hf, tmp_path, flags, fused):
    out = tmp_path / "i2.ckpt"
    result = cli("--model", "internlm2", "--input_path", internlm2_hf, "--output_path", out, *flags)
    assert result.code == 0, result.err
    assert {n: (d, s) for n, (d, s, _) in tensors_of(out).items()} == internlm2_expected(fused)


def test_internlm2_default_splits_wqkv_as_the_shipped_yaml_expects(cli, internlm2_hf, tmp_path):
    """v1.3.2's bare command keeps `attention.w.weight`, which its own yamls (`qkv_concat: False`) do not
    load; the default here is split wq/wk/wv (MindFormers' default from v1.4.0-beta1), --qkv_concat fuses."""
    out = tmp_path / "i2.ckpt"
    assert cli("--model", "internlm2", "--input_path", internlm2_hf, "--output_path", out).code == 0
    names = set(tensors_of(out))
    assert {"model.layers.0.attention.wq.weight", "model.layers.0.attention.wk.weight",
            "model.layers.0.attention.wv.weight"} <= names
    assert not any(".attention.w.weight" in n for n in names)


def test_internlm2_split_takes_q_k_v_rows_of_each_kv_group(cli, internlm2_hf, tmp_path):
    """wqkv rows per KV group: g·hd query rows, hd key rows, hd value rows (spec §4.10, 3)."""
    out = tmp_path / "i2.ckpt"
    assert cli("--model", "internlm2", "--input_path", internlm2_hf, "--output_path", out, "--dtype", "bf16").code == 0
    got, wqkv = read_ckpt(out), internlm2_state()["model.layers.1.attention.wqkv.weight"]
    assert torch.equal(got["model.layers.1.attention.wq.weight"], torch.cat([wqkv[0:8], wqkv[16:24]]))
    assert torch.equal(got["model.layers.1.attention.wk.weight"], torch.cat([wqkv[8:12], wqkv[24:28]]))
    assert torch.equal(got["model.layers.1.attention.wv.weight"], torch.cat([wqkv[12:16], wqkv[28:32]]))


@pytest.mark.parametrize("flags", [(), ("--qkv_concat",)])
def test_internlm_ckpt_loads_in_mindspore(cli, internlm_hf, internlm2_hf, tmp_path, flags):
    import mindspore as ms

    cases = [("internlm2", internlm2_hf, internlm2_expected(bool(flags)))]
    if not flags:  # internlm (v1) is llama's declaration: --qkv_concat fuses it as llama (tests/test_llama_fused.py)
        cases.append(("internlm", internlm_hf, internlm_expected("F32")))
    for key, hf, expected in cases:
        out = tmp_path / f"{key}.ckpt"
        assert cli("--model", key, "--input_path", hf, "--output_path", out, *flags).code == 0
        params = ms.load_checkpoint(str(out))
        assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected.items()}
        assert {p.dtype for p in params.values()} == {ms.float32}


@pytest.mark.parametrize("forward_flags", [(), ("--qkv_concat",)])
@pytest.mark.parametrize("reverse_flags", [(), ("--qkv_concat",)])
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_internlm2_round_trip_gives_back_the_hf_bytes(cli, internlm2_hf, tmp_path, forward_flags, reverse_flags,
                                                      dtype):
    """Either MS layout converts back, whatever --qkv_concat says in the reverse."""
    ckpt = tmp_path / "i2.ckpt"
    cast = ["--dtype", dtype] if dtype else []
    assert cli("--model", "internlm2", "--input_path", internlm2_hf, "--output_path", ckpt, *forward_flags, *cast,
               "--verify").code == 0
    result = cli("--model", "internlm2", "--reversed", "--input_path", ckpt, "--output_path", f"{tmp_path}/back/",
                 "--config_path", internlm2_hf, *reverse_flags)
    assert result.code == 0, result.err
    assert_same_tensors(tensors_of(tmp_path / "back"), tensors_of(internlm2_hf))


@pytest.mark.parametrize("flags", [(), ("--qkv_concat",)])
def test_internlm2_reverse_restores_hf_names_not_every_w_replaced(cli, internlm2_hf, tmp_path, flags):
    """MindFormers v1.3.2's reverse replaces every `w` by `wqkv` (`attention.wqkvo.wqkveight`, `output.wqkveight`)
    and never re-merges a split wq/wk/wv; ours gives back exactly the HF names, with `wqkv` re-fused."""
    ckpt, back = tmp_path / "i2.ckpt", tmp_path / "back.bin"
    assert cli("--model", "internlm2", "--input_path", internlm2_hf, "--output_path", ckpt, "--dtype", "bf16",
               *flags).code == 0
    assert cli("--model", "internlm2", "--reversed", "--input_path", ckpt, "--output_path", back,
               "--config_path", internlm2_hf / "config.json").code == 0
    got = tensors_of(back)
    assert sorted(got) == sorted(internlm2_state())
    assert "output.weight" in got and "model.layers.0.attention.wo.weight" in got
    assert_same_tensors(got, tensors_of(internlm2_hf))


def test_internlm2_needs_the_kv_heads_of_config_json(cli, internlm2_hf, tmp_path):
    (internlm2_hf / "config.json").unlink()
    result = cli("--model", "internlm2", "--input_path", internlm2_hf, "--output_path", tmp_path / "x.ckpt",
                 "--n_head", NH, "--hidden_size", H2)
    assert result.code == 3 and "wqkv" in result.err
    assert not (tmp_path / "x.ckpt").exists()
    fused = cli("--model", "internlm2", "--input_path", internlm2_hf, "--output_path", tmp_path / "y.ckpt",
                "--qkv_concat")
    assert fused.code == 0  # keeping wqkv fused needs no sizes


def test_internlm2_reverse_of_split_wq_wk_wv_needs_the_config(cli, internlm2_hf, tmp_path):
    ckpt = tmp_path / "i2.ckpt"
    assert cli("--model", "internlm2", "--input_path", internlm2_hf, "--output_path", ckpt).code == 0
    result = cli("--model", "internlm2", "--reversed", "--input_path", ckpt, "--output_path", tmp_path / "b.bin")
    assert result.code == 2 and "--config_path" in result.err  # usage: the sizes must be given
    assert not (tmp_path / "b.bin").exists()


@pytest.mark.parametrize("qkv_concat", [False, True])
def test_internlm2_python_api_takes_qkv_concat(internlm2_hf, tmp_path, qkv_concat):
    from models.internlm2.convert_reversed import convert_ms_to_pt
    from models.internlm2.convert_weight import convert_pt_to_ms

    assert convert_pt_to_ms(internlm2_hf, tmp_path / "i2.ckpt", dtype="bf16", qkv_concat=qkv_concat)
    assert ("model.layers.0.attention.w.weight" in tensors_of(tmp_path / "i2.ckpt")) == qkv_concat
    assert convert_ms_to_pt(tmp_path / "i2.ckpt", tmp_path / "i2.bin", config_path=internlm2_hf)
    assert_same_tensors(tensors_of(tmp_path / "i2.bin"), tensors_of(internlm2_hf))


def test_internlm_python_api(internlm_hf, tmp_path):
    from models.internlm.convert_reversed import convert_ms_to_pt
    from models.internlm.convert_weight import convert_pt_to_ms

    assert convert_pt_to_ms(internlm_hf / "pytorch_model.bin", tmp_path / "i.ckpt", dtype="fp16")
    assert convert_ms_to_pt(tmp_path / "i.ckpt", tmp_path / "i.bin")
    original = {n: t for n, t in tensors_of(internlm_hf).items() if not n.endswith("inv_freq")}
    assert_same_tensors(tensors_of(tmp_path / "i.bin"), original)


@example("internlm2")
def internlm2_example(folder, key):
    return write_hf(folder, internlm2_state(), INTERNLM2_CONFIG), ()
