"""deepseek3 (spec/mindformers_other.md §3.2 v1.7.0 / master, §3.3): DeepSeek-V3 ↔ MindFormers 2.x mcore training
names — MLA unfused, interleaved linear_fc1, GroupedMLP weight1 / weight2, the MTP layer, FP8 block dequantisation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_tensors, example, tensors_of, write_hf
from mindformers_conv.fp8 import dequantize
from mindformers_conv.formats.inputs import open_input
from test_qwen2 import assert_loads_in_mindspore, forward_ok, reverse_ok

V, H, I, FM, E = 40, 20, 28, 6, 4  # vocab, hidden, dense intermediate, moe intermediate, routed experts
NH, Q_LORA, KV_LORA, NOPE, ROPE, VD = 3, 12, 10, 6, 4, 5
LAYERS = 2  # layer 0 dense (first_k_dense_replace 1), layer 1 MoE; HF layer 2 is the MTP layer
SIZES = dict(vocab_size=V, hidden_size=H, intermediate_size=I, moe_intermediate_size=FM, num_hidden_layers=LAYERS,
             num_attention_heads=NH, num_key_value_heads=NH, n_shared_experts=1, n_routed_experts=E, n_group=2,
             topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=Q_LORA,
             kv_lora_rank=KV_LORA, qk_rope_head_dim=ROPE, qk_nope_head_dim=NOPE, v_head_dim=VD)
MTP_HF, MTP_MS = f"model.layers.{LAYERS}", "mtp.layers.0"


def build(folder, dtype=torch.bfloat16, mtp=True, seed=0):
    """A random transformers DeepseekV3ForCausalLM (router bias included); `mtp`: plus the MTP layer the hub
    checkpoint has and transformers drops, its embed_tokens / shared_head.head copies of the main ones."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**SIZES, torch_dtype=str(dtype).removeprefix("torch.")))
    gen = torch.Generator().manual_seed(seed)
    state = {n: (torch.randn(t.shape, generator=gen) * 0.5).to(torch.float32 if "e_score" in n else dtype)
             for n, t in model.state_dict().items()}  # the router bias is Float32 on the hub
    config = {**model.config.to_dict(), "num_nextn_predict_layers": 1}
    if mtp:
        moe = {n.replace("model.layers.1.", f"{MTP_HF}."): t for n, t in state.items() if n.startswith("model.layers.1.")}
        state |= {n: (torch.randn(t.shape, generator=gen) * 0.5).to(t.dtype) for n, t in moe.items()}
        state |= {f"{MTP_HF}.{n}": (torch.randn(s, generator=gen) * 0.5).to(dtype)
                  for n, s in (("enorm.weight", (H,)), ("hnorm.weight", (H,)), ("eh_proj.weight", (H, 2 * H)),
                               ("shared_head.norm.weight", (H,)))}
        state |= {f"{MTP_HF}.embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
                  f"{MTP_HF}.shared_head.head.weight": state["lm_head.weight"].clone()}
    return write_hf(folder, state, config)


@example("deepseek3")
def deepseek3_example(folder, key):
    # Without the MTP layer: the contract expects what the forward leaves out not to come back, and the MTP
    # copies of the embedding and head do come back (test_deepseek3_round_trip_* checks them).
    return build(folder, mtp=False), ()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ds3") / "hf")


def layer_names(p: str, moe: bool) -> dict:
    """§3.2 v1.7.0 table for one decoder layer at prefix `p` (bf16; expert_bias fp32)."""
    out = {f"{p}.input_layernorm.weight": ("BF16", (H,)), f"{p}.pre_mlp_layernorm.weight": ("BF16", (H,))}
    a = f"{p}.self_attention"
    out |= {f"{a}.linear_q_down_proj.weight": ("BF16", (Q_LORA, H)), f"{a}.q_layernorm.weight": ("BF16", (Q_LORA,)),
            f"{a}.linear_q_up_proj.weight": ("BF16", (NH * (NOPE + ROPE), Q_LORA)),
            f"{a}.linear_kv_down_proj.weight": ("BF16", (KV_LORA + ROPE, H)),
            f"{a}.kv_layernorm.weight": ("BF16", (KV_LORA,)),
            f"{a}.linear_kv_up_proj.weight": ("BF16", (NH * (NOPE + VD), KV_LORA)),
            f"{a}.linear_proj.weight": ("BF16", (H, NH * VD))}
    m = f"{p}.mlp"
    if not moe:
        return out | {f"{m}.linear_fc1.weight": ("BF16", (2 * I, H)), f"{m}.linear_fc2.weight": ("BF16", (H, I))}
    return out | {f"{m}.router.weight": ("BF16", (E, H)), f"{m}.router.expert_bias": ("F32", (E,)),
                  f"{m}.experts.weight1": ("BF16", (E * H, 2 * FM)), f"{m}.experts.weight2": ("BF16", (E * FM, H)),
                  f"{m}.shared_experts.linear_fc1.weight": ("BF16", (2 * FM, H)),
                  f"{m}.shared_experts.linear_fc2.weight": ("BF16", (H, FM))}


