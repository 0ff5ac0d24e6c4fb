"""internvl (remote-code InternVLChatModel) ↔ MindSpeed-MM Megatron layout (spec §6.5, §3.3): round trips
over TP × per-modality PP/VPP lists for the Qwen2, Llama and InternLM2 language models; vocab rows and
ViT heads dealt out unevenly (UnalignedEmbeddingSplit / UnalignedRowSplit / UnalignedColSplit), with a
merge that is the inverse of the split (MindSpeed-MM's is not, spec §10.3)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from conftest import assert_same_tensors, tensors_of, write_hf
from megatron_helpers import megatron_round_trip

from mindformers_conv.megatron.tensor_parallel import UNEVEN, merge, shard, uneven_col, uneven_qkv

E, VIT_HEADS, VIT_FFN, H, VOCAB = 24, 3, 48, 64, 161  # 3 ViT heads and vocab 161: neither divides TP 2
LAYOUTS = [(None, None), ("4,0", "1,3"), ("1,3,0", "0,2,2"), ("[[3,0],[1,0]]", "[[0,1],[2,1]]")]
VIT = "image_encoder.encoder.encoder.layers.{}."


def internvl_tensors(llm: str) -> dict:
    """InternVL's remote-code names: InternViT (qkv bias, qk-norm), the mlp1 projector, the language model."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    out = {"vision_model.embeddings.class_embedding": t(1, 1, E), "vision_model.embeddings.patch_embedding.weight":
           t(E, 3, 2, 2), "vision_model.embeddings.patch_embedding.bias": t(E),
           "vision_model.embeddings.position_embedding": t(1, 5, E),
           "mlp1.0.weight": t(4 * E), "mlp1.0.bias": t(4 * E), "mlp1.1.weight": t(H, 4 * E), "mlp1.1.bias": t(H),
           "mlp1.3.weight": t(H, H), "mlp1.3.bias": t(H)}
    for i in range(4):
        v = f"vision_model.encoder.layers.{i}."
        out.update({v + "attn.qkv.weight": t(3 * E, E), v + "attn.qkv.bias": t(3 * E), v + "attn.q_norm.weight": t(E),
                    v + "attn.k_norm.weight": t(E), v + "attn.proj.weight": t(E, E), v + "attn.proj.bias": t(E),
                    v + "mlp.fc1.weight": t(VIT_FFN, E), v + "mlp.fc1.bias": t(VIT_FFN), v + "mlp.fc2.weight":
                    t(E, VIT_FFN), v + "mlp.fc2.bias": t(E), v + "norm1.weight": t(E), v + "norm1.bias": t(E),
                    v + "norm2.weight": t(E), v + "norm2.bias": t(E), v + "ls1": t(E), v + "ls2": t(E)})
        m = f"language_model.model.layers.{i}."
        if llm == "InternLM2ForCausalLM":
            out.update({m + "attention.wqkv.weight": t(96, H), m + "attention.wo.weight": t(H, H),
                        m + "feed_forward.w1.weight": t(96, H), m + "feed_forward.w3.weight": t(96, H),
                        m + "feed_forward.w2.weight": t(H, 96), m + "attention_norm.weight": t(H),
                        m + "ffn_norm.weight": t(H)})
            continue
        out.update({m + "self_attn.q_proj.weight": t(H, H), m + "self_attn.k_proj.weight": t(16, H),
                    m + "self_attn.v_proj.weight": t(16, H), m + "self_attn.o_proj.weight": t(H, H),
                    m + "mlp.gate_proj.weight": t(96, H), m + "mlp.up_proj.weight": t(96, H),
                    m + "mlp.down_proj.weight": t(H, 96), m + "input_layernorm.weight": t(H),
                    m + "post_attention_layernorm.weight": t(H)})
        if llm == "Qwen2ForCausalLM":
            out.update({m + "self_attn.q_proj.bias": t(H), m + "self_attn.k_proj.bias": t(16),
                        m + "self_attn.v_proj.bias": t(16)})
    if llm == "InternLM2ForCausalLM":
        out.update({"language_model.model.tok_embeddings.weight": t(VOCAB, H), "language_model.output.weight":
                    t(VOCAB, H)})
    else:
        out.update({"language_model.model.embed_tokens.weight": t(VOCAB, H), "language_model.lm_head.weight":
                    t(VOCAB, H)})
    out["language_model.model.norm.weight"] = t(H)
    return out


