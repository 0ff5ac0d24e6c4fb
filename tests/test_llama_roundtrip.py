"""HF → MindSpore → HF for llama: every tensor comes back byte-identical (DESIGN §6, README "MindSpore → HF").

Inputs: bf16 / fp16 / fp32, single `model.safetensors`, shards + index, `pytorch_model.bin`; tied and
untied heads; GQA and MHA. Reverse outputs: a HF folder (sharded safetensors + index, config and
tokenizer files carried over) and `x.bin` (MindFormers' flat torch pickle). The reversed folder loads
with transformers' `LlamaForCausalLM.from_pretrained` and gives bit-equal logits to the original,
which transformers itself built and saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import GQA, MHA, assert_same_tensors, tensors_of
from mindformers_conv.synthetic import LlamaShape
from mindformers_conv.tensor_ref import raw_bytes

FLAG = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
SHARD = 100_000  # bytes: three input shards for the tiny bf16 model
INPUTS = {  # tiny_llama kwargs per input layout
    "safetensors": dict(),
    "sharded": dict(max_shard_bytes=SHARD),
    "bin": dict(fmt="bin"),
    "bin-sharded": dict(fmt="bin", max_shard_bytes=SHARD),
}
SHAPES = {
    "gqa": GQA,
    "mha": MHA,
    "gqa-tied": LlamaShape(tie_word_embeddings=True),
    "mha-tied": LlamaShape(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
}
# Files a HF folder has besides the weights; the reverse carries them into the output folder.
SIDE_FILES = {
    "tokenizer_config.json": b'{"model_max_length": 256, "tokenizer_class": "LlamaTokenizer"}\n',
    "special_tokens_map.json": b'{"bos_token": "<s>", "eos_token": "</s>"}\n',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}\n',
    "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2}\n',
}


def run(cli, *argv) -> str:
    result = cli(*argv)
    assert result.code == 0, result.err
    return result.out


def hf_reference(folder: Path) -> dict:
    """Every tensor of a HF folder read with the reference libraries (safetensors, torch.load), as raw bytes."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    for f in sorted(folder.glob("*.bin")):
        state.update(torch.load(f, weights_only=True))
    return {n: (t.dtype, tuple(t.shape), raw_bytes(t)) for n, t in state.items()}


def assert_reference_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][:2] == b[name][:2], name
        assert torch.equal(a[name][2], b[name][2]), name


