"""llama family, --qkv_concat: MindFormers' fused w_qkv / w_gate_hidden (spec mindformers_other.md §3.1)."""

import pytest
import torch

from conftest import GQA, assert_same_tensors, tensors_of
from mindformers_conv.synthetic import LlamaShape
from mindformers_conv.tensor_ref import raw_bytes

HEAD_DIM = LlamaShape(num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # heads × head_dim ≠ hidden


def hf_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def expected_w_qkv(hf: dict, i: int, shape: LlamaShape, layout: str) -> torch.Tensor:
    """Written out from the spec, not from our ops: per KV group, its g query heads, then k, then v."""
    q, k, v = (hf[f"model.layers.{i}.self_attn.{x}_proj.weight"] for x in "qkv")
    if layout == "contiguous":
        return torch.cat([q, k, v])
    hd, g = shape.hd, shape.num_attention_heads // shape.num_key_value_heads
    rows = []
    for group in range(shape.num_key_value_heads):
        rows += [q[(group * g + h) * hd:(group * g + h + 1) * hd] for h in range(g)]
        rows += [k[group * hd:(group + 1) * hd], v[group * hd:(group + 1) * hd]]
    return torch.cat(rows)


def expected_w_gate_hidden(hf: dict, i: int, layout: str) -> torch.Tensor:
    gate, up = hf[f"model.layers.{i}.mlp.gate_proj.weight"], hf[f"model.layers.{i}.mlp.up_proj.weight"]
    if layout == "contiguous":
        return torch.cat([gate, up])
    return torch.cat([torch.stack([gate[r], up[r]]) for r in range(gate.shape[0])])  # gate0, up0, gate1, …


@pytest.mark.parametrize("layout", ["grouped", "contiguous"])
@pytest.mark.parametrize("shape", [GQA, HEAD_DIM], ids=["gqa", "head_dim"])
def test_qkv_concat_writes_the_fused_layout_and_the_reverse_splits_it(cli, tiny_llama, tmp_path, layout, shape):
    hf = tiny_llama(shape)
    ckpt, back = tmp_path / "fused.ckpt", tmp_path / "back"
    flags = ["--qkv_layout", layout] if layout == "contiguous" else []
    assert cli("--model", "llama", "--input_path", hf, "--output_path", ckpt, "--dtype", "bf16", "--qkv_concat",
               *flags, "--verify").code == 0
    ms, source = tensors_of(ckpt), hf_tensors(hf)
    assert not any(".attention.wq." in n or ".feed_forward.w1." in n for n in ms)
    for i in range(shape.num_hidden_layers):
        w_qkv = ms[f"model.layers.{i}.attention.w_qkv.weight"]
        assert w_qkv[2].equal(raw_bytes(expected_w_qkv(source, i, shape, layout)))
        w_gh = ms[f"model.layers.{i}.feed_forward.w_gate_hidden.weight"]
        assert w_gh[1] == (2 * shape.intermediate_size, shape.hidden_size)
        assert w_gh[2].equal(raw_bytes(expected_w_gate_hidden(source, i, layout)))
    # the reverse splits back without --qkv_concat (the layout flag picks grouped or contiguous)
    assert cli("--model", "llama", "--reversed", "--input_path", ckpt, "--output_path", f"{back}/",
               "--config_path", hf, *flags).code == 0
    assert_same_tensors(tensors_of(back), tensors_of(hf))


def test_qkv_concat_ckpt_loads_in_mindspore(cli, tiny_llama, tmp_path):
    import mindspore as ms

    out = tmp_path / "fused.ckpt"
    assert cli("--model", "llama", "--input_path", tiny_llama(), "--output_path", out, "--qkv_concat").code == 0
    assert set(ms.load_checkpoint(str(out))) == set(tensors_of(out))


def test_qwen2_biases_fuse_into_w_qkv_bias(cli, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, torch_dtype="bfloat16")
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    ckpt, back = tmp_path / "q.ckpt", tmp_path / "back"
    assert cli("--model", "qwen2", "--input_path", tmp_path / "hf", "--output_path", ckpt, "--qkv_concat",
               "--dtype", "bf16").code == 0
    assert tensors_of(ckpt)["model.layers.0.attention.w_qkv.bias"][1] == (32 + 2 * 16,)
    assert cli("--model", "qwen2", "--reversed", "--input_path", ckpt, "--output_path", f"{back}/",
               "--config_path", tmp_path / "hf").code == 0
    assert_same_tensors(tensors_of(back), tensors_of(tmp_path / "hf"))