def internvl_config(llm: str) -> dict:
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
            "vision_config": {"architectures": ["InternVisionModel"], "hidden_size": E,
                              "num_attention_heads": VIT_HEADS,
                              "intermediate_size": VIT_FFN, "num_hidden_layers": 4, "qkv_bias": True,
                              "qk_normalization": True, "patch_size": 2, "image_size": 4},
            "llm_config": {"architectures": [llm], "hidden_size": H, "num_attention_heads": 8, "num_key_value_heads": 2,
                           "intermediate_size": 96, "num_hidden_layers": 4, "vocab_size": VOCAB}}


LLMS = ("Qwen2ForCausalLM", "LlamaForCausalLM", "InternLM2ForCausalLM")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    return {llm: write_hf(root / llm, internvl_tensors(llm), internvl_config(llm)) for llm in LLMS}


def round_trip(cli, hf, tmp_path, tp, vit=None, llm=None, back=True):
    files = megatron_round_trip(cli, "internvl", hf, tmp_path, tp, {"vit": vit, "llm": llm}, back=back)
    if back:
        assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))
    return files


@pytest.mark.parametrize("vit,llm", LAYOUTS)
@pytest.mark.parametrize("tp", [1, 2])
def test_internvl_hf_to_megatron_to_hf_is_byte_identical(cli, hf_models, tmp_path, tp, vit, llm):
    round_trip(cli, hf_models["Qwen2ForCausalLM"], tmp_path, tp, vit, llm)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "InternLM2ForCausalLM"])
def test_internvl_llama_and_internlm2_language_models_round_trip(cli, hf_models, tmp_path, arch):
    round_trip(cli, hf_models[arch], tmp_path, 2, "1,3,0", "0,2,2")


def test_internvl_rank_shapes_are_the_unaligned_splits(cli, hf_models, tmp_path):
    hf = hf_models["Qwen2ForCausalLM"]
    files = round_trip(cli, hf, tmp_path, 2, back=False)
    vit = VIT.format(1)
    # Literal per-rank shapes (spec §3.3): ViT heads 2 + 1, vocab rows 81 + 80, the projector replicated.
    both = {
        vit + "self_attention.linear_proj.bias": (24,), vit + "self_attention.q_layernorm.weight": (24,),
        vit + "mlp.linear_fc1.weight": (24, 24), vit + "mlp.linear_fc1.bias": (24,),
        vit + "mlp.linear_fc2.weight": (24, 24), vit + "ls1": (24,),
        "image_encoder.encoder.embeddings.position_embedding": (1, 5, 24),
        "image_encoder.projector.linear_fc1.weight": (64, 96), "image_encoder.projector.linear_fc2.weight": (64, 64),
        "text_decoder.decoder.layers.0.self_attention.linear_qkv.weight": (48, 64),
        "text_decoder.decoder.layers.0.self_attention.linear_qkv.bias": (48,),
        "text_decoder.decoder.layers.0.mlp.linear_fc1.weight": (96, 64),
    }
    qkv, proj, emb, head = (vit + "self_attention.linear_qkv.", vit + "self_attention.linear_proj.weight",
                            "text_decoder.embedding.word_embeddings.weight", "text_decoder.output_layer.weight")
    expected = [{**both, qkv + "weight": (48, 24), qkv + "bias": (48,), proj: (24, 16), emb: (81, 64), head: (81, 64)},
                {**both, qkv + "weight": (24, 24), qkv + "bias": (24,), proj: (24, 8), emb: (80, 64), head: (80, 64)}]
    for rank, shapes in enumerate(expected):
        state = files[f"release/mp_rank_{rank:02d}"]["model"]
        assert {n: tuple(state[n].shape) for n in shapes} == shapes
    # Rank 0 holds heads 0-1 of each of Q, K, V ([Q_0; K_0; V_0]); rank 1 head 2 of each.
    qkv = tensors_of(hf)["vision_model.encoder.layers.1.attn.qkv.weight"][2].view(torch.bfloat16).reshape(3 * E, E)
    q, k, v = qkv.split(E)
    got = [files[f"release/mp_rank_{r:02d}"]["model"][vit + "self_attention.linear_qkv.weight"] for r in range(2)]
    assert got[0].equal(torch.cat([q[:16], k[:16], v[:16]])) and got[1].equal(torch.cat([q[16:], k[16:], v[16:]]))