@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("layout", list(INPUTS))
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_roundtrip_to_sharded_folder_is_byte_identical(cli, tiny_llama, tmp_path, dtype, layout, shape_id):
    shape = SHAPES[shape_id]
    hf = tiny_llama(shape, dtype=dtype, **INPUTS[layout])
    for name, data in SIDE_FILES.items():
        (hf / name).write_bytes(data)
    ckpt, back = tmp_path / "ms.ckpt", tmp_path / "back"
    run(cli, "--model", "llama", "--input_path", hf, "--output_path", ckpt, "--dtype", FLAG[dtype])
    max_shard = 50_000 if dtype != "F32" else 100_000
    report = run(cli, "--model", "llama", "--reversed", "--input_path", ckpt, "--output_path", f"{back}/",
                 "--config_path", hf, "--dtype", FLAG[dtype], "--max_shard_size", str(max_shard))
    # our reader and the reference readers agree that every tensor is back, bit for bit
    assert_same_tensors(tensors_of(back), tensors_of(hf))
    assert_reference_equal(hf_reference(back), hf_reference(hf))
    if shape.tie_word_embeddings:
        assert "lm_head.weight" in report  # the tied head is left out, and the run says so

    shards = sorted(back.glob("*.safetensors"))
    assert len(shards) > 1 and not list(back.glob("*.bin"))
    index = json.loads((back / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    on_disk, sizes = {}, {n: t[2].numel() for n, t in tensors_of(back).items()}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = list(f.keys())
        on_disk.update({n: shard.name for n in names})
        assert sum(sizes[n] for n in names) <= max_shard, shard.name  # no tensor here exceeds the limit alone
    assert index["weight_map"] == on_disk
    assert index["metadata"]["total_size"] == sum(t[2].numel() for t in tensors_of(hf).values())
    for name in ("config.json", *SIDE_FILES):
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name
    assert not [p.name for p in back.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", list(INPUTS))
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_roundtrip_to_bin_is_a_flat_state_dict_torch_loads(cli, tiny_llama, tmp_path, dtype, layout, tied):
    """`x.bin`: one torch pickle of the flat state dict (MindFormers' reverse); a tied head is in it, as
    MindFormers' state_dict() based forward put it into the .ckpt."""
    hf = tiny_llama(LlamaShape(tie_word_embeddings=tied), dtype=dtype, **INPUTS[layout])
    ckpt, out = tmp_path / "ms.ckpt", tmp_path / "x.bin"
    run(cli, "--model", "llama", "--input_path", hf, "--output_path", ckpt, "--dtype", FLAG[dtype])
    run(cli, "--model", "llama", "--reversed", "--input_path", ckpt, "--output_path", out, "--dtype", FLAG[dtype])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ms.ckpt", "x.bin"]  # no temporary files
    state = torch.load(out, weights_only=True)
    assert type(state) is dict and all(isinstance(v, torch.Tensor) for v in state.values())
    expected = hf_reference(hf)
    if tied:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    assert_reference_equal({n: (t.dtype, tuple(t.shape), raw_bytes(t)) for n, t in state.items()}, expected)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_roundtrip_to_one_safetensors_file(cli, tiny_llama, tmp_path, dtype, tied):
    """`--output_path x.safetensors` on the reverse: one HF safetensors file ({"format": "pt"}), dtype from
    config.json, tied head left out like save_pretrained."""
    from safetensors import safe_open

    hf = tiny_llama(LlamaShape(tie_word_embeddings=tied), dtype=dtype, max_shard_bytes=SHARD)
    ckpt, out = tmp_path / "ms.ckpt", tmp_path / "model.safetensors"
    run(cli, "--model", "llama", "--input_path", hf, "--output_path", ckpt, "--dtype", FLAG[dtype])
    run(cli, "--model", "llama", "--reversed", "--input_path", ckpt, "--output_path", out, "--config_path", hf)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert_reference_equal(_one_file(out), hf_reference(hf))


def _one_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return {n: (t.dtype, tuple(t.shape), raw_bytes(t)) for n, t in load_file(str(path)).items()}


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_mindformers_default_fp32_and_back_without_dtype_gives_the_input_bytes(cli, tiny_llama, tmp_path, dtype):
    """README: without --dtype the forward writes Float32 (MindFormers) and a HF folder output takes
    config.json's torch_dtype, so HF → MS → HF still returns the input bytes."""
    hf = tiny_llama(dtype=dtype)
    ckpt, back = tmp_path / "ms.ckpt", tmp_path / "back"
    run(cli, "--model", "llama", "--input_path", hf, "--output_path", ckpt)
    assert {code for code, _, _ in tensors_of(ckpt).values()} == {"F32"}
    run(cli, "--model", "llama", "--reversed", "--input_path", ckpt, "--output_path", f"{back}/",
        "--config_path", hf)
    assert_same_tensors(tensors_of(back), tensors_of(hf))


# ---- transformers is the judge of the reversed folder ----------------------------------------------

def transformers_llama(folder: Path, dtype: torch.dtype, tied: bool, safe: bool) -> Path:
    """A tiny LlamaForCausalLM built and saved by transformers itself (fixed seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # norms are all ones at init: give them values too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p, dtype=torch.float32).to(dtype))
    model.save_pretrained(folder, safe_serialization=safe, max_shard_size="60KB")
    return folder


def logits(folder: Path, dtype: torch.dtype) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=dtype).eval()
    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 64, 127]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_reversed_folder_loads_in_transformers_with_bit_equal_logits(cli, tmp_path, dtype, tied, safe):
    torch_dtype = TORCH[dtype]
    original = transformers_llama(tmp_path / "orig", torch_dtype, tied, safe)
    assert len(list(original.glob("*.safetensors" if safe else "*.bin"))) > 1  # sharded by transformers
    ckpt, back = tmp_path / "ms.ckpt", tmp_path / "back"
    run(cli, "--model", "llama", "--input_path", original, "--output_path", ckpt, "--dtype", FLAG[dtype])
    run(cli, "--model", "llama", "--reversed", "--input_path", ckpt, "--output_path", f"{back}/",
        "--config_path", original, "--max_shard_size", "60KB")
    assert (back / "model.safetensors.index.json").is_file()
    expected_tensors = tensors_of(original)
    if tied:  # torch.save (bin) keeps the shared head; safetensors output leaves it out, as save_pretrained does
        expected_tensors.pop("lm_head.weight", None)
    assert_same_tensors(tensors_of(back), expected_tensors)
    expected, got = logits(original, torch_dtype), logits(back, torch_dtype)
    assert got.dtype == torch_dtype
    assert torch.equal(raw_bytes(got), raw_bytes(expected))
