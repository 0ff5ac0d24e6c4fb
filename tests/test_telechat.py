"""telechat: spec §4.12 — telechat_7b / telechat_12b key styles, `key_value` kept fused, source dtype kept."""

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of, write_hf

H, NH, I, V, L = 8, 2, 20, 16, 2
CONFIG = {
    "architectures": ["TelechatForCausalLM"], "model_type": "telechat", "hidden_size": H, "n_head": NH,
    "n_layer": L, "ffn_hidden_size": I, "vocab_size": V, "layer_norm_epsilon": 1e-5, "embed_layernorm": False,
    "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": False, "torch_dtype": "float16",
    "auto_map": {"AutoConfig": "configuration_telechat.TelechatConfig",
                 "AutoModelForCausalLM": "modeling_telechat.TelechatForCausalLM"},
}
PREFIX = {"telechat_7b": "", "telechat_12b": "transformer."}


def telechat_state(style: str, dtype=torch.float16, seed=0) -> dict:
    pre = PREFIX[style]
    shapes = {f"{pre}word_embeddings.weight": (V, H), f"{pre}ln_f.weight": (H,)}
    if style == "telechat_12b":
        shapes["lm_head.weight"] = (V, H)
    for i in range(L):
        p = f"{pre}h.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (H,), f"{p}.self_attention.query.weight": (H, H),
                       f"{p}.self_attention.key_value.weight": (2 * H, H),
                       f"{p}.self_attention.dense.weight": (H, H), f"{p}.self_attention.dense.bias": (H,),
                       f"{p}.post_attention_layernorm.weight": (H,), f"{p}.mlp.gate_proj.weight": (I, H),
                       f"{p}.mlp.up_proj.weight": (I, H), f"{p}.mlp.down_proj.weight": (H, I),
                       f"{p}.mlp.down_proj.bias": (H,)})
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}


@pytest.fixture(params=sorted(PREFIX))
def telechat_hf(request, tmp_path):
    """(style, HF folder with pytorch_model.bin, which MindFormers reads directly)."""
    return request.param, write_hf(tmp_path / "hf", telechat_state(request.param), CONFIG, fmt="bin")


def expected_ms(style: str, dtype: str) -> dict:
    out = {"model.tok_embeddings.embedding_weight": (V, H), "model.norm_out.weight": (H,)}
    if style == "telechat_12b":
        out["lm_head.weight"] = (V, H)
    for i in range(L):
        p = f"model.layers.{i}"
        out.update({f"{p}.attention_norm.weight": (H,), f"{p}.attention.wq.weight": (H, H),
                    f"{p}.attention.wk_v.weight": (2 * H, H), f"{p}.attention.wo.weight": (H, H),
                    f"{p}.attention.wo.bias": (H,), f"{p}.ffn_norm.weight": (H,), f"{p}.feed_forward.w1.weight": (I, H),
                    f"{p}.feed_forward.w3.weight": (I, H), f"{p}.feed_forward.w2.weight": (H, I),
                    f"{p}.feed_forward.w2.bias": (H,)})
    return {n: (dtype, s) for n, s in out.items()}


@pytest.mark.parametrize("flag, dtype", [(None, "F16"), ("fp32", "F32")])
def test_telechat_forward_names_shapes_and_dtypes(cli, telechat_hf, tmp_path, flag, dtype):
    style, hf = telechat_hf
    out = tmp_path / "t.ckpt"
    result = cli("--model", "telechat", "--input_path", hf / "pytorch_model.bin", "--output_path", out,
                 "--telechat_type", style, *(["--dtype", flag] if flag else []))
    assert result.code == 0, result.err
    assert {n: (d, s) for n, (d, s, _) in tensors_of(out).items()} == expected_ms(style, dtype)


def test_telechat_12b_layer_keys_convert_where_mindformers_crashes(cli, tmp_path):
    """MindFormers' layer regex admits one leading word, so `transformer.h.{i}.…` raises AttributeError."""
    hf = write_hf(tmp_path / "hf", telechat_state("telechat_12b"), CONFIG, fmt="bin")
    out = tmp_path / "t.ckpt"
    assert cli("--model", "telechat", "--input_path", hf, "--output_path", out, "--telechat_type",
               "telechat_12b").code == 0
    from mindformers_conv.formats.inputs import open_input

    got, state = open_input(out).refs, telechat_state("telechat_12b")
    assert torch.equal(got["model.layers.1.feed_forward.w2.bias"].read(), state["transformer.h.1.mlp.down_proj.bias"])
    assert torch.equal(got["model.tok_embeddings.embedding_weight"].read(),
                       state["transformer.word_embeddings.weight"])


def test_telechat_type_defaults_to_12b_and_must_match_the_keys(cli, tmp_path):
    twelve = write_hf(tmp_path / "hf12", telechat_state("telechat_12b"), CONFIG, fmt="bin")
    assert cli("--model", "telechat", "--input_path", twelve, "--output_path", tmp_path / "a.ckpt").code == 0
    seven = write_hf(tmp_path / "hf7", telechat_state("telechat_7b"), CONFIG, fmt="bin")
    result = cli("--model", "telechat", "--input_path", seven, "--output_path", tmp_path / "b.ckpt")
    assert result.code == 3 and "word_embeddings.weight" in result.err
    assert not (tmp_path / "b.ckpt").exists()


