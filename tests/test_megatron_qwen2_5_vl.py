"""qwen2_5_vl ↔ MindSpeed-MM Megatron layout (spec §6.3): the gated ViT MLP with biases as a GLU-split
`linear_fc1` = [gate; up], RMSNorm ViT norms, sizes from vision_config; round trips over TP × PP lists
(including ViT and LLM split differently over the stages), transformers loading the reversed folder,
and the later `model.visual.*` / `model.language_model.*` HF names read as input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import assert_same_tensors, tensors_of
from megatron_helpers import rank_files

VIT_E, VIT_HEADS, VIT_FFN, MERGED, LLM_H = 32, 4, 48, 128, 64
CONFIG = dict(vision_config=dict(depth=4, hidden_size=VIT_E, num_heads=VIT_HEADS, intermediate_size=VIT_FFN,
                                 out_hidden_size=LLM_H, in_channels=3, patch_size=2, temporal_patch_size=2,
                                 spatial_merge_size=2, window_size=8, fullatt_block_indexes=[1, 3]),
              text_config=dict(hidden_size=LLM_H, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                               vocab_size=161, intermediate_size=96))
LAYOUTS = [
    (None, None),
    ("4,0", "1,3"),  # the ViT and the LLM split differently: the whole ViT on stage 0
    ("1,3,0", "0,2,2"),  # the LLM starts after stage 0
    ("[[3,0],[1,0]]", "[[0,1],[2,1]]"),  # VPP 2
]


def write_qwen2_5_vl(folder):
    """A tiny random Qwen2.5-VL in bf16, as transformers' save_pretrained writes it."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**CONFIG)).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl") / "hf")


def convert(cli, *argv):
    r = cli("--model", "qwen2_5_vl", *argv)
    assert r.code == 0, r.err
    return r


def to_megatron(cli, hf, out, tp, vit=None, llm=None):
    flags = ["--tp", tp] + (["--vit_pp_layers", vit] if vit else []) + (["--llm_pp_layers", llm] if llm else [])
    convert(cli, "--input_path", hf, "--output_path", out, "--target", "megatron", *flags)


def back_to_hf(cli, mg, out, hf):
    convert(cli, "--reversed", "--input_path", mg, "--output_path", f"{out}/", "--config_path", hf)


def test_the_fixture_has_the_gated_vit_mlp_with_biases(hf):
    names = set(tensors_of(hf))
    for part in ("gate_proj", "up_proj", "down_proj"):
        assert {f"visual.blocks.0.mlp.{part}.weight", f"visual.blocks.0.mlp.{part}.bias"} <= names
    assert "visual.blocks.0.norm1.bias" not in names and "visual.merger.ln_q.bias" not in names  # RMSNorm


@pytest.mark.parametrize("vit,llm", LAYOUTS)
@pytest.mark.parametrize("tp", [1, 2])
def test_qwen2_5_vl_hf_to_megatron_to_hf_is_byte_identical(cli, hf, tmp_path, tp, vit, llm):
    to_megatron(cli, hf, tmp_path / "mg", tp, vit, llm)
    back_to_hf(cli, tmp_path / "mg", tmp_path / "back", hf)
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))


def test_qwen2_5_vl_vit_mlp_is_a_glu_split_with_biases(cli, hf, tmp_path):
    to_megatron(cli, hf, tmp_path / "mg", 2)
    files = rank_files(tmp_path / "mg")
    source = load_file(hf / "model.safetensors")
    half = VIT_FFN // 2
    vit = "image_encoder.encoder.blocks.layers.2."
    for rank in range(2):
        state = files[f"release/mp_rank_{rank:02d}"]["model"]
        rows = slice(rank * half, (rank + 1) * half)
        for p in ("weight", "bias"):
            gate, up = source[f"visual.blocks.2.mlp.gate_proj.{p}"], source[f"visual.blocks.2.mlp.up_proj.{p}"]
            assert state[f"{vit}mlp.linear_fc1.{p}"].equal(torch.cat([gate[rows], up[rows]]))
        down = source["visual.blocks.2.mlp.down_proj.weight"]
        assert state[f"{vit}mlp.linear_fc2.weight"].equal(down[:, rank * half:(rank + 1) * half])
        assert state[f"{vit}mlp.linear_fc2.bias"].equal(source["visual.blocks.2.mlp.down_proj.bias"])
        assert tuple(state[f"{vit}self_attention.linear_qkv.weight"].shape) == (3 * VIT_E // 2, VIT_E)
        assert tuple(state["image_encoder.projector.encoder.linear_fc1.weight"].shape) == (MERGED // 2, MERGED)
        assert tuple(state["image_encoder.projector.encoder.linear_fc2.weight"].shape) == (LLM_H, MERGED // 2)
        assert state[f"{vit}input_layernorm.weight"].equal(source["visual.blocks.2.norm1.weight"])
        assert f"{vit}input_layernorm.bias" not in state
        assert state["image_encoder.projector.layernorm.weight"].equal(source["visual.merger.ln_q.weight"])


def test_qwen2_5_vl_reversed_folder_loads_with_transformers(cli, hf, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    to_megatron(cli, hf, tmp_path / "mg", 2, "4,0", "1,3")
    back_to_hf(cli, tmp_path / "mg", tmp_path / "back", hf)
    a = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf).state_dict()
    b = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_qwen2_5_vl_later_hf_names_are_read(cli, hf, tmp_path):
    """`model.visual.*` / `model.language_model.*` in, the same Megatron files; back as 4.x names."""
    new = tmp_path / "new"
    new.mkdir()
    tensors = load_file(hf / "model.safetensors")
    renamed = {("model." + n if n.startswith("visual.") else
                n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n): t
               for n, t in tensors.items()}
    assert any(n.startswith("model.language_model.layers.") for n in renamed)
    save_file(renamed, new / "model.safetensors", metadata={"format": "pt"})
    (new / "config.json").write_text((hf / "config.json").read_text())
    to_megatron(cli, hf, tmp_path / "mg_old", 2)
    to_megatron(cli, new, tmp_path / "mg_new", 2)
    a, b = rank_files(tmp_path / "mg_old"), rank_files(tmp_path / "mg_new")
    assert a.keys() == b.keys()
    for folder in a:
        assert a[folder]["model"].keys() == b[folder]["model"].keys()
        assert all(t.equal(b[folder]["model"][n]) for n, t in a[folder]["model"].items())
    back_to_hf(cli, tmp_path / "mg_new", tmp_path / "back", hf)
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))


def test_qwen2_5_vl_is_detected_from_config(cli, hf, tmp_path):
    r = cli("--model", "auto", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron")
    assert r.code == 0 and "qwen2_5_vl" in r.out, r.err
    assert json.loads((hf / "config.json").read_text())["model_type"] == "qwen2_5_vl"
