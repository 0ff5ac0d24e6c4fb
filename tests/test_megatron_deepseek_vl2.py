"""deepseek_vl2 (remote-code DeepseekVLV2ForCausalLM) ↔ MindSpeed-MM Megatron layout (spec §6.7, §3.3,
§4.1): round trips (MindSpeed-MM has no reverse for it) over TP × EP × PP, MLA's replicated q + kv_a
`linear_qkv` split back by the config's sizes, dense first layer then routed + shared experts, ViT
blocks renumbered per stage, `image_newline` / `view_seperator` on every stage, vocab padded and
stripped (MindSpeed-MM's RowSplit drops the remainder rows)."""

import pytest
import torch
from conftest import assert_same_tensors, tensors_of, write_hf
from megatron_helpers import megatron_round_trip

E, H, VOCAB, EXPERTS = 32, 64, 161, 4
NH, NOPE, ROPE, V, KV_LORA, Q_LORA = 4, 8, 4, 8, 16, 24


def deepseek_vl2(q_lora: bool) -> tuple[dict, dict]:
    """Tensors with the real remote-code names and a config.json: SigLIP ViT, MLP projector, DeepSeek-V2 LLM."""
    g = torch.Generator().manual_seed(1)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    out = {"vision.patch_embed.proj.weight": t(E, 3, 2, 2), "vision.patch_embed.proj.bias": t(E),
           "vision.pos_embed": t(1, 4, E), "vision.norm.weight": t(E), "vision.norm.bias": t(E),
           "vision.attn_pool.latent": t(1, 1, E), "vision.attn_pool.q.weight": t(E, E),
           "projector.layers.0.weight": t(H, E), "projector.layers.0.bias": t(H), "projector.layers.2.weight": t(H, H),
           "projector.layers.2.bias": t(H), "image_newline": t(H), "view_seperator": t(H),
           "language.model.embed_tokens.weight": t(VOCAB, H), "language.model.norm.weight": t(H),
           "language.lm_head.weight": t(VOCAB, H)}
    for i in range(4):
        v = f"vision.blocks.{i}."
        out.update({v + "norm1.weight": t(E), v + "norm1.bias": t(E), v + "norm2.weight": t(E), v + "norm2.bias": t(E),
                    v + "attn.qkv.weight": t(3 * E, E), v + "attn.qkv.bias": t(3 * E), v + "attn.proj.weight": t(E, E),
                    v + "attn.proj.bias": t(E), v + "mlp.fc1.weight": t(64, E), v + "mlp.fc1.bias": t(64),
                    v + "mlp.fc2.weight": t(E, 64), v + "mlp.fc2.bias": t(E)})
        m = f"language.model.layers.{i}."
        out.update({m + "input_layernorm.weight": t(H), m + "post_attention_layernorm.weight": t(H),
                    m + "self_attn.kv_a_proj_with_mqa.weight": t(KV_LORA + ROPE, H),
                    m + "self_attn.kv_a_layernorm.weight": t(KV_LORA),
                    m + "self_attn.kv_b_proj.weight": t(NH * (NOPE + V), KV_LORA),
                    m + "self_attn.o_proj.weight": t(H, NH * V)})
        if q_lora:
            out.update({m + "self_attn.q_a_proj.weight": t(Q_LORA, H), m + "self_attn.q_a_layernorm.weight": t(Q_LORA),
                        m + "self_attn.q_b_proj.weight": t(NH * (NOPE + ROPE), Q_LORA)})
        else:
            out[m + "self_attn.q_proj.weight"] = t(NH * (NOPE + ROPE), H)
        if i == 0:  # first_k_dense_replace = 1
            out.update({m + "mlp.gate_proj.weight": t(96, H), m + "mlp.up_proj.weight": t(96, H),
                        m + "mlp.down_proj.weight": t(H, 96)})
            continue
        out.update({m + "mlp.gate.weight": t(EXPERTS, H), m + "mlp.shared_experts.gate_proj.weight": t(32, H),
                    m + "mlp.shared_experts.up_proj.weight": t(32, H), m + "mlp.shared_experts.down_proj.weight":
                    t(H, 32)})
        if q_lora:
            out[m + "mlp.gate.e_score_correction_bias"] = t(EXPERTS).float()
        for e in range(EXPERTS):
            out.update({m + f"mlp.experts.{e}.gate_proj.weight": t(16, H), m + f"mlp.experts.{e}.up_proj.weight":
                        t(16, H), m + f"mlp.experts.{e}.down_proj.weight": t(H, 16)})
    config = {"architectures": ["DeepseekVLV2ForCausalLM"], "model_type": "deepseek_vl_v2", "tile_tag": "2D",
              "vision_config": {"layers": 4, "width": E, "model_name": "siglip_so400m_patch14_384"},
              "projector_config": {"projector_type": "downsample_mlp_gelu", "input_dim": E, "n_embed": H},
              "language_config": {"architectures": ["DeepseekV2ForCausalLM"], "hidden_size": H,
                                  "num_attention_heads": NH, "num_key_value_heads": NH, "kv_lora_rank": KV_LORA,
                                  "q_lora_rank": Q_LORA if q_lora else None, "qk_nope_head_dim": NOPE,
                                  "qk_rope_head_dim": ROPE, "v_head_dim": V, "n_routed_experts": EXPERTS,
                                  "n_shared_experts": 2, "moe_intermediate_size": 16, "intermediate_size": 96,
                                  "first_k_dense_replace": 1, "num_hidden_layers": 4, "vocab_size": VOCAB}}
    return out, config


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek_vl2")
    return {q: write_hf(root / f"q_lora_{q}", *deepseek_vl2(q)) for q in (False, True)}


