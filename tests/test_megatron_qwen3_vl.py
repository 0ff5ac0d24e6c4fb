"""qwen3_vl ↔ MindSpeed-MM Megatron layout (spec §6.6, §3.3): round trips over TP × per-modality PP/VPP
lists, per-rank shapes, deepstack mergers under their ViT block (travelling with it through the
pipeline), `pos_embed` on the first ViT stage, and transformers loading the reversed folder."""

import json

import pytest
import torch
from conftest import assert_same_tensors, tensors_of
from megatron_helpers import megatron_round_trip

VISION = dict(depth=4, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64, in_channels=3,
              patch_size=2, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
              deepstack_visual_indexes=[1, 2])
TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            vocab_size=161, intermediate_size=96,
            rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True})
LAYOUTS = [(None, None), ("4,0", "1,3"), ("1,3,0", "0,2,2"), ("[[2,0],[2,0]]", "[[0,1],[2,1]]")]


def write_qwen3_vl(folder, moe: dict | None = None):
    """A tiny random Qwen3-VL (or, with `moe`, Qwen3-VL-MoE text settings) in bf16, via save_pretrained."""
    import transformers

    torch.manual_seed(0)
    name = "Qwen3VLMoe" if moe else "Qwen3VL"
    config = getattr(transformers, f"{name}Config")(vision_config=VISION, text_config={**TEXT, **(moe or {})})
    getattr(transformers, f"{name}ForConditionalGeneration")(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def convert(cli, key, hf, tmp_path, tp, vit=None, llm=None, *extra, back=True):
    return megatron_round_trip(cli, key, hf, tmp_path, tp, {"vit": vit, "llm": llm}, *extra, back=back)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl") / "hf")


@pytest.mark.parametrize("vit,llm", LAYOUTS)
@pytest.mark.parametrize("tp", [1, 2])
def test_qwen3_vl_hf_to_megatron_to_hf_is_byte_identical(cli, hf, tmp_path, tp, vit, llm):
    convert(cli, "qwen3_vl", hf, tmp_path, tp, vit, llm)
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))


def test_qwen3_vl_rank_shapes(cli, hf, tmp_path):
    files = convert(cli, "qwen3_vl", hf, tmp_path, 2, back=False)
    vit, llm = "image_encoder.encoder.blocks.layers.1.", "text_decoder.decoder.layers.0."
    shapes = {  # literal per-rank shapes (spec §3.3): ViT 4 heads of 8, LLM 8 heads / 2 kv of 16, vocab 161 → 162
        vit + "self_attention.linear_qkv.weight": (48, 32), vit + "self_attention.linear_qkv.bias": (48,),
        vit + "self_attention.linear_proj.weight": (32, 16), vit + "self_attention.linear_proj.bias": (32,),
        vit + "mlp.linear_fc1.weight": (24, 32), vit + "mlp.linear_fc1.bias": (24,),
        vit + "mlp.linear_fc2.weight": (32, 24), vit + "mlp.linear_fc2.bias": (32,),
        vit + "input_layernorm.bias": (32,),
        vit + "deepstack_layer.layernorm.weight": (128,),
        vit + "deepstack_layer.encoder.linear_fc1.weight": (64, 128),
        vit + "deepstack_layer.encoder.linear_fc1.bias": (64,),
        vit + "deepstack_layer.encoder.linear_fc2.weight": (64, 64),
        vit + "deepstack_layer.encoder.linear_fc2.bias": (64,),
        "image_encoder.encoder.patch_embed.proj.bias": (32,), "image_encoder.encoder.pos_embed.weight": (16, 32),
        "image_encoder.projector.layernorm.weight": (32,),
        "image_encoder.projector.encoder.linear_fc1.weight": (64, 128),
        "image_encoder.projector.encoder.linear_fc2.weight": (64, 64),
        llm + "self_attention.linear_qkv.weight": (96, 64), llm + "self_attention.linear_proj.weight": (64, 64),
        llm + "self_attention.q_layernorm.weight": (16,), llm + "self_attention.k_layernorm.weight": (16,),
        llm + "mlp.linear_fc1.weight": (96, 64), llm + "mlp.linear_fc2.weight": (64, 48),
        "text_decoder.embedding.word_embeddings.weight": (81, 64), "text_decoder.output_layer.weight": (81, 64),
    }
    for rank in range(2):
        state = files[f"release/mp_rank_{rank:02d}"]["model"]
        assert {n: tuple(state[n].shape) for n in shapes} == shapes
    assert not any("deepstack" in n for n in state if n.startswith(("image_encoder.encoder.blocks.layers.0.",
                                                                      "image_encoder.encoder.blocks.layers.3.")))


def test_qwen3_vl_deepstack_mergers_travel_with_their_vit_block(cli, hf, tmp_path):
    files = convert(cli, "qwen3_vl", hf, tmp_path, 1, "2,2", "1,3", back=False)
    source = tensors_of(hf)
    first, second = files["release/mp_rank_00_000"]["model"], files["release/mp_rank_00_001"]["model"]
    # deepstack_visual_indexes [1, 2]: merger 0 under block 1 (stage 0, local 1), merger 1 under block 2
    # (stage 1, local 0).
    for state, local, j in ((first, 1, 0), (second, 0, 1)):
        got = state[f"image_encoder.encoder.blocks.layers.{local}.deepstack_layer.encoder.linear_fc2.weight"]
        merger = source[f"model.visual.deepstack_merger_list.{j}.linear_fc2.weight"][2]
        assert got.view(torch.uint8).flatten().equal(merger)
    assert "image_encoder.encoder.pos_embed.weight" in first and "image_encoder.encoder.pos_embed.weight" not in second
    assert "image_encoder.projector.layernorm.weight" in second


def test_qwen3_vl_deepstack_index_not_in_config_is_an_error(cli, hf, tmp_path):
    convert(cli, "qwen3_vl", hf, tmp_path, 1, back=False)
    config = json.loads((hf / "config.json").read_text())
    config["vision_config"]["deepstack_visual_indexes"] = [0, 3]
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(config))
    r = cli("--model", "qwen3_vl", "--reversed", "--input_path", tmp_path / "mg", "--output_path",
            f"{tmp_path}/back/", "--config_path", tmp_path / "cfg")
    assert r.code == 3 and "is none of [0, 3]" in r.err, r.err


def test_qwen3_vl_reversed_folder_loads_with_transformers(cli, hf, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    convert(cli, "qwen3_vl", hf, tmp_path, 2, "1,3,0", "0,2,2")
    a = Qwen3VLForConditionalGeneration.from_pretrained(hf).state_dict()
    b = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_qwen3_vl_reverse_leaves_the_input_folder_mode_alone(cli, hf, tmp_path):
    """MindSpeed-MM's Qwen3-VL mm_to_hf chmods the Megatron input folder (spec §6.6)."""
    convert(cli, "qwen3_vl", hf, tmp_path, 1, back=False)
    (tmp_path / "mg").chmod(0o755)
    r = cli("--model", "qwen3_vl", "--reversed", "--input_path", tmp_path / "mg", "--output_path",
            f"{tmp_path}/back/", "--config_path", hf)
    assert r.code == 0, r.err
    assert (tmp_path / "mg").stat().st_mode & 0o777 == 0o755


def test_qwen3_vl_is_detected_from_config(cli, hf, tmp_path):
    r = cli("--model", "auto", "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron")
    assert r.code == 0 and "qwen3_vl" in r.out, r.err
