"""blip: spec §2.7 / §7 — LAVIS Blip2Qformer `.pth`: EVA ViT as MindFormers' ViT (zero k bias added), Q-Former
renames, int64 position_ids and 0-d temp kept, {"model": …} pickles; the fc1/fc2 crossing and the unfused reverse
of MindFormers are corrected."""

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of
from test_vit import convert, dtype_flag, forward, ms_block, random_state, round_trip, save_pth

W, FF, P, L = 8, 12, 5, 2  # EVA width, MLP width (EVA-g: 1408 / 6144), positions, blocks
H, I, V, POS, QL, Q, E = 6, 10, 20, 7, 2, 3, 5  # Q-Former hidden, MLP, vocab, positions, layers, queries, embed


def lavis_state(eva_dtype=torch.float16, dtype=torch.float32) -> dict:
    """Blip2Qformer.state_dict() names; EVA linears in fp16 as LAVIS' convert_weights_to_fp16 leaves them."""
    eva = {"visual_encoder.patch_embed.proj.weight": (W, 3, 2, 2), "visual_encoder.patch_embed.proj.bias": (W,)}
    rest = {"visual_encoder.cls_token": (1, 1, W), "visual_encoder.pos_embed": (1, P, W),
            "ln_vision.weight": (W,), "ln_vision.bias": (W,), "query_tokens": (1, Q, H),
            "Qformer.bert.embeddings.word_embeddings.weight": (V, H),
            "Qformer.bert.embeddings.position_embeddings.weight": (POS, H),
            "Qformer.bert.embeddings.LayerNorm.weight": (H,), "Qformer.bert.embeddings.LayerNorm.bias": (H,),
            "Qformer.cls.predictions.bias": (V,), "Qformer.cls.predictions.transform.dense.weight": (H, H),
            "Qformer.cls.predictions.transform.dense.bias": (H,),
            "Qformer.cls.predictions.transform.LayerNorm.weight": (H,),
            "Qformer.cls.predictions.transform.LayerNorm.bias": (H,),
            "Qformer.cls.predictions.decoder.weight": (V, H), "Qformer.cls.predictions.decoder.bias": (V,),
            "vision_proj.weight": (E, H), "vision_proj.bias": (E,), "text_proj.weight": (E, H), "text_proj.bias": (E,),
            "itm_head.weight": (2, H), "itm_head.bias": (2,)}
    for i in range(L):
        b = f"visual_encoder.blocks.{i}"
        eva.update({f"{b}.attn.qkv.weight": (3 * W, W), f"{b}.attn.proj.weight": (W, W), f"{b}.attn.proj.bias": (W,),
                    f"{b}.mlp.fc1.weight": (FF, W), f"{b}.mlp.fc1.bias": (FF,), f"{b}.mlp.fc2.weight": (W, FF),
                    f"{b}.mlp.fc2.bias": (W,)})
        rest.update({f"{b}.norm1.weight": (W,), f"{b}.norm1.bias": (W,), f"{b}.norm2.weight": (W,),
                     f"{b}.norm2.bias": (W,), f"{b}.attn.q_bias": (W,), f"{b}.attn.v_bias": (W,)})
    for i in range(QL):
        q = f"Qformer.bert.encoder.layer.{i}"
        for a in ("attention", "crossattention") if i % 2 == 0 else ("attention",):  # cross_attention_freq 2
            kv = W if a == "crossattention" else H
            rest.update({f"{q}.{a}.self.query.weight": (H, H), f"{q}.{a}.self.query.bias": (H,),
                         f"{q}.{a}.self.key.weight": (H, kv), f"{q}.{a}.self.key.bias": (H,),
                         f"{q}.{a}.self.value.weight": (H, kv), f"{q}.{a}.self.value.bias": (H,),
                         f"{q}.{a}.output.dense.weight": (H, H), f"{q}.{a}.output.dense.bias": (H,),
                         f"{q}.{a}.output.LayerNorm.weight": (H,), f"{q}.{a}.output.LayerNorm.bias": (H,)})
        for x in ("", "_query"):
            rest.update({f"{q}.intermediate{x}.dense.weight": (I, H), f"{q}.intermediate{x}.dense.bias": (I,),
                         f"{q}.output{x}.dense.weight": (H, I), f"{q}.output{x}.dense.bias": (H,),
                         f"{q}.output{x}.LayerNorm.weight": (H,), f"{q}.output{x}.LayerNorm.bias": (H,)})
    state = {**random_state(eva, eva_dtype, seed=1), **random_state(rest, dtype)}
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(POS).unsqueeze(0)
    state["temp"] = torch.tensor(0.07, dtype=dtype)
    return state


