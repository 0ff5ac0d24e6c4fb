"""cogvlm2: spec §2.5 / §7 — raw safetensors; EVA2-CLIP → vision_encoder, adapter → mlp_adapter, LLM under
`llm_model.` (video: llama names with wq/wk/wv split; image: expert names kept, w1/w3/w2); source dtype kept."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_same_tensors, example, tensors_of, write_hf
from test_vit import convert, dtype_flag, forward, ms_names, random_state

H, I, NH, NKV, V, L = 8, 12, 4, 2, 16, 2  # LLM hidden, MLP, heads, multi-query heads, vocab, layers
VW, VFF, VP = 6, 10, 5  # EVA width, MLP width, positions (4 patches + cls)
QKV = H + 2 * NKV * (H // NH)  # 16 fused rows: q 8, k 4, v 4
ARCH = {"video": "CogVLMVideoForCausalLM", "image": "CogVLMForCausalLM"}


def config(modal: str) -> dict:
    return {"architectures": [ARCH[modal]],
            "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                         "AutoModelForCausalLM": f"modeling_cogvlm.{ARCH[modal]}"},
            "hidden_size": H, "intermediate_size": I, "num_attention_heads": NH, "num_multi_query_heads": NKV,
            "num_hidden_layers": L, "vocab_size": V, "rms_norm_eps": 1e-5, "template_version": "chat",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "vision_config": {"hidden_size": VW, "intermediate_size": VFF, "num_heads": 2, "num_hidden_layers": 2,
                              "num_positions": VP, "patch_size": 2, "image_size": 4, "in_channels": 3,
                              "hidden_act": "gelu", "layer_norm_eps": 1e-6, "dropout_prob": 0.0}}


def hf_state(modal: str, inv_freq=False, dtype=torch.bfloat16) -> dict:
    s = {"model.vision.patch_embedding.proj.weight": (VW, 3, 2, 2), "model.vision.patch_embedding.proj.bias": (VW,),
         "model.vision.patch_embedding.cls_embedding": (1, VW),
         "model.vision.patch_embedding.position_embedding.weight": (VP, VW),
         "model.vision.linear_proj.linear_proj.weight": (H, VW), "model.vision.linear_proj.norm1.weight": (H,),
         "model.vision.linear_proj.norm1.bias": (H,), "model.vision.linear_proj.dense_h_to_4h.weight": (I, H),
         "model.vision.linear_proj.gate_proj.weight": (I, H), "model.vision.linear_proj.dense_4h_to_h.weight": (H, I),
         "model.vision.conv.weight": (VW, VW, 2, 2), "model.vision.conv.bias": (VW,),
         "model.vision.boi": (1, 1, H), "model.vision.eoi": (1, 1, H),
         "model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(2):
        v = f"model.vision.transformer.layers.{i}"
        s.update({f"{v}.input_layernorm.weight": (VW,), f"{v}.input_layernorm.bias": (VW,),
                  f"{v}.attention.query_key_value.weight": (3 * VW, VW),
                  f"{v}.attention.query_key_value.bias": (3 * VW,),
                  f"{v}.attention.dense.weight": (VW, VW), f"{v}.attention.dense.bias": (VW,),
                  f"{v}.mlp.fc1.weight": (VFF, VW), f"{v}.mlp.fc1.bias": (VFF,), f"{v}.mlp.fc2.weight": (VW, VFF),
                  f"{v}.mlp.fc2.bias": (VW,), f"{v}.post_attention_layernorm.weight": (VW,),
                  f"{v}.post_attention_layernorm.bias": (VW,)})
    experts = ("language", "vision") if modal == "image" else ("language",)
    for i in range(L):
        p = f"model.layers.{i}"
        s.update({f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,)})
        for e in experts:
            s.update({f"{p}.self_attn.{e}_expert_query_key_value.weight": (QKV, H),
                      f"{p}.self_attn.{e}_expert_dense.weight": (H, H), f"{p}.mlp.{e}_mlp.gate_proj.weight": (I, H),
                      f"{p}.mlp.{e}_mlp.up_proj.weight": (I, H), f"{p}.mlp.{e}_mlp.down_proj.weight": (H, I)})
        if modal == "image":
            s[f"{p}.self_attn.vision_expert_query_key_value.bias"] = (QKV,)
    state = random_state(s, dtype)
    if inv_freq:  # the same buffer in every layer (float32)
        for i in range(L):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.tensor([1.0, 0.01])
    return state


def expected_ms(modal: str, dtype="BF16", freqs=False) -> dict:
    """Spec §2.5 tables, literally."""
    out = {"vision_encoder.cls_token": (1, 1, VW), "vision_encoder.pos_embed": (1, VP, VW),
           "vision_encoder.patch_embed.proj.weight": (VW, 3, 2, 2), "vision_encoder.patch_embed.proj.bias": (VW,),
           "mlp_adapter.linear_proj.linear_proj.weight": (H, VW), "mlp_adapter.linear_proj.norm1.gamma": (H,),
           "mlp_adapter.linear_proj.norm1.beta": (H,), "mlp_adapter.linear_proj.dense_h_to_4h.weight": (I, H),
           "mlp_adapter.linear_proj.gate_proj.weight": (I, H), "mlp_adapter.linear_proj.dense_4h_to_h.weight": (H, I),
           "mlp_adapter.conv.weight": (VW, VW, 2, 2), "mlp_adapter.conv.bias": (VW,),
           "mlp_adapter.boi": (1, 1, H), "mlp_adapter.eoi": (1, 1, H),
           "llm_model.model.tok_embeddings.embedding_weight": (V, H), "llm_model.model.norm_out.weight": (H,),
           "llm_model.lm_head.weight": (V, H)}
    for i in range(2):
        b = f"vision_encoder.blocks.{i}"
        out.update({f"{b}.norm1.gamma": (VW,), f"{b}.norm1.beta": (VW,), f"{b}.attn.qkv.weight": (3 * VW, VW),
                    f"{b}.attn.qkv.bias": (3 * VW,), f"{b}.attn.proj.weight": (VW, VW), f"{b}.attn.proj.bias": (VW,),
                    f"{b}.mlp.fc1.weight": (VFF, VW), f"{b}.mlp.fc1.bias": (VFF,), f"{b}.mlp.fc2.weight": (VW, VFF),
                    f"{b}.mlp.fc2.bias": (VW,), f"{b}.norm2.gamma": (VW,), f"{b}.norm2.beta": (VW,)})
    for i in range(L):
        p = f"llm_model.model.layers.{i}"
        if modal == "video":
            kv = NKV * (H // NH)
            out.update({f"{p}.attention.wq.weight": (H, H), f"{p}.attention.wk.weight": (kv, H),
                        f"{p}.attention.wv.weight": (kv, H), f"{p}.attention.wo.weight": (H, H),
                        f"{p}.attention_norm.weight": (H,), f"{p}.ffn_norm.weight": (H,),
                        f"{p}.feed_forward.w1.weight": (I, H), f"{p}.feed_forward.w3.weight": (I, H),
                        f"{p}.feed_forward.w2.weight": (H, I)})
            continue
        out.update({f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                    f"{p}.self_attn.vision_expert_query_key_value.bias": (QKV,)})
        for e in ("language", "vision"):
            out.update({f"{p}.self_attn.{e}_expert_query_key_value.weight": (QKV, H),
                        f"{p}.self_attn.{e}_expert_dense.weight": (H, H), f"{p}.mlp.{e}_mlp.w1.weight": (I, H),
                        f"{p}.mlp.{e}_mlp.w3.weight": (I, H), f"{p}.mlp.{e}_mlp.w2.weight": (H, I)})
    out = {n: (dtype, s) for n, s in out.items()}
    if freqs:
        out["llm_model.model.freqs_mgr.freqs"] = ("F32", (2,))
    return out


def write_shards(folder, state: dict, modal: str):
    """Two *.safetensors files and no index: MindFormers globs and merges every one of them."""
    names = sorted(state)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    folder.mkdir(parents=True)
    for k, part in enumerate(halves, 1):
        save_file({n: state[n].contiguous() for n in part}, str(folder / f"model-0000{k}-of-00002.safetensors"))
    (folder / "config.json").write_text(json.dumps(config(modal)))
    return folder


@pytest.mark.parametrize("modal", ["video", "image"])
@pytest.mark.parametrize("flag, dtype", [(None, "BF16"), ("fp32", "F32")])
def test_cogvlm2_forward_names_shapes_and_dtypes(cli, tmp_path, modal, flag, dtype):
    hf = write_hf(tmp_path / "hf", hf_state(modal), config(modal))
    assert forward(cli, "cogvlm2", hf, tmp_path, *dtype_flag(flag)) == expected_ms(modal, dtype)


def test_cogvlm2_video_qkv_split_sizes_come_from_config_not_hard_coded(cli, tmp_path):
    """§5.9: MindFormers splits at rows 4096/5120 (Llama3-8B only); here q = hidden_size rows, k and v the rest."""
    state = hf_state("video")
    hf = write_hf(tmp_path / "hf", state, config("video"))
    out = tmp_path / "c.ckpt"
    convert(cli, "--model", "cogvlm2", "--input_path", hf, "--output_path", out)
    from mindformers_conv.formats.inputs import open_input

    refs, fused = open_input(out).refs, state["model.layers.1.self_attn.language_expert_query_key_value.weight"]
    kv = NKV * (H // NH)
    for part, rows in (("wq", fused[:H]), ("wk", fused[H:H + kv]), ("wv", fused[H + kv:])):
        assert torch.equal(refs[f"llm_model.model.layers.1.attention.{part}.weight"].read(), rows)
    cls = state["model.vision.patch_embedding.cls_embedding"]
    assert torch.equal(refs["vision_encoder.cls_token"].read(), cls[None])


def test_cogvlm2_ckpt_loads_in_mindspore(cli, tmp_path):
    import mindspore as ms

    hf = write_hf(tmp_path / "hf", hf_state("image"), config("image"))
    convert(cli, "--model", "cogvlm2", "--input_path", hf, "--output_path", tmp_path / "c.ckpt")
    params = ms.load_checkpoint(str(tmp_path / "c.ckpt"))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected_ms("image").items()}
    assert {p.dtype for p in params.values()} == {ms.bfloat16}


@pytest.mark.parametrize("modal", ["video", "image"])
@pytest.mark.parametrize("cast", [None, "fp32"])
def test_cogvlm2_round_trip_gives_back_the_hf_bytes(cli, tmp_path, modal, cast):
    """MindFormers has no cogvlm2 reverse; ours is the exact inverse (the folder takes config.json's bfloat16)."""
    hf = write_shards(tmp_path / "hf", hf_state(modal), modal)
    ckpt = tmp_path / "c.ckpt"
    convert(cli, "--model", "cogvlm2", "--input_path", hf, "--output_path", ckpt,
            *dtype_flag(cast), "--verify")
    convert(cli, "--model", "cogvlm2", "--reversed", "--input_path", ckpt, "--output_path", f"{tmp_path}/back/",
            "--config_path", hf)
    assert_same_tensors(tensors_of(tmp_path / "back"), tensors_of(hf))


def test_cogvlm2_first_inv_freq_becomes_freqs_mgr_freqs(cli, tmp_path):
    """One layer's inv_freq → llm_model.model.freqs_mgr.freqs (stored dtype kept); the others are dropped.
    The reverse gives back layer 0's buffer (the others are recomputed by the HF model)."""
    state = hf_state("video", inv_freq=True)
    hf = write_hf(tmp_path / "hf", state, config("video"))
    out, back = tmp_path / "c.ckpt", tmp_path / "back.bin"
    result = convert(cli, "--model", "cogvlm2", "--input_path", hf, "--output_path", out)
    assert ms_names(out) == expected_ms("video", freqs=True)
    assert "rotary inv_freq" in result.out
    convert(cli, "--model", "cogvlm2", "--reversed", "--input_path", out, "--output_path", back, "--config_path", hf)
    got = tensors_of(back)
    assert [n for n in got if "inv_freq" in n] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert torch.equal(torch.load(back, weights_only=True)["model.layers.0.self_attn.rotary_emb.inv_freq"],
                       state["model.layers.0.self_attn.rotary_emb.inv_freq"])


@pytest.mark.parametrize("modal", ["video", "image"])
def test_cogvlm2_model_auto_from_architectures(cli, tmp_path, modal):
    hf = write_hf(tmp_path / "hf", hf_state(modal), config(modal))
    result = convert(cli, "--model", "auto", "--input_path", hf, "--output_path", tmp_path / "c.ckpt")
    assert f"model: cogvlm2 (detected from config.json architectures; {modal} model, from config.json" in result.out
    assert ms_names(tmp_path / "c.ckpt") == expected_ms(modal)


def test_cogvlm2_modal_flag_selects_the_image_rules(cli, tmp_path):
    cfg = {k: v for k, v in config("image").items() if k not in ("architectures", "auto_map")}
    hf = write_hf(tmp_path / "hf", hf_state("image"), cfg)
    said = convert(cli, "--model", "cogvlm2", "--input_path", hf, "--output_path", tmp_path / "c.ckpt", "--modal", "image")
    assert "model: cogvlm2 (image model, from --modal)" in said.out
    assert ms_names(tmp_path / "c.ckpt") == expected_ms("image")


@example("cogvlm2")
def cogvlm2_example(folder, key):
    return write_shards(folder, hf_state("video"), "video"), ()
