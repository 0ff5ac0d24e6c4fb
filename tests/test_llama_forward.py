"""llama / yi / deepseek, HF → MindSpore `.ckpt`: spec §4.1–4.3, §6.4, §6.5, §8.

Expected names come from the spec §4.1 table written out below (not from our declaration); the HF
side is read back with safetensors / torch.load, independently of the converter's readers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import GQA, MHA, tensors_of
from mindformers_conv.synthetic import LlamaShape
from mindformers_conv.tensor_ref import raw_bytes

# Spec §4.1 table, literally: HF name, MS name, shape as a function of the model shape.
SPEC_TABLE = (
    ("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight", lambda s: (s.vocab_size, s.hidden_size)),
    ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.attention.wq.weight",
     lambda s: (s.num_attention_heads * s.hd, s.hidden_size)),
    ("model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.attention.wk.weight",
     lambda s: (s.num_key_value_heads * s.hd, s.hidden_size)),
    ("model.layers.{i}.self_attn.v_proj.weight", "model.layers.{i}.attention.wv.weight",
     lambda s: (s.num_key_value_heads * s.hd, s.hidden_size)),
    ("model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.attention.wo.weight",
     lambda s: (s.hidden_size, s.num_attention_heads * s.hd)),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.feed_forward.w1.weight",
     lambda s: (s.intermediate_size, s.hidden_size)),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.feed_forward.w2.weight",
     lambda s: (s.hidden_size, s.intermediate_size)),
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.feed_forward.w3.weight",
     lambda s: (s.intermediate_size, s.hidden_size)),
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight", lambda s: (s.hidden_size,)),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.ffn_norm.weight",
     lambda s: (s.hidden_size,)),
    ("model.norm.weight", "model.norm_out.weight", lambda s: (s.hidden_size,)),
    ("lm_head.weight", "lm_head.weight", lambda s: (s.vocab_size, s.hidden_size)),
)

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FLAG = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
HEAD_DIM = LlamaShape(num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # nh·hd ≠ H
SHARD = 100_000  # bytes: three shards for the tiny bf16 model


def hf_to_ms(shape: LlamaShape) -> dict[str, tuple[str, tuple]]:
    """HF name → (MS name, shape), per layer, from SPEC_TABLE. lm_head is present even when tied."""
    out = {}
    for hf, ms, dims in SPEC_TABLE:
        layers = range(shape.num_hidden_layers) if "{i}" in hf else [None]
        for i in layers:
            out[hf.format(i=i)] = (ms.format(i=i), dims(shape))
    return out


def expected_ms(shape: LlamaShape, dtype: str) -> dict[str, tuple[str, tuple]]:
    """MS name → (dtype code, shape) of the whole forward output."""
    return {ms: (dtype, dims) for ms, dims in hf_to_ms(shape).values()}


def hf_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder, read with safetensors / torch.load (not with our readers)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    for f in sorted(folder.glob("*.bin")):
        out.update(torch.load(f, weights_only=True))
    assert out, f"no weights in {folder}"
    return out


def assert_values(ckpt: Path, hf: dict[str, torch.Tensor], shape: LlamaShape, dtype: str) -> None:
    """Every MS tensor is the matching HF tensor `.to(dtype)`, bit for bit; a missing head is the embedding."""
    got = tensors_of(ckpt)
    for hf_name, (ms_name, _) in hf_to_ms(shape).items():
        source = hf.get(hf_name, hf["model.embed_tokens.weight"] if hf_name == "lm_head.weight" else None)
        assert source is not None, hf_name
        code, dims, data = got[ms_name]
        assert code == dtype, ms_name
        assert dims == tuple(source.shape), ms_name
        assert torch.equal(data, raw_bytes(source.to(TORCH[dtype]))), ms_name


def forward(cli, model: str, src, out: Path, *extra) -> str:
    result = cli("--model", model, "--input_path", src, "--output_path", out, *extra)
    assert result.code == 0, result.err
    return result.out


@pytest.mark.parametrize("shape", [GQA, MHA, HEAD_DIM], ids=["gqa", "mha", "head_dim"])
@pytest.mark.parametrize("model", ["llama", "yi", "deepseek"])
def test_forward_names_shapes_dtypes_follow_spec_table(cli, tiny_llama, tmp_path, model, shape):
    out = tmp_path / "ms.ckpt"
    forward(cli, model, tiny_llama(shape), out)
    got = {n: (code, dims) for n, (code, dims, _) in tensors_of(out).items()}
    assert got == expected_ms(shape, "F32")


@pytest.mark.parametrize("model", ["llama", "yi", "deepseek"])
@pytest.mark.parametrize("source_dtype", ["BF16", "F16", "F32"])
def test_default_dtype_is_float32(cli, tiny_llama, tmp_path, model, source_dtype):
    """Without --dtype, MindFormers v1.3.2 (transformers 4.x, fp32 load) writes Float32 — also from bf16."""
    hf = tiny_llama(dtype=source_dtype)
    out = tmp_path / "ms.ckpt"
    forward(cli, model, hf, out)
    assert_values(out, hf_state(hf), GQA, "F32")


@pytest.mark.parametrize("flag", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("source_dtype", ["BF16", "F16", "F32"])
def test_dtype_flag_casts_like_torch_to(cli, tiny_llama, tmp_path, source_dtype, flag):
    hf = tiny_llama(dtype=source_dtype)
    out = tmp_path / "ms.ckpt"
    forward(cli, "llama", hf, out, "--dtype", flag)
    assert_values(out, hf_state(hf), GQA, FLAG[flag])


def test_dtype_flag_rounds_fp32_to_bf16_like_torch(cli, tiny_llama, tmp_path):
    """fp32 values that are not bf16-representable are rounded exactly as torch rounds them."""
    hf = tiny_llama(dtype="F32")
    state = hf_state(hf)
    assert any(not torch.equal(t, t.bfloat16().float()) for t in state.values())  # the cast really rounds
    out = tmp_path / "ms.ckpt"
    forward(cli, "llama", hf, out, "--dtype", "bf16")
    got = tensors_of(out)
    wq = state["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(got["model.layers.0.attention.wq.weight"][2], raw_bytes(wq.to(torch.bfloat16)))


LAYOUTS = {  # name → (tiny_llama kwargs, the weight file to name as --input_path, the index the folder has)
    "safetensors": (dict(), "model.safetensors", None),
    "safetensors-sharded": (dict(max_shard_bytes=SHARD), "model-00002-of-00003.safetensors",
                            "model.safetensors.index.json"),
    "bin": (dict(fmt="bin"), "pytorch_model.bin", None),
    "bin-sharded": (dict(fmt="bin", max_shard_bytes=SHARD), "pytorch_model-00003-of-00003.bin",
                    "pytorch_model.bin.index.json"),
}


@pytest.mark.parametrize("form", ["folder", "folder/", "file"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_input_folder_trailing_slash_or_file_inside_reads_whole_checkpoint(cli, tiny_llama, tmp_path, layout, form):
    """§6.4: the folder, the folder with `/`, or any weight file in it (MindFormers' dirname) — all of it."""
    kwargs, file, index = LAYOUTS[layout]
    hf = tiny_llama(**kwargs)
    assert (hf / file).is_file()
    if index:
        assert (hf / index).is_file() and len(list(hf.glob(f"*{Path(file).suffix}"))) == 3
    src = {"folder": str(hf), "folder/": str(hf) + "/", "file": str(hf / file)}[form]
    out = tmp_path / "ms.ckpt"
    forward(cli, "llama", src, out)
    assert {n: (c, d) for n, (c, d, _) in tensors_of(out).items()} == expected_ms(GQA, "F32")
    assert_values(out, hf_state(hf), GQA, "F32")


@pytest.mark.parametrize("flag", [None, "bf16"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_tied_embedding_written_as_lm_head(cli, tiny_llama, tmp_path, fmt, flag):
    """config tie_word_embeddings: true and no lm_head on disk → the ckpt has lm_head = embedding (state_dict())."""
    import json

    shape = LlamaShape(tie_word_embeddings=True)
    hf = tiny_llama(shape, fmt=fmt)
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    state = hf_state(hf)
    assert "lm_head.weight" not in state
    out = tmp_path / "ms.ckpt"
    forward(cli, "llama", hf, out, *(["--dtype", flag] if flag else []))
    dtype = FLAG.get(flag, "F32")
    got = tensors_of(out)
    assert {n: (c, d) for n, (c, d, _) in got.items()} == expected_ms(shape, dtype)
    assert got["lm_head.weight"][2].equal(got["model.tok_embeddings.embedding_weight"][2])
    assert_values(out, state, shape, dtype)


@pytest.mark.parametrize("shape", [GQA, MHA], ids=["gqa", "mha"])
def test_kv_projections_keep_kv_head_count(cli, tiny_llama, tmp_path, shape):
    """wk/wv have nkv·hd rows (GQA: fewer than wq; MHA: as many); values unchanged (no RoPE permutation)."""
    hf = tiny_llama(shape)
    out = tmp_path / "ms.ckpt"
    forward(cli, "llama", hf, out, "--dtype", "bf16")
    got, state = tensors_of(out), hf_state(hf)
    for i in range(shape.num_hidden_layers):
        wq, wk = got[f"model.layers.{i}.attention.wq.weight"], got[f"model.layers.{i}.attention.wk.weight"]
        assert wk[1] == (shape.num_key_value_heads * shape.hd, shape.hidden_size)
        assert (wk[1][0] < wq[1][0]) == (shape.num_key_value_heads < shape.num_attention_heads)
        for hf_name, ms_name in (("k_proj", "wk"), ("v_proj", "wv")):
            source = state[f"model.layers.{i}.self_attn.{hf_name}.weight"]
            assert got[f"model.layers.{i}.attention.{ms_name}.weight"][2].equal(raw_bytes(source))


def test_rotary_inv_freq_dropped_and_reported(cli, tiny_llama, tmp_path):
    """A persistent rotary_emb.inv_freq (transformers < 4.31) is left out of the ckpt, and the run says so."""
    from safetensors.torch import load_file, save_file

    hf = tiny_llama()
    state = load_file(str(hf / "model.safetensors"))
    buffers = [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(GQA.num_hidden_layers)]
    for name in buffers:
        state[name] = 1.0 / (10000 ** (torch.arange(0, GQA.hd, 2, dtype=torch.float32) / GQA.hd))
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "ms.ckpt"
    report = forward(cli, "llama", hf, out)
    got = tensors_of(out)
    assert not any("inv_freq" in n for n in got)
    assert {n: (c, d) for n, (c, d, _) in got.items()} == expected_ms(GQA, "F32")
    assert f"left out {len(buffers)}" in report
    for name in buffers:
        assert name in report
