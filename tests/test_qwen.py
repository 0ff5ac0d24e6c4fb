"""qwen (Qwen v1): spec §4.5 — c_attn split 3-way, HF mlp.w2 → MS w3, `transformer.` kept, Float32 default."""

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of, write_hf

H, V, FF, L = 8, 16, 12, 2  # hidden, vocab, real FFN width (config intermediate_size is 2·FF), layers
CONFIG = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                 "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "hidden_size": H, "num_attention_heads": 2, "kv_channels": 4, "num_hidden_layers": L,
    "intermediate_size": 2 * FF, "vocab_size": V, "layer_norm_epsilon": 1e-6, "seq_length": 32,
    "max_position_embeddings": 32, "rotary_emb_base": 10000, "rotary_pct": 1.0, "no_bias": True,
    "bf16": True, "fp16": False, "fp32": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def qwen_state(dtype=torch.bfloat16, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"transformer.wte.weight": (V, H), "transformer.ln_f.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        shapes.update({
            f"transformer.h.{i}.ln_1.weight": (H,),
            f"transformer.h.{i}.attn.c_attn.weight": (3 * H, H),
            f"transformer.h.{i}.attn.c_attn.bias": (3 * H,),
            f"transformer.h.{i}.attn.c_proj.weight": (H, H),
            f"transformer.h.{i}.ln_2.weight": (H,),
            f"transformer.h.{i}.mlp.w1.weight": (FF, H),
            f"transformer.h.{i}.mlp.w2.weight": (FF, H),
            f"transformer.h.{i}.mlp.c_proj.weight": (H, FF),
        })
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}


@pytest.fixture
def qwen_hf(tmp_path):
    return write_hf(tmp_path / "hf", qwen_state(), CONFIG)


def expected_ms(dtype: str) -> dict:
    """Spec §4.5 table, names and shapes literally."""
    out = {"transformer.wte.embedding_weight": (V, H), "transformer.ln_f.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        out.update({
            f"transformer.layers.{i}.attention_norm.weight": (H,),
            f"transformer.layers.{i}.attention.wq.weight": (H, H),
            f"transformer.layers.{i}.attention.wk.weight": (H, H),
            f"transformer.layers.{i}.attention.wv.weight": (H, H),
            f"transformer.layers.{i}.attention.wq.bias": (H,),
            f"transformer.layers.{i}.attention.wk.bias": (H,),
            f"transformer.layers.{i}.attention.wv.bias": (H,),
            f"transformer.layers.{i}.attention.wo.weight": (H, H),
            f"transformer.layers.{i}.ffn_norm.weight": (H,),
            f"transformer.layers.{i}.feed_forward.w1.weight": (FF, H),
            f"transformer.layers.{i}.feed_forward.w3.weight": (FF, H),
            f"transformer.layers.{i}.feed_forward.w2.weight": (H, FF),
        })
    return {n: (dtype, s) for n, s in out.items()}


@pytest.mark.parametrize("flag, dtype", [(None, "F32"), ("bf16", "BF16"), ("fp16", "F16")])
def test_qwen_forward_names_shapes_and_dtypes(cli, qwen_hf, tmp_path, flag, dtype):
    out = tmp_path / "qwen.ckpt"
    args = ["--model", "qwen", "--input_path", qwen_hf, "--output_path", out] + (["--dtype", flag] if flag else [])
    assert cli(*args).code == 0
    got = {n: (d, s) for n, (d, s, _) in tensors_of(out).items()}
    assert got == expected_ms(dtype)


def test_qwen_ckpt_loads_in_mindspore(cli, qwen_hf, tmp_path):
    import mindspore as ms

    out = tmp_path / "qwen.ckpt"
    assert cli("--model", "qwen", "--input_path", qwen_hf, "--output_path", out).code == 0
    params = ms.load_checkpoint(str(out))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected_ms("F32").items()}
    assert {p.dtype for p in params.values()} == {ms.float32}