def test_internvl_vit_qkv_merge_is_the_inverse_of_the_unaligned_split(cli, hf_models, tmp_path):
    """MindSpeed-MM's UnalignedRowSplit.merge concatenates the ranks: [Q0;K0;V0;Q1;K1;V1] (spec §10.3)."""
    hf = hf_models["Qwen2ForCausalLM"]
    files = round_trip(cli, hf, tmp_path, 2)
    name = "vision_model.encoder.layers.2.attn.qkv.weight"
    assert tensors_of(tmp_path / "back")[name][2].equal(tensors_of(hf)[name][2])
    naive = torch.cat([files[f"release/mp_rank_{r:02d}"]["model"][VIT.format(2) + "self_attention.linear_qkv.weight"]
                       for r in range(2)])
    assert not naive.view(torch.uint8).equal(tensors_of(hf)[name][2].view(torch.uint8).reshape(naive.shape[0], -1))


def test_internvl_internlm2_wqkv_is_renamed_not_refused(cli, hf_models, tmp_path):
    hf = hf_models["InternLM2ForCausalLM"]
    state = round_trip(cli, hf, tmp_path, 1, back=False)["release/mp_rank_00"]["model"]
    wqkv = tensors_of(hf)["language_model.model.layers.3.attention.wqkv.weight"][2]
    assert state["text_decoder.decoder.layers.3.self_attention.linear_qkv.weight"].view(torch.uint8).flatten() \
        .equal(wqkv)


def test_internvl_more_ranks_than_vit_heads_is_an_error(cli, hf_models, tmp_path):
    r = cli("--model", "internvl", "--input_path", hf_models["Qwen2ForCausalLM"], "--output_path", tmp_path / "mg",
            "--target", "megatron", "--tp", "4")
    assert r.code == 2 and "3 heads do not spread over --tp 4" in r.err, r.err
    assert not (tmp_path / "mg").exists()


@settings(max_examples=80, deadline=None)
@given(kind=st.sampled_from(["uneven", "uneven_qkv", "uneven_col"]), heads=st.integers(1, 7), hd=st.integers(1, 3),
       tp=st.integers(1, 7), seed=st.integers(0, 99))
def test_unaligned_splits_deal_whole_heads_and_merge_back(kind, heads, hd, tp, seed):
    if tp > heads:
        return
    split = {"uneven": UNEVEN, "uneven_qkv": uneven_qkv(lambda cfg: (heads, heads, hd)),
             "uneven_col": uneven_col(lambda cfg: (heads, heads, hd))}[kind]
    parts = 3 if kind == "uneven_qkv" else 1
    shape = (5, heads * hd) if kind == "uneven_col" else (parts * heads * hd, 2)
    full = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    per_rank = split.pieces(shape, tp, {})
    shards = [shard(full, split.dim, p) for p in per_rank]
    assert merge(shards, split.dim, per_rank, shape[split.dim]).equal(full)
    units = shape[0] if kind == "uneven" else heads  # the first units % tp ranks hold one more
    sizes = [units // tp + (r < units % tp) for r in range(tp)]
    per_unit = 1 if kind == "uneven" else parts * hd
    assert [s.shape[split.dim] for s in shards] == [n * per_unit for n in sizes]
