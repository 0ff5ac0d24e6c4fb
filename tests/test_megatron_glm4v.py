"""glm4v (GLM-4.1V) ↔ MindSpeed-MM Megatron layout (spec §6.8, §4.1): round trips over TP × PP/VPP lists,
the vision schema's extra first/last-stage tensors, and real TP splits where MindSpeed-MM writes full
replicas (its GLM pattern dict is empty, spec §3.3)."""

import pytest
import torch
from conftest import assert_same_tensors, tensors_of
from megatron_helpers import megatron_round_trip

VISION = dict(depth=4, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64, in_channels=3,
              patch_size=2, temporal_patch_size=2, spatial_merge_size=2, image_size=8)
TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=161,
            intermediate_size=96, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]})
LAYOUTS = [(None, None), ("4,0", "1,3"), ("1,3,0", "0,2,2"), ("[[2,0],[2,0]]", "[[0,1],[2,1]]")]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    folder = tmp_path_factory.mktemp("glm4v") / "hf"
    torch.manual_seed(0)
    model = Glm4vForConditionalGeneration(Glm4vConfig(vision_config=VISION, text_config=TEXT))
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def convert(cli, hf, tmp_path, tp, vit=None, llm=None, back=True):
    return megatron_round_trip(cli, "glm4v", hf, tmp_path, tp, {"vit": vit, "llm": llm}, back=back)


@pytest.mark.parametrize("vit,llm", LAYOUTS)
@pytest.mark.parametrize("tp", [1, 2])
def test_glm4v_hf_to_megatron_to_hf_is_byte_identical(cli, hf, tmp_path, tp, vit, llm):
    convert(cli, hf, tmp_path, tp, vit, llm)
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))


def test_glm4v_tp2_splits_the_megatron_parallel_layers(cli, hf, tmp_path):
    """MindSpeed-MM writes every tensor whole at TP 2; Megatron's parallel layers need their shard."""
    files = convert(cli, hf, tmp_path, 2, back=False)
    vit, llm = "image_encoder.encoder.blocks.layers.1.", "text_decoder.decoder.layers.1."
    shapes = {  # literal per-rank shapes: LLM 8 heads / 2 kv of 8, ffn 96; ViT MLP 64; vocab 161 → 162
        llm + "self_attention.linear_qkv.weight": (48, 64), llm + "self_attention.linear_qkv.bias": (48,),
        llm + "self_attention.linear_proj.weight": (64, 32), llm + "mlp.linear_fc1.weight": (96, 64),
        llm + "mlp.linear_fc2.weight": (64, 48), llm + "post_self_attn_layernorm.weight": (64,),
        llm + "post_mlp_layernorm.weight": (64,), llm + "pre_mlp_layernorm.weight": (64,),
        "text_decoder.embedding.word_embeddings.weight": (81, 64), "text_decoder.output_layer.weight": (81, 64),
        vit + "mlp.linear_fc1.weight": (64, 32), vit + "mlp.linear_fc2.weight": (32, 32),
        vit + "self_attention.qkv.weight": (96, 32), vit + "self_attention.proj.weight": (32, 32),
        "image_encoder.projector.gate_proj.weight": (48, 64), "image_encoder.projector.proj.weight": (64, 64),
        "image_encoder.encoder.downsample.weight": (64, 32, 2, 2),
        "image_encoder.encoder.blocks.final_layernorm.weight": (32,),
    }
    source = tensors_of(hf)
    up = source["model.visual.blocks.1.mlp.up_proj.weight"][2].view(torch.bfloat16).reshape(64, 32)
    for rank in range(2):
        state = files[f"release/mp_rank_{rank:02d}"]["model"]
        assert {n: tuple(state[n].shape) for n in shapes} == shapes
        assert state[vit + "mlp.linear_fc1.weight"][32:].equal(up[rank * 32:(rank + 1) * 32])  # [gate_r; up_r]
        assert state[vit + "self_attention.qkv.weight"].view(torch.uint8).flatten() \
            .equal(source["model.visual.blocks.1.attn.qkv.weight"][2])  # replicated, [Q; K; V] as in HF


def test_glm4v_vision_firsts_and_lasts_follow_the_vit_stages(cli, hf, tmp_path):
    files = convert(cli, hf, tmp_path, 1, "1,3,0", "0,2,2", back=False)
    where = {n: f[-3:] for f, s in files.items() for n in s["model"] if not n.split(".")[-2].isdigit()}
    assert {n: where[n] for n in ("image_encoder.encoder.patch_embed.proj.weight",
                                  "image_encoder.encoder.post_conv_layernorm.weight",
                                  "image_encoder.encoder.embeddings.position_embedding.weight",
                                  "image_encoder.encoder.blocks.final_layernorm.weight",
                                  "image_encoder.encoder.downsample.bias", "image_encoder.projector.proj.weight",
                                  "text_decoder.embedding.word_embeddings.weight",
                                  "text_decoder.output_layer.weight")} == {
        "image_encoder.encoder.patch_embed.proj.weight": "000",
        "image_encoder.encoder.post_conv_layernorm.weight": "000",
        "image_encoder.encoder.embeddings.position_embedding.weight": "000",
        "image_encoder.encoder.blocks.final_layernorm.weight": "001", "image_encoder.encoder.downsample.bias": "001",
        "image_encoder.projector.proj.weight": "001", "text_decoder.embedding.word_embeddings.weight": "001",
        "text_decoder.output_layer.weight": "002"}


def test_glm4v_reversed_folder_loads_with_transformers(cli, hf, tmp_path):
    from transformers import Glm4vForConditionalGeneration

    convert(cli, hf, tmp_path, 2, "4,0", "1,3")
    a = Glm4vForConditionalGeneration.from_pretrained(hf).state_dict()
    b = Glm4vForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