def expected_ms(dtype=None) -> dict:
    """Spec §2.7 names (with fc1 → mapping, fc2 → projection); dtypes as stored unless --dtype."""
    eva_dtype, rest_dtype = dtype or "F16", dtype or "F32"
    eva = {"visual_encoder.patch_embed.proj.weight": (W, 3, 2, 2), "visual_encoder.patch_embed.proj.bias": (W,)}
    rest = {"visual_encoder.cls_tokens": (1, 1, W), "visual_encoder.pos_embed": (1, P, W),
            "ln_vision.gamma": (W,), "ln_vision.beta": (W,), "query_tokens": (1, Q, H),
            "qformer.bert.embeddings.word_embeddings.embedding_table": (V, H),
            "qformer.bert.embeddings.position_embeddings.embedding_table": (POS, H),
            "qformer.bert.embeddings.layernorm.gamma": (H,), "qformer.bert.embeddings.layernorm.beta": (H,),
            "qformer.cls.predictions.bias": (V,), "qformer.cls.predictions.transform.dense.weight": (H, H),
            "qformer.cls.predictions.transform.dense.bias": (H,),
            "qformer.cls.predictions.transform.layernorm.gamma": (H,),
            "qformer.cls.predictions.transform.layernorm.beta": (H,),
            "qformer.cls.predictions.decoder.weight": (V, H), "qformer.cls.predictions.decoder.bias": (V,),
            "vision_proj.weight": (E, H), "vision_proj.bias": (E,), "text_proj.weight": (E, H), "text_proj.bias": (E,),
            "itm_head.weight": (2, H), "itm_head.bias": (2,), "temp": ()}
    for i in range(L):
        block = ms_block(f"visual_encoder.blocks.{i}", W, FF)
        for name, shape in block.items():  # norms and q/k/v biases were fp32 in LAVIS, the linears fp16
            fp32 = ".layernorm" in name or ".attention.dense" in name and name.endswith(".bias")
            (rest if fp32 else eva)[name] = shape
    for i in range(QL):
        q = f"qformer.bert.encoder.layer.{i}"
        for a in ("attention", "crossattention") if i % 2 == 0 else ("attention",):
            kv = W if a == "crossattention" else H
            rest.update({f"{q}.{a}.self_att.query.weight": (H, H), f"{q}.{a}.self_att.query.bias": (H,),
                         f"{q}.{a}.self_att.key.weight": (H, kv), f"{q}.{a}.self_att.key.bias": (H,),
                         f"{q}.{a}.self_att.value.weight": (H, kv), f"{q}.{a}.self_att.value.bias": (H,),
                         f"{q}.{a}.output.dense.weight": (H, H), f"{q}.{a}.output.dense.bias": (H,),
                         f"{q}.{a}.output.layernorm.gamma": (H,), f"{q}.{a}.output.layernorm.beta": (H,)})
        for x in ("", "_query"):
            rest.update({f"{q}.intermediate{x}.dense.weight": (I, H), f"{q}.intermediate{x}.dense.bias": (I,),
                         f"{q}.output{x}.dense.weight": (H, I), f"{q}.output{x}.dense.bias": (H,),
                         f"{q}.output{x}.layernorm.gamma": (H,), f"{q}.output{x}.layernorm.beta": (H,)})
    out = {**{n: (eva_dtype, s) for n, s in eva.items()}, **{n: (rest_dtype, s) for n, s in rest.items()}}
    out["qformer.bert.embeddings.position_ids"] = ("I64", (1, POS))  # --dtype casts floating tensors only
    return out


@pytest.fixture
def blip_pth(tmp_path):
    return save_pth(tmp_path / "src" / "blip2_pretrained.pth", lavis_state())


@pytest.mark.parametrize("flag, dtype", [(None, None), ("bf16", "BF16")])
def test_blip_forward_names_shapes_and_dtypes(cli, blip_pth, tmp_path, flag, dtype):
    assert forward(cli, "blip", blip_pth, tmp_path, *dtype_flag(flag)) == expected_ms(dtype)


def test_blip_reads_a_flat_state_dict_too(cli, tmp_path):
    """MindFormers accepts an OrderedDict or {"model": …}."""
    src = save_pth(tmp_path / "src" / "blip.pth", lavis_state(), wrap=None)
    assert forward(cli, "blip", src, tmp_path) == expected_ms()


def test_blip_ckpt_loads_in_mindspore(cli, blip_pth, tmp_path):
    import mindspore as ms

    convert(cli, "--model", "blip", "--input_path", blip_pth, "--output_path", tmp_path / "blip.ckpt")
    params = ms.load_checkpoint(str(tmp_path / "blip.ckpt"))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected_ms().items()}
    assert params["temp"].shape == () and params["qformer.bert.embeddings.position_ids"].dtype == ms.int64


