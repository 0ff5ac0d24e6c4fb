"""qwen2_5_omni (the thinker) ↔ MindSpeed-MM Megatron layout (spec §6.4, §3.3, §4.1): round trips over
TP × vision / text / audio PP lists, the audio tower's per-head `linear_qkv` with a zero k bias, the
full model's `thinker.` names (talker and token2wav left out and listed), transformers loading the
reversed thinker."""

import json

import pytest
import torch
from safetensors.torch import load_file
from conftest import assert_same_tensors, tensors_of, write_hf
from megatron_helpers import megatron_round_trip

AUDIO = dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=48, encoder_layers=4, num_mel_bins=16,
             output_dim=64, max_source_positions=20, n_window=4)
VISION = dict(depth=4, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64, in_channels=3,
              patch_size=2, temporal_patch_size=2, spatial_merge_size=2, fullatt_block_indexes=[1, 3], window_size=8)
TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=161,
            intermediate_size=96, rope_scaling={"type": "default", "mrope_section": [2, 1, 1]})
LAYOUTS = [(None, None, None), ("4,0", "1,3", "4,0"), ("1,3,0", "0,2,2", "2,2,0"),
           ("[[2,0],[2,0]]", "[[0,1],[2,1]]", "[[4,0],[0,0]]")]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """The thinker as transformers saves it, and a full model: `thinker.` names, a talker and token2wav."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    root = tmp_path_factory.mktemp("qwen2_5_omni")
    torch.manual_seed(0)
    config = Qwen2_5OmniThinkerConfig(audio_config=AUDIO, vision_config=VISION, text_config=TEXT)
    Qwen2_5OmniThinkerForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(root / "thinker")
    tensors = {f"thinker.{n}": t for n, t in load_file(root / "thinker" / "model.safetensors").items()}
    tensors.update({"talker.model.embed_tokens.weight": torch.ones(8, 4, dtype=torch.bfloat16),
                    "token2wav.code2wav_bigvgan_model.conv_pre.weight": torch.ones(4, 4, 3, dtype=torch.bfloat16)})
    thinker_config = json.loads((root / "thinker" / "config.json").read_text())
    full = {"architectures": ["Qwen2_5OmniForConditionalGeneration"], "model_type": "qwen2_5_omni",
            "thinker_config": thinker_config, "talker_config": {}, "token2wav_config": {}}
    return {"thinker": root / "thinker", "full": write_hf(root / "full", tensors, full)}


def convert(cli, hf, tmp_path, tp, vit=None, llm=None, audio=None, *extra, back=True):
    return megatron_round_trip(cli, "qwen2_5_omni", hf, tmp_path, tp, {"vit": vit, "llm": llm, "audio": audio},
                               *extra, back=back)


@pytest.mark.parametrize("vit,llm,audio", LAYOUTS)
@pytest.mark.parametrize("tp", [1, 2])
def test_qwen2_5_omni_thinker_hf_to_megatron_to_hf_is_byte_identical(cli, hf_models, tmp_path, tp, vit, llm, audio):
    convert(cli, hf_models["thinker"], tmp_path, tp, vit, llm, audio)
    assert_same_tensors(tensors_of(hf_models["thinker"]), tensors_of(tmp_path / "back"))


def test_qwen2_5_omni_towers_on_their_own_tp(cli, hf_models, tmp_path):
    hf = hf_models["thinker"]
    files = convert(cli, hf, tmp_path, 2, None, None, None, "--vit_tp", "1", "--audio_tp", "1")
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))
    for rank in range(2):
        state = files[f"release/mp_rank_{rank:02d}"]["model"]
        assert tuple(state["audio_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.weight"].shape) == (96, 32)
        assert tuple(state["image_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.weight"].shape) == (96, 32)
        assert tuple(state["text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"].shape) == (48, 64)


def test_qwen2_5_omni_rank_shapes_and_audio_qkv_with_a_zero_k_bias(cli, hf_models, tmp_path):
    hf = hf_models["thinker"]
    files = convert(cli, hf, tmp_path, 2, back=False)
    audio, vit = "audio_encoder.encoder.blocks.layers.1.", "image_encoder.encoder.blocks.layers.1."
    shapes = {  # literal per-rank shapes (spec §3.3): audio and ViT 4 heads of 8, LLM 8 / 2 kv heads of 8
        audio + "self_attention.linear_qkv.weight": (48, 32), audio + "self_attention.linear_qkv.bias": (48,),
        audio + "self_attention.linear_proj.weight": (32, 16), audio + "self_attention.linear_proj.bias": (32,),
        audio + "mlp.linear_fc1.weight": (24, 32), audio + "mlp.linear_fc1.bias": (24,),
        audio + "mlp.linear_fc2.weight": (32, 24), audio + "input_layernorm.weight": (32,),
        "audio_encoder.encoder.conv1.weight": (32, 16, 3), "audio_encoder.encoder.audio_bos_eos_token.weight": (2, 64),
        "audio_encoder.encoder.proj.weight": (64, 32), "audio_encoder.encoder.ln_post.bias": (32,),
        vit + "self_attention.linear_qkv.weight": (48, 32), vit + "self_attention.linear_qkv.bias": (48,),
        vit + "mlp.linear_fc1.weight": (48, 32), vit + "mlp.linear_fc2.weight": (32, 24),
        "text_decoder.decoder.layers.1.self_attention.linear_qkv.bias": (48,),
        "text_decoder.embedding.word_embeddings.weight": (81, 64),
    }
    source = load_file(hf / "model.safetensors")
    q, v = source["audio_tower.layers.1.self_attn.q_proj.bias"], source["audio_tower.layers.1.self_attn.v_proj.bias"]
    for rank in range(2):
        state = files[f"release/mp_rank_{rank:02d}"]["model"]
        assert {n: tuple(state[n].shape) for n in shapes} == shapes
        heads = range(2 * rank, 2 * rank + 2)  # per head [q_h; k_h; v_h], k_h zeros
        expected = torch.cat([torch.cat([q[h * 8:(h + 1) * 8], torch.zeros(8, dtype=q.dtype), v[h * 8:(h + 1) * 8]])
                              for h in heads])
        assert state[audio + "self_attention.linear_qkv.bias"].equal(expected)


def test_qwen2_5_omni_audio_firsts_and_lasts_follow_the_audio_stages(cli, hf_models, tmp_path):
    files = convert(cli, hf_models["thinker"], tmp_path, 1, "1,3,0", "0,2,2", "2,2,0", back=False)

    def stages(prefix):
        return sorted(f[-3:] for f, s in files.items() if any(n.startswith(prefix) for n in s["model"]))

    assert stages("audio_encoder.encoder.conv1.") == ["000"]
    assert stages("audio_encoder.encoder.audio_bos_eos_token.") == ["000"]
    assert stages("audio_encoder.encoder.proj.") == ["001"] and stages("audio_encoder.encoder.ln_post.") == ["001"]
    assert stages("audio_encoder.encoder.blocks.layers.") == ["000", "001"]


def test_qwen2_5_omni_full_model_converts_the_thinker_and_lists_the_rest(cli, hf_models, tmp_path):
    hf = hf_models["full"]
    convert(cli, hf, tmp_path, 2, "4,0", "1,3", "4,0")
    source = tensors_of(hf)
    thinker = {n: t for n, t in source.items() if n.startswith("thinker.")}
    assert len(thinker) == len(source) - 2
    assert_same_tensors(thinker, tensors_of(tmp_path / "back"))


def test_qwen2_5_omni_full_model_leaves_out_talker_and_token2wav_by_name(cli, hf_models, tmp_path):
    r = cli("--model", "qwen2_5_omni", "--input_path", hf_models["full"], "--output_path", tmp_path / "mg",
            "--target", "megatron")
    assert r.code == 0, r.err
    assert "talker" in r.out + r.err and "token2wav" in r.out + r.err


def test_qwen2_5_omni_reversed_thinker_loads_with_transformers(cli, hf_models, tmp_path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    hf = hf_models["thinker"]
    convert(cli, hf, tmp_path, 2, "1,3,0", "0,2,2", "2,2,0")
    a = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(hf).state_dict()
    b = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
