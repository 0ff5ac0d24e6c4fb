"""qwen2_vl ↔ MindSpeed-MM Megatron layout: round trips over TP × per-modality PP/VPP lists (including a
tower starting after stage 0 and the documentation's VPP shape), per-rank ViT/merger/LLM shapes (spec
§3.3, §6.1–6.2) and placement by the correct rule (§4.4)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import assert_same_tensors, tensors_of
from megatron_helpers import rank_files

VIT_E, VIT_HEADS, VIT_MLP, MERGED = 32, 4, 64, 128
CONFIG = dict(vision_config=dict(depth=4, embed_dim=VIT_E, num_heads=VIT_HEADS, hidden_size=64, mlp_ratio=2,
                                 in_chans=3, patch_size=2, temporal_patch_size=2, spatial_merge_size=2),
              text_config=dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                               vocab_size=161, intermediate_size=96))
LAYOUTS = [
    (None, None),
    ("4,0", "1,5"),
    ("2,2,0", "0,3,3"),  # the LLM starts after stage 0 (MindSpeed-MM HEAD loses layers here, spec §4.5)
    ("[[4,0],[0,0]]", "[[0,1],[2,3]]"),
    ("[[2,1,1,0],[0,0,0,0],[0,0,0,0]]", "[[0,0,0,1],[1,1,1,0],[1,0,0,1]]"),  # the docs' VPP shape, scaled
]


def write_qwen2_vl(folder, tied):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(Qwen2VLConfig(**CONFIG)).to(torch.bfloat16).save_pretrained(folder)
    if tied:  # as Qwen2-VL-2B ships: no lm_head, tie_word_embeddings true
        tensors = load_file(folder / "model.safetensors")
        del tensors["lm_head.weight"]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return folder


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2_vl")
    return {tied: write_qwen2_vl(root / f"tied{tied}", tied) for tied in (False, True)}


def to_megatron(cli, hf, out, tp, vit=None, llm=None, *extra):
    flags = ["--tp", tp] + (["--vit_pp_layers", vit] if vit else []) + (["--llm_pp_layers", llm] if llm else [])
    r = cli("--model", "qwen2_vl", "--input_path", hf, "--output_path", out, "--target", "megatron", *flags, *extra)
    assert r.code == 0, r.err


@pytest.mark.parametrize("vit,llm", LAYOUTS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qwen2_vl_hf_to_megatron_to_hf_is_byte_identical(cli, hf_models, tmp_path, tp, vit, llm):
    hf = hf_models[False]
    to_megatron(cli, hf, tmp_path / "mg", tp, vit, llm)
    r = cli("--model", "qwen2_vl", "--reversed", "--input_path", tmp_path / "mg", "--output_path",
            f"{tmp_path}/back/", "--config_path", hf)
    assert r.code == 0, r.err
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))


@pytest.mark.parametrize("vit,llm", [(None, None), ("2,2,0", "0,3,3")])
def test_qwen2_vl_tied_round_trip_and_head_placement(cli, hf_models, tmp_path, vit, llm):
    hf = hf_models[True]
    to_megatron(cli, hf, tmp_path / "mg", 2, vit, llm)
    files = rank_files(tmp_path / "mg")
    heads = [f for f, s in files.items() if "text_decoder.output_layer.weight" in s["model"]]
    assert heads == ([] if llm is None else ["release/mp_rank_00_002", "release/mp_rank_01_002"])
    r = cli("--model", "qwen2_vl", "--reversed", "--input_path", tmp_path / "mg", "--output_path",
            f"{tmp_path}/back/", "--config_path", hf)
    assert r.code == 0, r.err
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))


def test_qwen2_vl_placement_of_the_docs_vpp_shape(cli, hf_models, tmp_path):
    to_megatron(cli, hf_models[False], tmp_path / "mg", 1, *LAYOUTS[4])
    files = rank_files(tmp_path / "mg")

    def where(prefix):
        return sorted((f.split("_")[-1], k) for f, s in files.items() for k, state in s.items()
                      if k.startswith("model") and any(n.startswith(prefix) for n in state))

    assert where("image_encoder.encoder.patch_embed.") == [("000", "model0")]
    assert where("image_encoder.projector.") == [("002", "model0")]
    assert where("text_decoder.embedding.") == [("003", "model0")]  # D3V0, not D2V1 as HEAD writes
    assert where("text_decoder.decoder.final_layernorm.") == [("003", "model2")]
    assert where("text_decoder.output_layer.") == [("003", "model2")]
    # Layers: D3V0 → 0; D0V1 1; D1V1 2; D2V1 3; D0V2 4; D3V2 5 (each local 0).
    llm = {(f.split("_")[-1], k): sorted({n.split(".")[3] for n in state if n.startswith("text_decoder.decoder.layers.")})
           for f, s in files.items() for k, state in s.items() if k.startswith("model")}
    assert {key: v for key, v in llm.items() if v} == {("003", "model0"): ["0"], ("000", "model1"): ["0"],
                                                       ("001", "model1"): ["0"], ("002", "model1"): ["0"],
                                                       ("000", "model2"): ["0"], ("003", "model2"): ["0"]}
    assert files["release/mp_rank_00_003"]["model1"] == {}  # an empty stage holds an empty chunk


@pytest.mark.parametrize("tp", [2, 4])
def test_qwen2_vl_vit_and_merger_rank_shapes_and_per_head_qkv(cli, hf_models, tmp_path, tp):
    hf = hf_models[False]
    to_megatron(cli, hf, tmp_path / "mg", tp)
    files = rank_files(tmp_path / "mg")
    source = tensors_of(hf)
    qkv_hf = source["visual.blocks.1.attn.qkv.weight"][2].view(torch.bfloat16).reshape(3 * VIT_E, VIT_E)
    d = VIT_E // VIT_HEADS
    q, k, v = qkv_hf.split(VIT_E)
    for rank in range(tp):
        state = files[f"release/mp_rank_{rank:02d}"]["model"]
        vit = "image_encoder.encoder.blocks.layers.1."
        shapes = {
            f"{vit}self_attention.linear_qkv.weight": (3 * VIT_E // tp, VIT_E),
            f"{vit}self_attention.linear_qkv.bias": (3 * VIT_E // tp,),
            f"{vit}self_attention.linear_proj.weight": (VIT_E, VIT_E // tp),
            f"{vit}self_attention.linear_proj.bias": (VIT_E,),
            f"{vit}mlp.linear_fc1.weight": (VIT_MLP // tp, VIT_E),
            f"{vit}mlp.linear_fc2.weight": (VIT_E, VIT_MLP // tp),
            f"{vit}mlp.linear_fc2.bias": (VIT_E,),
            "image_encoder.encoder.patch_embed.proj.weight": (VIT_E, 3, 2, 2, 2),
            "image_encoder.projector.encoder.linear_fc1.weight": (MERGED // tp, MERGED),
            "image_encoder.projector.encoder.linear_fc2.weight": (64, MERGED // tp),
            "text_decoder.embedding.word_embeddings.weight": (-(-161 // tp), 64),
            "text_decoder.decoder.layers.0.self_attention.linear_qkv.bias": ((8 // tp + 2 * max(1, 2 // tp)) * 8,),
        }
        for name, shape in shapes.items():
            assert tuple(state[name].shape) == shape, (rank, name)
        heads = range(rank * VIT_HEADS // tp, (rank + 1) * VIT_HEADS // tp)
        expected = torch.cat([torch.cat([x[h * d:(h + 1) * d] for x in (q, k, v)]) for h in heads])
        assert state[f"{vit}self_attention.linear_qkv.weight"].equal(expected)


def test_qwen2_vl_reversed_folder_loads_with_transformers(cli, hf_models, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    hf = hf_models[False]
    to_megatron(cli, hf, tmp_path / "mg", 2, "2,2", "3,3")
    r = cli("--model", "qwen2_vl", "--reversed", "--input_path", tmp_path / "mg", "--output_path",
            f"{tmp_path}/back/", "--config_path", hf)
    assert r.code == 0, r.err
    a = Qwen2VLForConditionalGeneration.from_pretrained(hf).state_dict()
    b = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_qwen2_vl_vit_heads_not_dividing_tp_is_an_error(cli, hf_models, tmp_path):
    r = cli("--model", "qwen2_vl", "--input_path", hf_models[False], "--output_path", tmp_path / "mg",
            "--target", "megatron", "--tp", "8")
    assert r.code == 2 and "is not divisible by --tp 8" in r.err, r.err
    assert not (tmp_path / "mg").exists()
