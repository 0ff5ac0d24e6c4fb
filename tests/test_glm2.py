"""glm-n / glm4 (ChatGLM2/3, GLM-4): spec §2.2 — one rename at v1.3.2, HEAD's split and rope switches,
and the GLM4 reverse permutation bug (§5.5)."""

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import assert_same_tensors, example, tensors_of, write_hf
from test_gpt import assert_loads_in_mindspore, names_shapes, round_trip

H, NH, D, G, F, V, L = 32, 4, 8, 2, 48, 40, 2
Q, KV = NH * D, G * D
VARIANTS = {  # key → config.json extras of the checkpoint it is named for
    "glm-n": {"torch_dtype": "float16", "seq_length": 32768, "_name_or_path": "THUDM/chatglm2-6b"},
    "glm4": {"torch_dtype": "bfloat16", "rope_ratio": 500, "tie_word_embeddings": False,
             "_name_or_path": "THUDM/glm-4-9b-chat"},
}


def glm2_config(**extra) -> dict:
    return {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "hidden_size": H, "num_attention_heads": NH,
        "kv_channels": D, "multi_query_attention": True, "multi_query_group_num": G, "ffn_hidden_size": F,
        "num_layers": L, "padded_vocab_size": V, "add_bias_linear": False, "add_qkv_bias": True, "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "layernorm_epsilon": 1e-5,
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}, **extra,
    }


def glm2_state(dtype=torch.float16, seed=0) -> dict:
    """The THUDM ChatGLM2/3/GLM-4 state_dict() names (remote code, so built directly), inv_freq included."""
    shapes = {"transformer.embedding.word_embeddings.weight": (V, H), "transformer.rotary_pos_emb.inv_freq": (D // 4,),
              "transformer.encoder.final_layernorm.weight": (H,), "transformer.output_layer.weight": (V, H)}
    for i in range(L):
        p = f"transformer.encoder.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (H,),
                       f"{p}.self_attention.query_key_value.weight": (Q + 2 * KV, H),
                       f"{p}.self_attention.query_key_value.bias": (Q + 2 * KV,),
                       f"{p}.self_attention.dense.weight": (H, Q), f"{p}.post_attention_layernorm.weight": (H,),
                       f"{p}.mlp.dense_h_to_4h.weight": (2 * F, H), f"{p}.mlp.dense_4h_to_h.weight": (H, F)})
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}


def glm2_hf(folder, key="glm-n", dtype=None, fmt="safetensors", **switches):
    extra = VARIANTS.get(key, VARIANTS["glm-n"])
    dtype = dtype or getattr(torch, extra["torch_dtype"])
    config = glm2_config(**{**extra, "torch_dtype": str(dtype).removeprefix("torch."), **switches})
    return write_hf(folder, glm2_state(dtype), config, fmt=fmt)


@example("glm-n")  # and its variants glm4, codegeex2
def glm2_example(folder, key):
    return glm2_hf(folder, key), ()


def expected_ms(dtype: str = "F32", qkv_concat=True, mlp_concat=True) -> dict:
    out = {"transformer.embedding.embedding_weight": (V, H), "transformer.encoder.final_layernorm.weight": (H,),
           "transformer.output_layer.weight": (V, H)}
    for i in range(L):
        p = f"transformer.encoder.layers.{i}"
        out.update({f"{p}.input_layernorm.weight": (H,), f"{p}.self_attention.dense.weight": (H, Q),
                    f"{p}.post_attention_layernorm.weight": (H,), f"{p}.mlp.dense_4h_to_h.weight": (H, F)})
        if qkv_concat:
            out.update({f"{p}.self_attention.query_key_value.weight": (Q + 2 * KV, H),
                        f"{p}.self_attention.query_key_value.bias": (Q + 2 * KV,)})
        else:
            out.update({f"{p}.self_attention.wq.weight": (Q, H), f"{p}.self_attention.wq.bias": (Q,),
                        f"{p}.self_attention.wk.weight": (KV, H), f"{p}.self_attention.wk.bias": (KV,),
                        f"{p}.self_attention.wv.weight": (KV, H), f"{p}.self_attention.wv.bias": (KV,)})
        if mlp_concat:
            out[f"{p}.mlp.dense_h_to_4h.weight"] = (2 * F, H)
        else:
            out.update({f"{p}.mlp.dense_left.weight": (F, H), f"{p}.mlp.dense_right.weight": (F, H)})
    return {n: (dtype, s) for n, s in out.items()}


def weights_of(path) -> dict:
    """The input's tensors without the inv_freq buffer (which the conversion leaves out)."""
    return {n: t for n, t in tensors_of(path).items() if not n.endswith("inv_freq")}


def read(path) -> dict:
    from mindformers_conv.formats.inputs import open_input

    return {n: r.read() for n, r in open_input(path).refs.items()}


