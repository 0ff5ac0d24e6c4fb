"""qwenvl (Qwen-VL): spec §2.4 / §7 — qwen's LLM table under `llm_model.`, ViT in_proj de-interleaved per head,
resampler in_proj in thirds, out_proj transposed, ln gamma/beta; Float32 default; a reverse MindFormers lacks."""

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of, write_hf
from test_qwen import CONFIG as QWEN_CONFIG
from test_qwen import expected_ms as expected_llm
from test_qwen import qwen_state
from test_vit import convert, dtype_flag, forward, ms_names, random_state

VW, VH, VL, VFF, D, NQ, GRID = 8, 2, 2, 12, 6, 4, 4  # ViT width, heads, layers, MLP width; resampler dim, queries
HD = VW // VH
CONFIG = {**QWEN_CONFIG, "visual": {"heads": VH, "image_size": 4, "image_start_id": 15, "layers": VL,
                                    "mlp_ratio": VFF / VW, "output_dim": D, "patch_size": 2, "width": VW}}
VIS, MS_VIS = "transformer.visual", "vision_encoder"


def visual_state(dtype=torch.bfloat16) -> dict:
    shapes = {f"{VIS}.conv1.weight": (VW, 3, 2, 2), f"{VIS}.positional_embedding": (GRID, VW),
              f"{VIS}.ln_pre.weight": (VW,), f"{VIS}.ln_pre.bias": (VW,),
              f"{VIS}.attn_pool.query": (NQ, D), f"{VIS}.attn_pool.pos_embed": (NQ, D),
              f"{VIS}.attn_pool.kv_proj.weight": (D, VW), f"{VIS}.attn_pool.attn.in_proj_weight": (3 * D, D),
              f"{VIS}.attn_pool.attn.in_proj_bias": (3 * D,), f"{VIS}.attn_pool.attn.out_proj.weight": (D, D),
              f"{VIS}.attn_pool.attn.out_proj.bias": (D,), f"{VIS}.attn_pool.ln_q.weight": (D,),
              f"{VIS}.attn_pool.ln_q.bias": (D,), f"{VIS}.attn_pool.ln_kv.weight": (D,),
              f"{VIS}.attn_pool.ln_kv.bias": (D,), f"{VIS}.ln_post.weight": (D,), f"{VIS}.ln_post.bias": (D,),
              f"{VIS}.proj": (D, D)}
    for i in range(VL):
        r = f"{VIS}.transformer.resblocks.{i}"
        shapes.update({f"{r}.ln_1.weight": (VW,), f"{r}.ln_1.bias": (VW,), f"{r}.ln_2.weight": (VW,),
                       f"{r}.ln_2.bias": (VW,), f"{r}.attn.in_proj.weight": (3 * VW, VW),
                       f"{r}.attn.in_proj.bias": (3 * VW,), f"{r}.attn.out_proj.weight": (VW, VW),
                       f"{r}.attn.out_proj.bias": (VW,), f"{r}.mlp.c_fc.weight": (VFF, VW),
                       f"{r}.mlp.c_fc.bias": (VFF,),
                       f"{r}.mlp.c_proj.weight": (VW, VFF), f"{r}.mlp.c_proj.bias": (VW,)})
    return random_state(shapes, dtype, seed=3)


def qwenvl_state(dtype=torch.bfloat16) -> dict:
    return {**qwen_state(dtype), **visual_state(dtype)}


@pytest.fixture
def qwenvl_hf(tmp_path):
    return write_hf(tmp_path / "hf", qwenvl_state(), CONFIG)