def test_blip_eva_qkv_split_and_zero_k_bias(cli, blip_pth, tmp_path):
    out = tmp_path / "blip.ckpt"
    convert(cli, "--model", "blip", "--input_path", blip_pth, "--output_path", out)
    from mindformers_conv.formats.inputs import open_input

    refs, state, b = open_input(out).refs, lavis_state(), "visual_encoder.blocks.1"
    for k in range(3):
        rows = state[f"{b}.attn.qkv.weight"][k * W:(k + 1) * W]
        assert torch.equal(refs[f"{b}.attention.dense{k + 1}.weight"].read(), rows)
    assert torch.equal(refs[f"{b}.attention.dense1.bias"].read(), state[f"{b}.attn.q_bias"])
    assert torch.equal(refs[f"{b}.attention.dense2.bias"].read(), torch.zeros(W))
    assert torch.equal(refs[f"{b}.attention.dense3.bias"].read(), state[f"{b}.attn.v_bias"])
    assert torch.equal(refs[f"{b}.attention.projection.weight"].read(), state[f"{b}.attn.proj.weight"].t())


def test_blip_eva_mlp_fc1_is_mapping_where_mindformers_crosses_fc1_and_fc2(cli, blip_pth, tmp_path):
    """§5.9: MindFormers writes fc2.weight as mapping and fc1.weight as projection ([FF, W] where the MS ViT MLP
    has mapping [W, FF]: it does not load for EVA-g, 1408 vs 6144). Here mapping = fc1ᵀ, and the MS MLP
    x @ mapping + b1 → gelu → @ projection + b2 computes what the LAVIS MLP computes."""
    out = tmp_path / "blip.ckpt"
    convert(cli, "--model", "blip", "--input_path", blip_pth, "--output_path", out, "--dtype", "fp32")
    from mindformers_conv.formats.inputs import open_input

    refs, state, b = open_input(out).refs, lavis_state(), "visual_encoder.blocks.0"
    ms = {n: refs[f"{b}.output.{n}"].read() for n in ("mapping.weight", "mapping.bias", "projection.weight",
                                                      "projection.bias")}
    assert ms["mapping.weight"].shape == (W, FF) and ms["projection.weight"].shape == (FF, W)
    x = torch.randn(4, W, generator=torch.Generator().manual_seed(2))
    ms_out = torch.nn.functional.gelu(x @ ms["mapping.weight"] + ms["mapping.bias"]) @ ms["projection.weight"] \
        + ms["projection.bias"]
    fc1 = torch.nn.Linear(W, FF)
    fc2 = torch.nn.Linear(FF, W)
    with torch.no_grad():
        for lin, name in ((fc1, "fc1"), (fc2, "fc2")):
            lin.weight.copy_(state[f"{b}.mlp.{name}.weight"].float())
            lin.bias.copy_(state[f"{b}.mlp.{name}.bias"].float())
        assert torch.allclose(ms_out, fc2(torch.nn.functional.gelu(fc1(x))), atol=1e-6)


@pytest.mark.parametrize("cast", [None, "bf16"])
def test_blip_round_trip_refuses_qkv_where_mindformers_leaves_dense_unmerged(cli, tmp_path, cast):
    """§2.7/§5.9: MindFormers' reverse never re-fuses dense1/2/3 (it tests `qkv.weight` on MS names) and drops
    the k bias only; here `attn.qkv.weight`, q_bias and v_bias come back with the original bytes."""
    dtype = torch.bfloat16 if cast else None
    state = lavis_state(*(2 * [dtype] if dtype else []))
    src = save_pth(tmp_path / "src" / "blip.pth", state)
    _, back = round_trip(cli, "blip", src, tmp_path, dtype=cast)
    got = tensors_of(back)
    assert not any(".attention." in n for n in got if n.startswith("visual_encoder"))
    assert_same_tensors(got, tensors_of(src))
    assert list(torch.load(back, weights_only=True)) == ["model"]


def test_blip_zero_k_bias_op_round_trips():
    from models.blip.declaration import EVA_QKV_BIAS

    q, v = torch.randn(5), torch.randn(5)
    dense = EVA_QKV_BIAS.run([q, v], {}, reverse=False)
    assert torch.equal(dense[1], torch.zeros(5))
    back = EVA_QKV_BIAS.run(dense, {}, reverse=True)
    assert torch.equal(back[0], q) and torch.equal(back[1], v)
    assert EVA_QKV_BIAS.shapes([(5,), (5,)], {}, reverse=False) == [(5,), (5,), (5,)]


@example("blip")
def blip_example(folder, key):
    return save_pth(folder / "blip2_pretrained.pth", lavis_state()), ()
