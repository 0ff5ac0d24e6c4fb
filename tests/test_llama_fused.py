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


@pytest.mark.parametrize("layout", ["grouped", "contiguous"])
def test_ms_to_ms_fuses_and_unfuses_an_existing_mindformers_checkpoint(cli, tiny_llama, tmp_path, layout):
    """MindFormers' `--qkv_concat True` on an MS ckpt (spec §3.1), and back: the same bytes as from HF."""
    hf = tiny_llama(HEAD_DIM)
    plain, fused, direct, unfused = (tmp_path / f"{n}.ckpt" for n in ("plain", "fused", "direct", "unfused"))
    flags = ["--qkv_layout", layout] if layout == "contiguous" else []
    assert cli("--model", "llama", "--input_path", hf, "--output_path", plain, "--dtype", "bf16").code == 0
    assert cli("--model", "llama", "--input_path", hf, "--output_path", direct, "--dtype", "bf16",
               "--qkv_concat", *flags).code == 0
    result = cli("--model", "llama", "--input_path", plain, "--output_path", fused, "--qkv_concat", *flags,
                 "--config_path", hf, "--verify")
    assert result.code == 0 and "MindSpore → MindSpore" in result.out and "verified" in result.out, result.err
    assert_same_tensors(tensors_of(fused), tensors_of(direct))
    result = cli("--model", "auto", "--input_path", fused, "--output_path", unfused, "--qkv_concat", "false",
                 *flags, "--config_path", hf)
    assert result.code == 0, result.err
    assert_same_tensors(tensors_of(unfused), tensors_of(plain))


def test_ms_to_ms_keeps_the_dtype_and_casts_only_when_asked(cli, tiny_llama, tmp_path):
    hf = tiny_llama(dtype="BF16")
    plain, folder, fp16 = tmp_path / "plain.ckpt", tmp_path / "ms", tmp_path / "fp16.ckpt"
    assert cli("--model", "llama", "--input_path", hf, "--output_path", plain, "--dtype", "bf16").code == 0
    assert cli("--model", "llama", "--input_path", plain, "--output_path", f"{folder}/").code == 0
    assert_same_tensors(tensors_of(folder), tensors_of(plain))  # .ckpt → MindSpore safetensors folder, as is
    assert cli("--model", "llama", "--input_path", plain, "--output_path", fp16, "--dtype", "fp16").code == 0
    assert {t[0] for t in tensors_of(fp16).values()} == {"F16"}


def test_fusing_a_gqa_checkpoint_without_its_config_is_refused(cli, tiny_llama, tmp_path):
    """Without the KV-head count the grouping is unknowable; guessing would scramble q/k/v silently."""
    hf = tiny_llama(GQA)
    plain = tmp_path / "plain.ckpt"
    assert cli("--model", "llama", "--input_path", hf, "--output_path", plain).code == 0
    result = cli("--model", "llama", "--input_path", plain, "--output_path", tmp_path / "f.ckpt", "--qkv_concat",
                 "--n_head", str(GQA.num_attention_heads), "--hidden_size", str(GQA.hidden_size))
    assert result.code == 3 and "need 64/64/64" in result.err, result.err
    assert not (tmp_path / "f.ckpt").exists()


MINDFORMERS_YAML = """\
model:
  model_config:
    type: LlamaConfig
    batch_size: 1
    seq_length: 4096
    hidden_size: {hidden}
    num_layers: {layers}
    num_heads: {heads}
    n_kv_heads: {kv}
    vocab_size: {vocab}
    intermediate_size: {inter}
    rms_norm_eps: 1.0e-6
    qkv_concat: True
    compute_dtype: "bfloat16"
  arch:
    type: LlamaForCausalLM
"""


def test_a_mindformers_yaml_is_a_config_path(cli, tiny_llama, tmp_path):
    """MindFormers' own fusing converter takes `--config_path <yaml>`; so do we (heads, kv heads, qkv_concat)."""
    shape = GQA
    hf = tiny_llama(shape)
    plain, fused, direct = tmp_path / "plain.ckpt", tmp_path / "fused.ckpt", tmp_path / "direct.ckpt"
    yaml = tmp_path / "predict_qwen2_5.yaml"
    yaml.write_text(MINDFORMERS_YAML.format(hidden=shape.hidden_size, layers=shape.num_hidden_layers,
                                            heads=shape.num_attention_heads, kv=shape.num_key_value_heads,
                                            vocab=shape.vocab_size, inter=shape.intermediate_size))
    assert cli("--model", "llama", "--input_path", hf, "--output_path", plain, "--dtype", "bf16").code == 0
    assert cli("--model", "llama", "--input_path", hf, "--output_path", direct, "--dtype", "bf16",
               "--qkv_concat").code == 0
    result = cli("--model", "llama", "--input_path", plain, "--output_path", fused, "--config_path", yaml)
    assert result.code == 0, result.err
    assert_same_tensors(tensors_of(fused), tensors_of(direct))
    yaml.write_text("model:\n  arch: {type: LlamaForCausalLM}\n")
    result = cli("--model", "llama", "--input_path", plain, "--output_path", fused, "--config_path", yaml)
    assert result.code == 3 and "no model.model_config section" in result.err