def expected_ms(dtype="F32") -> dict:
    """Spec §2.4 vision table plus qwen's LLM table (§4.5 of the llm sheet) under `llm_model.`."""
    out = {f"llm_model.{n}": s for n, (_, s) in expected_llm(dtype).items()}
    out.update({f"{MS_VIS}.conv1.weight": (VW, 3, 2, 2), f"{MS_VIS}.positional_embedding": (GRID, VW),
                f"{MS_VIS}.ln_pre.gamma": (VW,), f"{MS_VIS}.ln_pre.beta": (VW,),
                f"{MS_VIS}.attn_pool.query": (NQ, D), f"{MS_VIS}.attn_pool.pos_embed": (NQ, D),
                f"{MS_VIS}.attn_pool.kv_proj.weight": (D, VW), f"{MS_VIS}.attn_pool.attn.projection.weight": (D, D),
                f"{MS_VIS}.attn_pool.attn.projection.bias": (D,), f"{MS_VIS}.attn_pool.ln_q.gamma": (D,),
                f"{MS_VIS}.attn_pool.ln_q.beta": (D,), f"{MS_VIS}.attn_pool.ln_kv.gamma": (D,),
                f"{MS_VIS}.attn_pool.ln_kv.beta": (D,), f"{MS_VIS}.ln_post.gamma": (D,),
                f"{MS_VIS}.ln_post.beta": (D,), f"{MS_VIS}.proj": (D, D)})
    out.update({f"{MS_VIS}.attn_pool.attn.dense{k}.{p}": (D, D) if p == "weight" else (D,)
                for k in (1, 2, 3) for p in ("weight", "bias")})
    for i in range(VL):
        r = f"{MS_VIS}.transformer.resblocks.{i}"
        out.update({f"{r}.ln_1.gamma": (VW,), f"{r}.ln_1.beta": (VW,), f"{r}.ln_2.gamma": (VW,),
                    f"{r}.ln_2.beta": (VW,),
                    f"{r}.attn.projection.weight": (VW, VW), f"{r}.attn.projection.bias": (VW,),
                    f"{r}.mlp.c_fc.weight": (VFF, VW), f"{r}.mlp.c_fc.bias": (VFF,),
                    f"{r}.mlp.c_proj.weight": (VW, VFF), f"{r}.mlp.c_proj.bias": (VW,)})
        out.update({f"{r}.attn.dense{k}.{p}": (VW, VW) if p == "weight" else (VW,)
                    for k in (1, 2, 3) for p in ("weight", "bias")})
    return {n: (dtype, s) for n, s in out.items()}


@pytest.mark.parametrize("flag, dtype", [(None, "F32"), ("bf16", "BF16")])
def test_qwenvl_forward_names_shapes_and_dtypes(cli, qwenvl_hf, tmp_path, flag, dtype):
    """A bf16 checkpoint comes out Float32 without --dtype, as from_pretrained on a CPU host gives it (§7)."""
    assert forward(cli, "qwenvl", qwenvl_hf, tmp_path, *dtype_flag(flag)) == expected_ms(dtype)


def test_qwenvl_vit_in_proj_is_de_interleaved_per_head(cli, qwenvl_hf, tmp_path):
    """HF VisualAttention views in_proj's output as (heads, 3·head_dim) and splits q, k, v inside each head."""
    out = tmp_path / "qwenvl.ckpt"
    convert(cli, "--model", "qwenvl", "--input_path", qwenvl_hf, "--output_path", out, "--dtype", "fp32")
    from mindformers_conv.formats.inputs import open_input

    refs, state = open_input(out).refs, qwenvl_state()
    w = state[f"{VIS}.transformer.resblocks.1.attn.in_proj.weight"].float()
    b = state[f"{VIS}.transformer.resblocks.1.attn.in_proj.bias"].float()
    x = torch.randn(3, VW, generator=torch.Generator().manual_seed(4))
    hf_q, hf_k, hf_v = (x @ w.t() + b).view(3, VH, 3 * HD).split(HD, dim=-1)  # as VisualAttention does
    ms = f"{MS_VIS}.transformer.resblocks.1.attn"
    for k, hf_part in enumerate((hf_q, hf_k, hf_v)):
        dense_w, dense_b = refs[f"{ms}.dense{k + 1}.weight"].read(), refs[f"{ms}.dense{k + 1}.bias"].read()
        assert torch.allclose((x @ dense_w.t() + dense_b).view(3, VH, HD), hf_part, atol=1e-6)
    assert torch.equal(refs[f"{ms}.projection.weight"].read(),
                       state[f"{VIS}.transformer.resblocks.1.attn.out_proj.weight"].float().t())
    pool = state[f"{VIS}.attn_pool.attn.in_proj_weight"].float()  # nn.MultiheadAttention: contiguous thirds
    assert torch.equal(refs[f"{MS_VIS}.attn_pool.attn.dense2.weight"].read(), pool[D:2 * D])