def test_telechat_key_value_copied_as_is_and_ckpt_loads_in_mindspore(cli, telechat_hf, tmp_path):
    import mindspore as ms

    style, hf = telechat_hf
    out = tmp_path / "t.ckpt"
    assert cli("--model", "telechat", "--input_path", hf, "--output_path", out, "--telechat_type", style).code == 0
    params = ms.load_checkpoint(str(out))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected_ms(style, "F16").items()}
    assert {p.dtype for p in params.values()} == {ms.float16}
    kv = telechat_state(style)[f"{PREFIX[style]}h.1.self_attention.key_value.weight"]
    assert torch.equal(torch.from_numpy(params["model.layers.1.attention.wk_v.weight"].asnumpy()), kv)


@pytest.mark.parametrize("dtype", [None, "fp16"])
@pytest.mark.parametrize("reverse_out", ["folder", "bin"])
def test_telechat_round_trip_gives_back_the_hf_bytes(cli, telechat_hf, tmp_path, reverse_out, dtype):
    style, hf = telechat_hf
    ckpt = tmp_path / "t.ckpt"
    assert cli("--model", "telechat", "--input_path", hf, "--output_path", ckpt, "--telechat_type", style,
               *(["--dtype", dtype] if dtype else []), "--verify").code == 0
    target = f"{tmp_path}/back/" if reverse_out == "folder" else tmp_path / "back.bin"
    result = cli("--model", "telechat", "--reversed", "--input_path", ckpt, "--output_path", target,
                 "--telechat_type", style, "--config_path", hf)
    assert result.code == 0, result.err
    assert_same_tensors(tensors_of(tmp_path / "back" if reverse_out == "folder" else target), tensors_of(hf))


def test_telechat_reverse_writes_tensors_not_strings(cli, telechat_hf, tmp_path):
    """MindFormers' reverse stores each layer entry's HF suffix *string* in place of the tensor."""
    style, hf = telechat_hf
    ckpt, back = tmp_path / "t.ckpt", tmp_path / "t.bin"
    assert cli("--model", "telechat", "--input_path", hf, "--output_path", ckpt, "--telechat_type", style).code == 0
    assert cli("--model", "telechat", "--reversed", "--input_path", ckpt, "--output_path", back,
               "--telechat_type", style).code == 0
    state = torch.load(back, weights_only=True)
    assert type(state) is dict and all(isinstance(v, torch.Tensor) for v in state.values())
    original = telechat_state(style)
    assert state.keys() == original.keys()
    assert all(torch.equal(state[n], original[n]) for n in original)


def test_telechat_12b_reverse_keeps_the_transformer_prefix_by_default(cli, tmp_path):
    """MindFormers writes `h.{i}.…` even for telechat_12b; the 12b files are `transformer.h.{i}.…`.
    The CLI's default type is telechat_12b, as in MindFormers."""
    hf = write_hf(tmp_path / "hf", telechat_state("telechat_12b"), CONFIG, fmt="bin")
    ckpt, back = tmp_path / "t.ckpt", tmp_path / "t.bin"
    assert cli("--model", "telechat", "--input_path", hf, "--output_path", ckpt).code == 0
    assert cli("--model", "telechat", "--reversed", "--input_path", ckpt, "--output_path", back).code == 0
    names = set(tensors_of(back))
    assert "transformer.h.0.self_attention.key_value.weight" in names and "transformer.word_embeddings.weight" in names
    assert not any(n.startswith("h.") for n in names)
    seven = tmp_path / "t7.bin"
    assert cli("--model", "telechat", "--reversed", "--input_path", ckpt, "--output_path", seven,
               "--telechat_type", "telechat_7b").code == 0
    names = set(tensors_of(seven))
    assert "h.0.self_attention.key_value.weight" in names and "word_embeddings.weight" in names
    assert "lm_head.weight" in names  # the head keeps its name in either style


@pytest.mark.parametrize("style", sorted(PREFIX))
def test_telechat_python_api_takes_telechat_type(tmp_path, style):
    from models.telechat.convert_reversed import convert_ms_to_pt
    from models.telechat.convert_weight import convert_pt_to_ms

    hf = write_hf(tmp_path / "hf", telechat_state(style, torch.bfloat16), {**CONFIG, "torch_dtype": "bfloat16"},
                  fmt="bin")
    assert convert_pt_to_ms(f"{hf}/", tmp_path / "t.ckpt", telechat_type=style)
    assert {d for d, _, _ in tensors_of(tmp_path / "t.ckpt").values()} == {"BF16"}
    assert convert_ms_to_pt(tmp_path / "t.ckpt", tmp_path / "t.bin", telechat_type=style)
    assert_same_tensors(tensors_of(tmp_path / "t.bin"), tensors_of(hf))


@example("telechat")
def telechat_example(folder, key):
    return write_hf(folder, telechat_state("telechat_12b"), CONFIG, fmt="bin"), ()