def convert(cli, hf, tmp_path, tp, ep=1, vit=None, llm=None, back=True):
    files = megatron_round_trip(cli, "deepseek_vl2", hf, tmp_path, tp, {"vit": vit, "llm": llm}, "--ep", ep, back=back)
    if back:
        assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))
    return files


@pytest.mark.parametrize("tp,ep,vit,llm", [(1, 1, None, None), (2, 1, None, None), (2, 2, "4,0", "1,3"),
                                           (1, 4, "2,2,0", "0,2,2"), (2, 2, "[[2,0],[2,0]]", "[[0,1],[2,1]]")])
@pytest.mark.parametrize("q_lora", [False, True])
def test_deepseek_vl2_hf_to_megatron_to_hf_is_byte_identical(cli, hf_models, tmp_path, q_lora, tp, ep, vit, llm):
    """MindSpeed-MM's mm_to_hf for DeepSeek-VL2 is `pass`, its QKVDirectMergeOp cannot split, its
    ExpertUpGateMergeOp.revert uses one number for layer and expert (spec §2.3, §6.7)."""
    convert(cli, hf_models[q_lora], tmp_path, tp, ep, vit, llm)


def test_deepseek_vl2_rank_shapes(cli, hf_models, tmp_path):
    hf = hf_models[True]
    files = convert(cli, hf, tmp_path, 2, back=False)
    attn, mlp = "text_decoder.decoder.layers.1.self_attention.", "text_decoder.decoder.layers.1.mlp."
    shapes = {  # literal per-rank shapes (spec §3.3); linear_qkv = q_a 24 + kv_a 16 + 4 rows, replicated
        attn + "linear_qkv.weight": (44, 64), attn + "linear_qb.weight": (24, 24), attn + "q_layernorm.weight": (24,),
        attn + "linear_kvb.weight": (32, 16), attn + "k_layernorm.weight": (16,), attn + "linear_proj.weight": (64, 16),
        mlp + "router.weight": (4, 64), mlp + "router.expert_bias": (4,),
        mlp + "experts.local_experts.3.linear_fc1.weight": (16, 64),
        mlp + "experts.local_experts.3.linear_fc2.weight": (64, 8),
        mlp + "shared_experts.linear_fc1.weight": (32, 64), mlp + "shared_experts.linear_fc2.weight": (64, 16),
        "text_decoder.decoder.layers.0.mlp.linear_fc1.weight": (96, 64),
        "text_decoder.embedding.word_embeddings.weight": (81, 64), "text_decoder.output_layer.weight": (81, 64),
        "image_encoder.encoder.blocks.2.attn.qkv.weight": (96, 32), "image_encoder.encoder.pos_embed": (1, 4, 32),
        "image_encoder.encoder.attn_pool.latent": (1, 1, 32), "image_encoder.projector.layers.0.weight": (64, 32),
        "image_newline": (64,), "view_seperator": (64,),
    }
    for rank in range(2):
        state = files[f"release/mp_rank_{rank:02d}"]["model"]
        assert {n: tuple(state[n].shape) for n in shapes} == shapes


def test_deepseek_vl2_vocab_not_dividing_tp_is_padded_and_stripped(cli, hf_models, tmp_path):
    """161 rows at TP 2: MindSpeed-MM's RowSplit writes 80 + 80 and loses the last row (spec §10.2)."""
    hf = hf_models[False]
    files = convert(cli, hf, tmp_path, 2)
    last = files["release/mp_rank_01"]["model"]["text_decoder.embedding.word_embeddings.weight"]
    source = tensors_of(hf)["language.model.embed_tokens.weight"][2].view(torch.bfloat16).reshape(VOCAB, H)
    assert last[:80].equal(source[81:]) and not last[80].any()  # row 160, then one zero row of padding


def test_deepseek_vl2_newline_and_separator_on_every_stage_vit_blocks_renumbered(cli, hf_models, tmp_path):
    hf = hf_models[False]
    files = convert(cli, hf, tmp_path, 1, 1, "2,2,0", "0,2,2", back=False)
    for stage in range(3):
        state = files[f"release/mp_rank_00_{stage:03d}"]["model"]
        assert {"image_newline", "view_seperator"} <= set(state), stage
    blocks = {f: sorted({n.split(".")[3] for n in s["model"] if n.startswith("image_encoder.encoder.blocks.")})
              for f, s in files.items()}
    assert blocks == {"release/mp_rank_00_000": ["0", "1"], "release/mp_rank_00_001": ["0", "1"],
                      "release/mp_rank_00_002": []}
    source = tensors_of(hf)["vision.blocks.3.mlp.fc2.bias"][2]
    assert files["release/mp_rank_00_001"]["model"]["image_encoder.encoder.blocks.1.mlp.fc2.bias"] \
        .view(torch.uint8).equal(source)


def test_deepseek_vl2_mla_qkv_is_q_then_kv_a(cli, hf_models, tmp_path):
    hf = hf_models[False]
    state = convert(cli, hf, tmp_path, 1, back=False)["release/mp_rank_00"]["model"]
    source = tensors_of(hf)
    q = source["language.model.layers.2.self_attn.q_proj.weight"][2]
    kv_a = source["language.model.layers.2.self_attn.kv_a_proj_with_mqa.weight"][2]
    got = state["text_decoder.decoder.layers.2.self_attention.linear_qkv.weight"].view(torch.uint8).flatten()
    assert got.equal(torch.cat([q, kv_a]))