def test_qwenvl_vit_heads_come_from_config_visual_heads(cli, tmp_path):
    """MindFormers takes the head count from its `vit_num_head` argument (default 16; a string from its CLI, §5.2),
    which silently scrambles q/k/v for any other ViT. Here config.json `visual.heads` decides; without it, stop."""
    no_visual = {k: v for k, v in CONFIG.items() if k != "visual"}
    hf = write_hf(tmp_path / "hf", qwenvl_state(), no_visual)
    result = cli("--model", "qwenvl", "--input_path", hf, "--output_path", tmp_path / "x.ckpt")
    assert result.code != 0 and "visual.heads" in result.err and not (tmp_path / "x.ckpt").exists()


def test_qwenvl_ckpt_loads_in_mindspore(cli, qwenvl_hf, tmp_path):
    import mindspore as ms

    convert(cli, "--model", "qwenvl", "--input_path", qwenvl_hf, "--output_path", tmp_path / "q.ckpt")
    params = ms.load_checkpoint(str(tmp_path / "q.ckpt"))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected_ms().items()}
    assert {p.dtype for p in params.values()} == {ms.float32}


@pytest.mark.parametrize("dtype", [None, "bf16"])
@pytest.mark.parametrize("reverse_out", ["folder", "bin"])
def test_qwenvl_round_trip_gives_back_the_hf_bytes(cli, qwenvl_hf, tmp_path, dtype, reverse_out):
    """MindFormers has no qwenvl reverse; ours is the exact inverse (a folder takes config.json's bfloat16)."""
    ckpt = tmp_path / "q.ckpt"
    convert(cli, "--model", "qwenvl", "--input_path", qwenvl_hf, "--output_path", ckpt,
            *dtype_flag(dtype), "--verify")
    back = tmp_path / ("back" if reverse_out == "folder" else "back.bin")
    convert(cli, "--model", "qwenvl", "--reversed", "--input_path", ckpt, "--config_path", qwenvl_hf,
            "--output_path", f"{back}/" if reverse_out == "folder" else back,
            *(["--dtype", "bf16"] if reverse_out == "bin" else []))
    assert_same_tensors(tensors_of(back), tensors_of(qwenvl_hf))


def test_qwenvl_qkv_concat_writes_w_qkv_where_mindformers_writes_attention_w(cli, qwenvl_hf, tmp_path):
    """§5.9: MindFormers' use_qkv_concat names the fused c_attn `attention.w`, which the v1.3.2 llama-style attention
    does not have (it is `w_qkv`, contiguous [q; k; v]); here `attention.w_qkv`, and it round-trips."""
    ckpt = tmp_path / "q.ckpt"
    convert(cli, "--model", "qwenvl", "--input_path", qwenvl_hf, "--output_path", ckpt, "--qkv_concat",
            "--dtype", "bf16")
    names = ms_names(ckpt)
    layer = "llm_model.transformer.layers.1.attention"
    assert names[f"{layer}.w_qkv.weight"] == ("BF16", (3 * 8, 8)) and f"{layer}.wq.weight" not in names
    assert not any(n.endswith((".attention.w.weight", ".attention.w.bias")) for n in names)
    back = tmp_path / "back.bin"
    convert(cli, "--model", "qwenvl", "--reversed", "--input_path", ckpt, "--output_path", back, "--qkv_concat",
            "--config_path", qwenvl_hf)
    assert_same_tensors(tensors_of(back), tensors_of(qwenvl_hf))


@example("qwenvl")
def qwenvl_example(folder, key):
    return write_hf(folder, qwenvl_state(), CONFIG), ()