EXPECTED = {
    "embedding.word_embeddings.weight": ("BF16", (V, H)), "decoder.final_layernorm.weight": ("BF16", (H,)),
    "output_layer.weight": ("BF16", (V, H)),
    **layer_names("decoder.layers.0", moe=False), **layer_names("decoder.layers.1", moe=True),
    f"{MTP_MS}.enorm.weight": ("BF16", (H,)), f"{MTP_MS}.hnorm.weight": ("BF16", (H,)),
    f"{MTP_MS}.eh_proj.weight": ("BF16", (H, 2 * H)), f"{MTP_MS}.final_layernorm.weight": ("BF16", (H,)),
    **layer_names(f"{MTP_MS}.transformer_layer", moe=True),
}


def test_deepseek3_forward_names_shapes_dtypes_and_ckpt_loads_in_mindspore(cli, hf, tmp_path):
    """bf16 by default, expert_bias fp32; the MTP layer under mtp.layers.0 without its embedding / head copies;
    --model auto finds deepseek3 from config.json."""
    result = cli("--model", "auto", "--input_path", hf, "--output_path", tmp_path / "ds3.ckpt")
    assert result.code == 0, result.err
    assert "deepseek3" in result.out + result.err
    got = {n: (d, s) for n, (d, s, _) in tensors_of(tmp_path / "ds3.ckpt").items()}
    assert got == EXPECTED
    assert_loads_in_mindspore(tmp_path / "ds3.ckpt", got)


def test_deepseek3_fc1_interleaved_and_experts_weight1_weight2_bytes(cli, hf, tmp_path):
    """linear_fc1 rows gate0, up0, gate1, …; weight1 = per expert [gate; up] → [E, 2Fm, H] → [E, H, 2Fm] →
    [E·H, 2Fm]; weight2 = per expert down [E, H, Fm] → [E, Fm, H] → [E·Fm, H] (§3.2), computed here directly."""
    forward_ok(cli, "deepseek3", hf, tmp_path / "ds3.ckpt", "--dtype", "bf16")
    got, src = open_input(tmp_path / "ds3.ckpt").refs, load_file(str(hf / "model.safetensors"))

    def interleaved(mlp):
        gate, up = src[f"{mlp}.gate_proj.weight"], src[f"{mlp}.up_proj.weight"]
        return torch.stack([gate, up], dim=1).reshape(-1, H)

    expected = {"decoder.layers.0.mlp.linear_fc1.weight": interleaved("model.layers.0.mlp")}
    for hf_layer, ms_layer in (("model.layers.1", "decoder.layers.1"), (MTP_HF, f"{MTP_MS}.transformer_layer")):
        x = f"{hf_layer}.mlp.experts"
        gate_up = torch.stack([torch.cat([src[f"{x}.{e}.gate_proj.weight"], src[f"{x}.{e}.up_proj.weight"]])
                               for e in range(E)])
        down = torch.stack([src[f"{x}.{e}.down_proj.weight"] for e in range(E)])
        expected |= {f"{ms_layer}.mlp.experts.weight1": gate_up.permute(0, 2, 1).reshape(E * H, 2 * FM),
                     f"{ms_layer}.mlp.experts.weight2": down.permute(0, 2, 1).reshape(E * FM, H),
                     f"{ms_layer}.mlp.shared_experts.linear_fc1.weight": interleaved(f"{hf_layer}.mlp.shared_experts")}
    assert interleaved("model.layers.0.mlp")[1].equal(src["model.layers.0.mlp.up_proj.weight"][0])
    for name, tensor in expected.items():
        assert got[name].read().equal(tensor), name


def logits(folder) -> torch.Tensor:
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6) % V).logits


def round_trip(cli, hf, tmp_path, *flags):
    ckpt, back = tmp_path / "rt.ckpt", tmp_path / "back"
    forward_ok(cli, "deepseek3", hf, ckpt, "--verify", *flags)
    reverse_ok(cli, "deepseek3", ckpt, f"{back}/", "--config_path", hf)
    return back


def test_deepseek3_round_trip_bf16_restores_the_mtp_copies_and_gives_the_same_logits(cli, hf, tmp_path):
    back = round_trip(cli, hf, tmp_path)
    assert_same_tensors(tensors_of(back), tensors_of(hf))
    assert torch.equal(logits(back), logits(hf))


def test_deepseek3_round_trip_fp32_source_with_dtype_fp32(cli, tmp_path):
    hf = build(tmp_path / "hf32", dtype=torch.float32, seed=1)
    assert_same_tensors(tensors_of(round_trip(cli, hf, tmp_path, "--dtype", "fp32")), tensors_of(hf))