def test_qwen_c_attn_thirds_are_q_k_v_and_hf_w2_is_ms_w3(cli, qwen_hf, tmp_path):
    out = tmp_path / "qwen.ckpt"
    assert cli("--model", "qwen", "--input_path", qwen_hf, "--output_path", out, "--dtype", "bf16").code == 0
    from mindformers_conv.formats.inputs import open_input

    ms_refs, hf = open_input(out).refs, qwen_state()
    for p in ("weight", "bias"):
        fused = hf[f"transformer.h.1.attn.c_attn.{p}"]
        for k, part in enumerate(("wq", "wk", "wv")):
            assert torch.equal(ms_refs[f"transformer.layers.1.attention.{part}.{p}"].read(), fused[k * H:(k + 1) * H])
    assert torch.equal(ms_refs["transformer.layers.1.feed_forward.w3.weight"].read(),
                       hf["transformer.h.1.mlp.w2.weight"])
    assert torch.equal(ms_refs["transformer.layers.1.feed_forward.w2.weight"].read(),
                       hf["transformer.h.1.mlp.c_proj.weight"])


@pytest.mark.parametrize("dtype", [None, "bf16"])
@pytest.mark.parametrize("reverse_out", ["folder", "bin"])
def test_qwen_round_trip_gives_back_the_hf_bytes(cli, qwen_hf, tmp_path, dtype, reverse_out):
    ckpt = tmp_path / "qwen.ckpt"
    cast = ["--dtype", dtype] if dtype else []
    assert cli("--model", "qwen", "--input_path", qwen_hf, "--output_path", ckpt, *cast, "--verify").code == 0
    back = tmp_path / ("back" if reverse_out == "folder" else "back.bin")
    # a .bin keeps each tensor's dtype (as MindFormers' reverse), so cast it back to the source's bf16
    rev_cast = ["--dtype", "bf16"] if reverse_out == "bin" else []
    target = f"{back}/" if reverse_out == "folder" else back
    assert cli("--model", "qwen", "--reversed", "--input_path", ckpt, "--output_path", target,
               "--config_path", qwen_hf, *rev_cast).code == 0
    assert_same_tensors(tensors_of(back), tensors_of(qwen_hf))


def test_qwen_reverse_refuses_c_attn_weight_and_bias(cli, qwen_hf, tmp_path):
    """MindFormers v1.3.2 re-fuses only c_attn.bias; q/k/v weights come out as `attention.wq.weight` etc.

    The correct reverse (ours) gives back `attn.c_attn.weight` with the original bytes.
    """
    ckpt, back = tmp_path / "qwen.ckpt", tmp_path / "qwen.bin"
    assert cli("--model", "qwen", "--input_path", qwen_hf, "--output_path", ckpt, "--dtype", "bf16").code == 0
    assert cli("--model", "qwen", "--reversed", "--input_path", ckpt, "--output_path", back).code == 0
    got, hf = tensors_of(back), tensors_of(qwen_hf)
    assert not any(".attention." in n for n in got)
    for i in range(L):
        for p in ("weight", "bias"):
            name = f"transformer.h.{i}.attn.c_attn.{p}"
            assert got[name][1] == hf[name][1] and got[name][2].equal(hf[name][2])


def test_qwen_python_api_round_trip(qwen_hf, tmp_path):
    from models.qwen.convert_reversed import convert_ms_to_pt
    from models.qwen.convert_weight import convert_pt_to_ms

    assert convert_pt_to_ms(str(qwen_hf) + "/", tmp_path / "q.ckpt", dtype="bf16")
    assert convert_ms_to_pt(tmp_path / "q.ckpt", tmp_path / "q.bin")
    assert_same_tensors(tensors_of(tmp_path / "q.bin"), tensors_of(qwen_hf))


@example("qwen")
def qwen_example(folder, key):
    return write_hf(folder, qwen_state(), CONFIG), ()