def to_halves(rows: torch.Tensor) -> torch.Tensor:
    """Spec §2.2.c, written out per row: new row i = old 2i, new row d/2 + i = old 2i + 1, in every head."""
    out = torch.empty_like(rows)
    for h in range(rows.shape[0] // D):
        for i in range(D // 2):
            out[h * D + i] = rows[h * D + 2 * i]
            out[h * D + D // 2 + i] = rows[h * D + 2 * i + 1]
    return out


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_glm_n_forward_names_shapes_and_dtypes(cli, tmp_path, key):
    hf = glm2_hf(tmp_path / "hf", key)
    out = tmp_path / "g.ckpt"
    result = cli("--model", key, "--input_path", hf, "--output_path", out)
    assert result.code == 0, result.err
    assert names_shapes(out) == expected_ms("F32")  # fp32 materialisation, whatever is stored (§7)
    got, state = read(out), glm2_state(getattr(torch, VARIANTS[key]["torch_dtype"]))
    qkv = "transformer.encoder.layers.1.self_attention.query_key_value.weight"
    assert torch.equal(got[qkv], state[qkv].float())  # copied, no re-layout
    assert torch.equal(got["transformer.embedding.embedding_weight"],
                       state["transformer.embedding.word_embeddings.weight"].float())
    assert "left out 1 (rotary inv_freq buffer" in result.out


def test_glm_n_ckpt_loads_in_mindspore(cli, tmp_path):
    hf = glm2_hf(tmp_path / "hf")
    assert cli("--model", "glm-n", "--input_path", hf, "--output_path", tmp_path / "g.ckpt").code == 0
    assert_loads_in_mindspore(tmp_path / "g.ckpt", expected_ms(), "float32")


@pytest.mark.parametrize("key", sorted(VARIANTS))
@pytest.mark.parametrize("cast", [None, "same"])
def test_glm_n_round_trip_gives_back_the_hf_bytes(cli, tmp_path, key, cast):
    """Default: float32 .ckpt, and back to the stored dtype config.json names; --dtype: the stored dtype."""
    hf = glm2_hf(tmp_path / "hf", key)
    flag = {"float16": "fp16", "bfloat16": "bf16"}[VARIANTS[key]["torch_dtype"]]
    (back,) = round_trip(cli, tmp_path, key, hf, flag if cast else None, targets=("folder",))
    assert_same_tensors(tensors_of(back), weights_of(hf))


def test_glm_n_reverse_maps_embedding_weight_back_to_word_embeddings(cli, tmp_path):
    """v1.3.2's glm2 reverse renames `embedding_table`, a name its own forward no longer writes, so its
    output keeps the MS name `transformer.embedding.embedding_weight` (§5.4)."""
    hf = glm2_hf(tmp_path / "hf")
    ckpt, back = tmp_path / "g.ckpt", tmp_path / "g.bin"
    assert cli("--model", "glm-n", "--input_path", hf, "--output_path", ckpt).code == 0
    assert cli("--model", "glm-n", "--reversed", "--input_path", ckpt, "--output_path", back).code == 0
    names = set(tensors_of(back))
    assert "transformer.embedding.word_embeddings.weight" in names
    assert "transformer.embedding.embedding_weight" not in names
    assert type(torch.load(back, weights_only=True)) is dict  # one flat torch.save dict, as MindFormers'


def test_glm4_reverse_does_not_permute_qk_of_an_unrearranged_checkpoint(cli, tmp_path):
    """HEAD's reverse applies the inverse rope permutation to q and k unconditionally, while the forward
    with the default GLM4 yaml (use_rearrange_rope: False) leaves them untouched: HF → MS → HF corrupts
    q and k of every layer (§5.5). Here the reverse is the forward's exact inverse."""
    hf = glm2_hf(tmp_path / "hf", "glm4")
    ckpt = tmp_path / "g.ckpt"
    assert cli("--model", "glm4", "--input_path", hf, "--output_path", ckpt).code == 0
    assert cli("--model", "glm4", "--reversed", "--input_path", ckpt, "--output_path", f"{tmp_path}/back/",
               "--config_path", hf).code == 0
    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    original, back = read(hf)[name], read(tmp_path / "back")[name]
    assert torch.equal(back, original)
    q, k = original[:Q], original[Q:Q + KV]
    from_halves = torch.argsort(torch.tensor([*range(0, D, 2), *range(1, D, 2)]))  # MindFormers' inverse
    mindformers_q = q.view(NH, D, H)[:, from_halves].reshape(Q, H)
    mindformers_k = k.view(G, D, H)[:, from_halves].reshape(KV, H)
    assert not torch.equal(mindformers_q, q) and not torch.equal(mindformers_k, k)  # what it would write


@pytest.mark.parametrize("qkv_concat, mlp_concat", [(False, False), (False, True), (True, False)])
def test_glm_n_head_switches_split_qkv_and_mlp(cli, tmp_path, qkv_concat, mlp_concat):
    """HEAD yaml `qkv_concat: False` → wq/wk/wv (rows [nh·d | g·d | g·d]); `mlp_concat: False` → dense_left
    (gate rows [0, F)) / dense_right (up rows [F, 2F))."""
    hf = glm2_hf(tmp_path / "hf", qkv_concat=qkv_concat, mlp_concat=mlp_concat)
    out = tmp_path / "g.ckpt"
    result = cli("--model", "glm-n", "--input_path", hf, "--output_path", out)
    assert result.code == 0, result.err
    assert names_shapes(out) == expected_ms("F32", qkv_concat, mlp_concat)
    got, state, p = read(out), glm2_state(), "transformer.encoder.layers.1"
    qkv = state[f"{p}.self_attention.query_key_value.bias"].float()
    if not qkv_concat:
        assert torch.equal(got[f"{p}.self_attention.wq.bias"], qkv[:Q])
        assert torch.equal(got[f"{p}.self_attention.wk.bias"], qkv[Q:Q + KV])
        assert torch.equal(got[f"{p}.self_attention.wv.bias"], qkv[Q + KV:])
    if not mlp_concat:
        assert torch.equal(got[f"{p}.mlp.dense_right.weight"], state[f"{p}.mlp.dense_h_to_4h.weight"][F:].float())
    for config_path in (hf, None):  # the reverse reads either layout, with or without the switches
        back = tmp_path / f"back{config_path is None}.bin"
        assert cli("--model", "glm-n", "--reversed", "--input_path", out, "--output_path", back, "--dtype", "fp16",
                   *(["--config_path", config_path] if config_path else [])).code == 0
        assert_same_tensors(tensors_of(back), weights_of(hf))


@pytest.mark.parametrize("qkv_concat", [True, False])
def test_glm_n_use_rearrange_rope_permutes_q_and_k_per_head(cli, tmp_path, qkv_concat):
    hf = glm2_hf(tmp_path / "hf", "glm4", dtype=torch.float32, use_rearrange_rope=True, qkv_concat=qkv_concat)
    out = tmp_path / "g.ckpt"
    result = cli("--model", "glm4", "--input_path", hf, "--output_path", out)
    assert result.code == 0, result.err
    got, state, p = read(out), glm2_state(torch.float32), "transformer.encoder.layers.0.self_attention"
    for suffix in ("weight", "bias"):
        qkv = state[f"{p}.query_key_value.{suffix}"]
        q, k, v = to_halves(qkv[:Q]), to_halves(qkv[Q:Q + KV]), qkv[Q + KV:]
        if qkv_concat:
            assert torch.equal(got[f"{p}.query_key_value.{suffix}"], torch.cat([q, k, v]))
        else:
            assert [torch.equal(got[f"{p}.w{n}.{suffix}"], t) for n, t in zip("qkv", (q, k, v))] == [True] * 3
    back = tmp_path / "back"
    assert cli("--model", "glm4", "--reversed", "--input_path", out, "--output_path", f"{back}/",
               "--config_path", hf).code == 0
    assert_same_tensors(tensors_of(back), weights_of(hf))


def interleaved_rotary(x: torch.Tensor, pos: int) -> torch.Tensor:
    """THUDM GLM2/3/4: pairs (2i, 2i+1), i < d/4, rotated by pos·θ_i; the second half of the head passes."""
    theta = pos / 10000 ** (torch.arange(D // 4) * 4 / D)
    x1, x2, rest = x[0:D // 2:2], x[1:D // 2:2], x[D // 2:]
    rot = torch.stack([x1 * theta.cos() - x2 * theta.sin(), x2 * theta.cos() + x1 * theta.sin()], -1).flatten()
    return torch.cat([rot, rest])


def halves_rotary(x: torch.Tensor, pos: int) -> torch.Tensor:
    """MindFormers with use_rearrange_rope: pairs (i, i + d/2), i < d/4, rotated by pos·θ_i; others pass."""
    theta = pos / 10000 ** (torch.arange(D // 4) * 4 / D)
    out = x.clone()
    a, b = x[:D // 4], x[D // 2:D // 2 + D // 4]
    out[:D // 4], out[D // 2:D // 2 + D // 4] = a * theta.cos() - b * theta.sin(), b * theta.cos() + a * theta.sin()
    return out


def test_rearranged_rows_give_the_same_attention_scores_under_mindformers_rotary():
    """Why the permutation is right: q·k after GLM's interleaved rotary equals q'·k' after MindFormers'."""
    from models.glm2.declaration import ROPE_REARRANGE

    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(D, generator=gen, dtype=torch.float64), torch.randn(D, generator=gen, dtype=torch.float64)
    qp, kp, _ = ROPE_REARRANGE.forward([q, k, q], {"num_attention_heads": 1, "kv_channels": D})
    for m, n in ((0, 0), (3, 1), (7, 2)):
        original = interleaved_rotary(q, m) @ interleaved_rotary(k, n)
        assert torch.allclose(halves_rotary(qp, m) @ halves_rotary(kp, n), original, atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 4), groups=st.integers(1, 4), half=st.integers(1, 4), cols=st.integers(0, 3),
       seed=st.integers(0, 1000))
def test_rope_rearrange_then_inverse_is_identity(heads, groups, half, cols, seed):
    from models.glm2.declaration import QKV_SPLIT, ROPE_REARRANGE

    d = 2 * half
    cfg = {"num_attention_heads": heads, "kv_channels": d}
    gen = torch.Generator().manual_seed(seed)
    shape = ((heads + 2 * groups) * d, *((cols,) if cols else ()))  # weights, and biases (cols = 0)
    fused = torch.randn(shape, generator=gen)
    parts = QKV_SPLIT.forward([fused], cfg)
    assert [t.shape[0] for t in parts] == [heads * d, groups * d, groups * d]
    moved = ROPE_REARRANGE.forward(parts, cfg)
    assert torch.equal(moved[0], to_halves_of(parts[0], d)) and torch.equal(moved[2], parts[2])
    back = ROPE_REARRANGE.backward([t.contiguous() for t in moved], cfg)
    assert all(torch.equal(a, b) for a, b in zip(back, parts))
    assert torch.equal(QKV_SPLIT.backward(back, cfg)[0], fused)


def to_halves_of(rows: torch.Tensor, d: int) -> torch.Tensor:
    order = torch.tensor([h * d + j for h in range(rows.shape[0] // d) for j in (*range(0, d, 2), *range(1, d, 2))])
    return rows[order]


def test_glm_n_sizes_from_cli_flags_without_config_json(cli, tmp_path):
    """No head counts in the config: --n_head and --hidden_size give head_dim; k/v groups come from the rows."""
    hf = glm2_hf(tmp_path / "hf", "glm4", dtype=torch.float32)
    (hf / "config.json").unlink()
    switches = tmp_path / "switches.json"
    switches.write_text(json.dumps({"qkv_concat": False, "use_rearrange_rope": True}))
    out = tmp_path / "g.ckpt"
    missing = cli("--model", "glm-n", "--input_path", hf, "--output_path", out, "--config_path", switches)
    assert missing.code == 3 and "num_attention_heads" in missing.err and not out.exists()
    result = cli("--model", "glm-n", "--input_path", hf, "--output_path", out, "--config_path", switches,
                 "--n_head", NH, "--hidden_size", NH * D)
    assert result.code == 0, result.err
    assert names_shapes(out) == expected_ms("F32", qkv_concat=False)
    wq = read(out)["transformer.encoder.layers.0.self_attention.wq.weight"]
    assert torch.equal(wq, to_halves(glm2_state(torch.float32)[
        "transformer.encoder.layers.0.self_attention.query_key_value.weight"][:Q]))


def test_glm_n_auto_detection_and_python_api(cli, tmp_path):
    from models.glm2.convert_reversed import convert_ms_to_pt
    from models.glm2.convert_weight import convert_pt_to_ms

    hf = glm2_hf(tmp_path / "hf")
    result = cli("--model", "auto", "--input_path", hf, "--output_path", tmp_path / "a.ckpt")
    assert result.code == 0 and "glm-n" in result.out
    assert convert_pt_to_ms(hf, tmp_path / "g.ckpt", dtype=None)
    assert_same_tensors(tensors_of(tmp_path / "g.ckpt"), tensors_of(tmp_path / "a.ckpt"))
    assert convert_ms_to_pt(tmp_path / "g.ckpt", f"{tmp_path}/back/", config_path=hf)
    assert_same_tensors(tensors_of(tmp_path / "back"), weights_of(hf))


@pytest.mark.parametrize("key, extra, said", [
    ("glm-n", {}, "ChatGLM2-6B layout"),
    ("glm-n", {"rope_ratio": 50}, "ChatGLM3-6B-32K (from config.json rope_ratio)"),
    ("glm4", {}, "GLM-4 (from config.json padded_vocab_size / rope_ratio)"),
])
def test_glm_n_says_which_glm_it_converted(cli, tmp_path, key, extra, said):
    """The guide's glm-n covers GLM2, GLM3, GLM3-32K and GLM4 (one conversion); the CLI says which it saw."""
    hf = glm2_hf(tmp_path / "hf", key, **extra)
    result = cli("--model", "glm-n", "--input_path", hf, "--output_path", tmp_path / "g.ckpt")
    assert result.code == 0 and f"model: glm-n ({said})" in result.out, result.out + result.err