def test_deepseek3_without_mtp_layer_writes_no_mtp_either_way(cli, tmp_path):
    """transformers' save_pretrained drops the MTP layer while config.json still says 1: nothing MTP is made up."""
    hf = build(tmp_path / "plain", mtp=False)
    back = round_trip(cli, hf, tmp_path)
    assert not any(n.startswith("mtp.") for n in tensors_of(tmp_path / "rt.ckpt"))
    assert_same_tensors(tensors_of(back), tensors_of(hf))


@pytest.mark.parametrize("shape", [(300, 260), (256, 128), (5, 130)])
def test_fp8_dequantize_is_weight_times_its_block_scale(shape):
    """Blocks of 128×128 on a ceil-div grid, the edge blocks cropped, in fp32."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=gen) * 4).to(torch.float8_e4m3fn)
    scale = torch.rand((-(-shape[0] // 128), -(-shape[1] // 128)), generator=gen) + 0.5
    direct = weight.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]]
    assert dequantize(weight, scale, (128, 128)).equal(direct)


def quantized(folder, hf, block=None):
    """The bf16 checkpoint with every 2-D layer weight as float8_e4m3fn + fp32 `_scale_inv` (what the hub has)."""
    state, config = load_file(str(hf / "model.safetensors")), json.loads((hf / "config.json").read_text())
    rows, cols = block or (128, 128)
    gen, fp8 = torch.Generator().manual_seed(2), {}
    for name, t in state.items():
        if name.startswith("model.layers.") and t.dim() == 2 and "embed_tokens" not in name and "head" not in name:
            grid = (-(-t.shape[0] // rows), -(-t.shape[1] // cols))
            fp8[name] = (t.float() * 8).to(torch.float8_e4m3fn)
            fp8[f"{name}_scale_inv"] = torch.rand(grid, generator=gen) + 0.5
    if block:
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    return write_hf(folder, {**state, **fp8}, config)


@pytest.mark.parametrize("block", [None, (8, 8)])
def test_deepseek3_fp8_source_is_dequantised_and_the_reverse_writes_bf16(cli, hf, tmp_path, block):
    """weight.float() · its block's scale_inv, cast to bf16; the scales are not written; the reverse writes that
    bf16 (no requantisation). (8, 8): config.json's weight_block_size, giving several blocks with cropped edges."""
    fp8 = quantized(tmp_path / "fp8", hf, block)
    src = load_file(str(fp8 / "model.safetensors"))
    forward_ok(cli, "deepseek3", fp8, tmp_path / "q.ckpt", "--verify")
    got = tensors_of(tmp_path / "q.ckpt")
    assert {n: (d, s) for n, (d, s, _) in got.items()} == EXPECTED
    rows, cols = block or (128, 128)

    def dequantized(name):
        w, s = src[name].float(), src[f"{name}_scale_inv"]
        return (w * s.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:w.shape[0], :w.shape[1]]).bfloat16()

    q_down = "model.layers.1.self_attn.q_a_proj.weight"
    assert open_input(tmp_path / "q.ckpt").refs["decoder.layers.1.self_attention.linear_q_down_proj.weight"] \
        .read().equal(dequantized(q_down))
    reverse_ok(cli, "deepseek3", tmp_path / "q.ckpt", f"{tmp_path / 'back'}/", "--config_path", hf)
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert not any(n.endswith("_scale_inv") for n in back)
    for name in (n for n in src if n.endswith("_scale_inv")):
        weight = name.removesuffix("_scale_inv")
        assert back[weight].dtype == torch.bfloat16 and back[weight].equal(dequantized(weight)), weight


def test_deepseek3_fp8_scale_of_the_wrong_grid_is_refused(cli, hf, tmp_path):
    fp8 = quantized(tmp_path / "fp8", hf, (8, 8))
    state = load_file(str(fp8 / "model.safetensors"))
    state["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    write_hf(fp8, state)
    result = cli("--model", "deepseek3", "--input_path", fp8, "--output_path", tmp_path / "q.ckpt")
    assert result.code == 3 and not (tmp_path / "q.ckpt").exists()
    assert "error: 'model.layers.0.self_attn.o_proj.weight_scale_inv' has shape [1, 1]; FP8 weight " \
           "'model.layers.0.self_attn.o_proj.weight' [20, 15] in 8×8 blocks needs [3, 2]" in result.err


def test_deepseek3_mtp_embedding_that_is_no_copy_fails_verify(cli, tmp_path):
    """The forward leaves the MTP copies out unread; --verify reads them back and catches one that differs."""
    hf = build(tmp_path / "hf")
    state = load_file(str(hf / "model.safetensors"))
    state[f"{MTP_HF}.embed_tokens.weight"] = -state[f"{MTP_HF}.embed_tokens.weight"]
    write_hf(hf, state)
    result = cli("--model", "deepseek3", "--input_path", hf, "--output_path", tmp_path / "q.ckpt", "--verify")
    assert result.code == 4 and f"'{MTP_HF}.embed_tokens.weight' differs from the input" in result.err
