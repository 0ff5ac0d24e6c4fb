"""bloom: spec §2.9 — per-head [q, k, v] de-interleaved into dense1/2/3, Linear weights transposed."""

import json

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of, write_hf
from test_gpt import assert_loads_in_mindspore, check_reversed_logits, legacy_block, names_shapes, round_trip

H, NH, V, L = 16, 4, 32, 2
D = H // NH


def build(folder, dtype=torch.float32, seed=0):
    """A tiny random BloomForCausalLM saved with save_pretrained (`transformer.`-prefixed names, tied head)."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    model = BloomForCausalLM(BloomConfig(vocab_size=V, hidden_size=H, n_layer=L, n_head=NH)).to(dtype).eval()
    with torch.no_grad():  # LayerNorms start at 1/0 and biases at 0: randomise so a mix-up would show
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_f" in name or name.endswith("bias"):
                p.normal_()
    model.save_pretrained(folder)
    return folder, model


def hub_style(folder, saved, model, dtype=None):
    """What the hub's bloom pytorch_model.bin holds: unprefixed BloomModel keys (MindFormers' input)."""
    state = {n: t.to(dtype or t.dtype) for n, t in model.transformer.state_dict().items()}
    config = json.loads((saved / "config.json").read_text())
    config["torch_dtype"] = str(state["word_embeddings.weight"].dtype).removeprefix("torch.")
    return write_hf(folder, state, config, fmt="bin")


@example("bloom")
def bloom_example(folder, key):
    return hub_style(folder, *build(folder.parent / "saved"), dtype=torch.float16), ()  # the hub files are fp16


def expected_ms(dtype: str = "F32") -> dict:
    """Spec §2.9 table, without the `transformer.` prefix (BloomLMHeadModel has auto_prefix=False)."""
    out = {"embedding.word_embedding.embedding_table": (V, H), "embedding.norm.gamma": (H,),
           "embedding.norm.beta": (H,), "ln_f.gamma": (H,), "ln_f.beta": (H,)}
    for i in range(L):
        out.update(legacy_block(f"blocks.{i}", H))
    return {n: (dtype, s) for n, s in out.items()}


def check_values(out, model) -> None:
    """dense{k} = rows (head, k, :) of the per-head interleaved query_key_value; Linear weights transposed."""
    from mindformers_conv.formats.inputs import open_input

    got, sd = open_input(out).refs, model.state_dict()
    qkv = sd["transformer.h.1.self_attention.query_key_value.weight"].view(NH, 3, D, H)
    bias = sd["transformer.h.1.self_attention.query_key_value.bias"].view(NH, 3, D)
    for k in range(3):
        assert torch.equal(got[f"blocks.1.attention.dense{k + 1}.weight"].read(), qkv[:, k].reshape(H, H))
        assert torch.equal(got[f"blocks.1.attention.dense{k + 1}.bias"].read(), bias[:, k].reshape(H))
    assert torch.equal(got["blocks.1.attention.projection.weight"].read(),
                       sd["transformer.h.1.self_attention.dense.weight"].t())
    assert torch.equal(got["blocks.1.output.mapping.weight"].read(), sd["transformer.h.1.mlp.dense_h_to_4h.weight"].t())
    assert torch.equal(got["embedding.norm.beta"].read(), sd["transformer.word_embeddings_layernorm.bias"])


def test_bloom_forward_from_hub_file(cli, tmp_path):
    hf, model = build(tmp_path / "hf")
    hub = hub_style(tmp_path / "hub", hf, model)
    out = tmp_path / "b.ckpt"
    result = cli("--model", "bloom", "--input_path", hub / "pytorch_model.bin", "--output_path", out)
    assert result.code == 0, result.err
    assert names_shapes(out) == expected_ms()
    check_values(out, model)


def test_bloom_prefixed_input_gives_loadable_names_not_transformer_prefixed(cli, tmp_path):
    """MindFormers re-adds `transformer.` to every MS name of a prefixed input; BloomLMHeadModel's parameters
    have no prefix (auto_prefix=False), so such a .ckpt loads nothing (§2.9)."""
    hf, model = build(tmp_path / "hf")
    out = tmp_path / "b.ckpt"
    result = cli("--model", "bloom", "--input_path", hf, "--output_path", out)
    assert result.code == 0, result.err
    assert names_shapes(out) == expected_ms()
    check_values(out, model)


def test_bloom_heads_come_from_config_and_a_contradicting_flag_is_refused(cli, tmp_path):
    """MindFormers takes --n_head (default 32); a wrong one reshapes fine and scrambles q/k/v (§5.7)."""
    hf, model = build(tmp_path / "hf")
    out = tmp_path / "b.ckpt"
    wrong = cli("--model", "bloom", "--input_path", hf, "--output_path", out, "--n_head", 2)
    assert wrong.code == 2 and "--n_head 2 contradicts config.json, which says 4" in wrong.err and not out.exists()
    assert cli("--model", "bloom", "--input_path", hf, "--output_path", out, "--n_head", NH).code == 0
    check_values(out, model)
    (hf / "config.json").unlink()
    missing = cli("--model", "bloom", "--input_path", hf, "--output_path", tmp_path / "x.ckpt")
    assert missing.code == 3 and "n_head" in missing.err and not (tmp_path / "x.ckpt").exists()
    assert cli("--model", "bloom", "--input_path", hf, "--output_path", tmp_path / "y.ckpt",
               "--n_head", NH, "--hidden_size", H).code == 0
    check_values(tmp_path / "y.ckpt", model)


def test_bloom_ckpt_loads_in_mindspore(cli, tmp_path):
    hf, _ = build(tmp_path / "hf")
    out = tmp_path / "b.ckpt"
    assert cli("--model", "bloom", "--input_path", hf, "--output_path", out, "--dtype", "bf16").code == 0
    assert_loads_in_mindspore(out, expected_ms(), "bfloat16")


@pytest.mark.parametrize("stored, cast", [(torch.float16, None), (torch.float32, None), (torch.bfloat16, "bf16")])
def test_bloom_round_trip_gives_back_bytes(cli, tmp_path, stored, cast):
    hf, model = build(tmp_path / "hf")
    hub = hub_style(tmp_path / "hub", hf, model, dtype=stored)
    folder, pickle = round_trip(cli, tmp_path, "bloom", hub, cast)
    stored_code = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}[stored]
    assert {d for d, _ in names_shapes(tmp_path / "round_trip.ckpt").values()} == {stored_code}  # dtype kept
    assert_same_tensors(tensors_of(folder), tensors_of(hub))
    assert_same_tensors(tensors_of(pickle), tensors_of(hub))


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
def test_bloom_reversed_folder_gives_identical_logits(cli, tmp_path, source):
    hf, model = build(tmp_path / "hf", dtype=source)
    check_reversed_logits(cli, tmp_path, "bloom", hf, model, source)


def test_bloom_lm_head_kept_as_head_weight(cli, tmp_path):
    """A file that stores lm_head.weight: MindFormers writes it as head.weight (unused by the tied BloomHead)."""
    hf, model = build(tmp_path / "hf")
    state = {**model.transformer.state_dict(), "lm_head.weight": torch.randn(V, H)}
    src = write_hf(tmp_path / "src", state, json.loads((hf / "config.json").read_text()))
    ckpt = tmp_path / "b.ckpt"
    assert cli("--model", "bloom", "--input_path", src, "--output_path", ckpt).code == 0
    assert names_shapes(ckpt) == {**expected_ms(), "head.weight": ("F32", (V, H))}
    assert cli("--model", "bloom", "--reversed", "--input_path", ckpt, "--output_path", tmp_path / "b.bin",
               "--config_path", src).code == 0
    assert_same_tensors(tensors_of(tmp_path / "b.bin"), tensors_of(src))


def test_bloom_auto_and_python_api(cli, tmp_path):
    from models.bloom.convert_reversed import convert_ms_to_pt
    from models.bloom.convert_weight import convert_pt_to_ms

    hf, model = build(tmp_path / "hf")
    hub = hub_style(tmp_path / "hub", hf, model)
    result = cli("--model", "auto", "--input_path", hub, "--output_path", tmp_path / "a.ckpt")
    assert result.code == 0 and "bloom" in result.out
    assert convert_pt_to_ms(hub / "pytorch_model.bin", tmp_path / "b.ckpt", dtype=None, n_head=32, hidden_size=4096)
    assert_same_tensors(tensors_of(tmp_path / "b.ckpt"), tensors_of(tmp_path / "a.ckpt"))
    assert convert_ms_to_pt(tmp_path / "b.ckpt", tmp_path / "b.bin", config_path=hub)
    assert_same_tensors(tensors_of(tmp_path / "b.bin"), tensors_of(hub))
