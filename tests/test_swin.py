"""swin: spec §2.13 / §7 — Microsoft (finetuned) and SimMIM (--is_pretrain) `.pth`, `encoder.` prefix, q/k/v thirds,
MLP mapping/projection transposed, relative-position names, int64 index kept, {"model": …} pickles."""

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of
from test_vit import convert, dtype_flag, forward, ms_names, random_state, round_trip, save_pth

C0, HEADS, WIN, CLASSES, PIX = 4, 2, 2, 3, 12  # stage-0 width, heads, window, classes, SimMIM decoder outputs
STAGES = ((C0, 2), (2 * C0, 1))  # (width, blocks); block 1 of stage 0 is shifted and so has an attn_mask
TABLE, TOKENS, WINDOWS = (2 * WIN - 1) ** 2, WIN * WIN, 4  # bias-table rows, tokens per window, windows of stage 0


def swin_shapes(prefix: str = "") -> dict:
    """Microsoft Swin `state_dict()` names (under `encoder.` in SimMIM); no head."""
    s = {f"{prefix}patch_embed.proj.weight": (C0, 3, 4, 4), f"{prefix}patch_embed.proj.bias": (C0,),
         f"{prefix}patch_embed.norm.weight": (C0,), f"{prefix}patch_embed.norm.bias": (C0,)}
    for i, (c, blocks) in enumerate(STAGES):
        for j in range(blocks):
            b = f"{prefix}layers.{i}.blocks.{j}"
            s.update({f"{b}.norm1.weight": (c,), f"{b}.norm1.bias": (c,),
                      f"{b}.attn.relative_position_bias_table": (TABLE, HEADS),
                      f"{b}.attn.qkv.weight": (3 * c, c), f"{b}.attn.qkv.bias": (3 * c,),
                      f"{b}.attn.proj.weight": (c, c), f"{b}.attn.proj.bias": (c,),
                      f"{b}.norm2.weight": (c,), f"{b}.norm2.bias": (c,),
                      f"{b}.mlp.fc1.weight": (4 * c, c), f"{b}.mlp.fc1.bias": (4 * c,),
                      f"{b}.mlp.fc2.weight": (c, 4 * c), f"{b}.mlp.fc2.bias": (c,)})
            if i == 0 and j == 1:
                s[f"{b}.attn_mask"] = (WINDOWS, TOKENS, TOKENS)
        if i + 1 < len(STAGES):
            s.update({f"{prefix}layers.{i}.downsample.reduction.weight": (2 * c, 4 * c),
                      f"{prefix}layers.{i}.downsample.norm.weight": (4 * c,),
                      f"{prefix}layers.{i}.downsample.norm.bias": (4 * c,)})
    c = STAGES[-1][0]
    s.update({f"{prefix}norm.weight": (c,), f"{prefix}norm.bias": (c,)})
    return s


def swin_state(pretrain=False, dtype=torch.float32) -> dict:
    prefix = "encoder." if pretrain else ""
    shapes = swin_shapes(prefix)
    if pretrain:
        shapes.update({"encoder.mask_token": (1, 1, C0), "decoder.0.weight": (PIX, STAGES[-1][0], 1, 1),
                       "decoder.0.bias": (PIX,)})
    else:
        shapes.update({"head.weight": (CLASSES, STAGES[-1][0]), "head.bias": (CLASSES,)})
    state = random_state(shapes, dtype)
    for i, (_, blocks) in enumerate(STAGES):  # the int64 buffer of every block
        for j in range(blocks):
            state[f"{prefix}layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.randperm(
                TOKENS * TOKENS, generator=torch.Generator().manual_seed(i * 10 + j)).view(TOKENS, TOKENS) % TABLE
    return state


def expected_swin(pretrain=False, dtype="F32") -> dict:
    """Spec §2.13 names: everything under `encoder.`; `head.*` (finetuned) or `decoder.*` (pretrain)."""
    out = {"encoder.patch_embed.projection.weight": (C0, 3, 4, 4), "encoder.patch_embed.projection.bias": (C0,),
           "encoder.patch_embed.norm.gamma": (C0,), "encoder.patch_embed.norm.beta": (C0,)}
    for i, (c, blocks) in enumerate(STAGES):
        for j in range(blocks):
            b = f"encoder.layers.{i}.blocks.{j}"
            out.update({f"{b}.norm1.gamma": (c,), f"{b}.norm1.beta": (c,),
                        f"{b}.attn.relative_position_bias.relative_position_bias_table": (TABLE, HEADS),
                        f"{b}.attn.relative_position_bias.relative_position_index": (TOKENS, TOKENS),
                        f"{b}.attn.proj.weight": (c, c), f"{b}.attn.proj.bias": (c,),
                        f"{b}.norm2.gamma": (c,), f"{b}.norm2.beta": (c,),
                        f"{b}.mlp.mapping.weight": (c, 4 * c), f"{b}.mlp.mapping.bias": (4 * c,),
                        f"{b}.mlp.projection.weight": (4 * c, c), f"{b}.mlp.projection.bias": (c,)})
            out.update({f"{b}.attn.{q}.{p}": (c, c) if p == "weight" else (c,)
                        for q in "qkv" for p in ("weight", "bias")})
            if i == 0 and j == 1:
                out[f"{b}.attn_mask"] = (WINDOWS, TOKENS, TOKENS)
        if i + 1 < len(STAGES):
            out.update({f"encoder.layers.{i}.downsample.reduction.weight": (2 * c, 4 * c),
                        f"encoder.layers.{i}.downsample.norm.gamma": (4 * c,),
                        f"encoder.layers.{i}.downsample.norm.beta": (4 * c,)})
    c = STAGES[-1][0]
    out.update({"encoder.norm.gamma": (c,), "encoder.norm.beta": (c,)})
    if pretrain:
        out.update({"encoder.mask_token": (1, 1, C0), "decoder.weight": (PIX, c, 1, 1), "decoder.bias": (PIX,)})
    else:
        out.update({"head.weight": (CLASSES, c), "head.bias": (CLASSES,)})
    return {n: ("I64" if n.endswith("relative_position_index") else dtype, s) for n, s in out.items()}


@pytest.mark.parametrize("pretrain", [False, True])
@pytest.mark.parametrize("flag, dtype", [(None, "F32"), ("bf16", "BF16")])
def test_swin_forward_names_shapes_and_dtypes(cli, tmp_path, pretrain, flag, dtype):
    src = save_pth(tmp_path / "src" / "swin.pth", swin_state(pretrain))
    flags = ["--is_pretrain"] if pretrain else []
    assert forward(cli, "swin", src, tmp_path, *flags, *dtype_flag(flag)) == expected_swin(pretrain, dtype)


def test_swin_qkv_thirds_and_mlp_transposed(cli, tmp_path):
    src = save_pth(tmp_path / "src" / "swin.pth", swin_state())
    out = tmp_path / "swin.ckpt"
    convert(cli, "--model", "swin", "--input_path", src, "--output_path", out)
    from mindformers_conv.formats.inputs import open_input

    refs, state, b = open_input(out).refs, swin_state(), "layers.1.blocks.0"
    c = STAGES[1][0]
    for k, q in enumerate("qkv"):
        rows = state[f"{b}.attn.qkv.weight"][k * c:(k + 1) * c]
        assert torch.equal(refs[f"encoder.{b}.attn.{q}.weight"].read(), rows)
    assert torch.equal(refs[f"encoder.{b}.mlp.mapping.weight"].read(), state[f"{b}.mlp.fc1.weight"].t())
    assert torch.equal(refs[f"encoder.{b}.attn.proj.weight"].read(), state[f"{b}.attn.proj.weight"])


def test_swin_ckpt_loads_in_mindspore(cli, tmp_path):
    import mindspore as ms

    src = save_pth(tmp_path / "src" / "swin.pth", swin_state())
    convert(cli, "--model", "swin", "--input_path", src, "--output_path", tmp_path / "swin.ckpt")
    params = ms.load_checkpoint(str(tmp_path / "swin.ckpt"))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected_swin().items()}
    index = params["encoder.layers.0.blocks.1.attn.relative_position_bias.relative_position_index"]
    assert index.dtype == ms.int64


@pytest.mark.parametrize("pretrain", [False, True])
@pytest.mark.parametrize("source, cast", [(torch.float32, None), (torch.bfloat16, "bf16")])
def test_swin_round_trip_gives_back_the_pth_bytes(cli, tmp_path, pretrain, source, cast):
    src = save_pth(tmp_path / "src" / "swin.pth", swin_state(pretrain, source))
    _, back = round_trip(cli, "swin", src, tmp_path, dtype=cast, flags=["--is_pretrain"] if pretrain else [])
    assert_same_tensors(tensors_of(back), tensors_of(src))
    assert list(torch.load(back, weights_only=True)) == ["model"]


def test_swin_relative_position_index_stays_integer_under_dtype(cli, tmp_path):
    """§5.11: MindFormers casts every tensor to --dtype, so the int64 index becomes float and no longer loads
    into the int32 Parameter (float↔int raises). Here --dtype casts floating tensors only."""
    src = save_pth(tmp_path / "src" / "swin.pth", swin_state())
    out = tmp_path / "swin.ckpt"
    convert(cli, "--model", "swin", "--input_path", src, "--output_path", out, "--dtype", "fp16")
    got, state = tensors_of(out), swin_state()
    name = "layers.0.blocks.1.attn.relative_position_index"
    dtype, _, raw = got[f"encoder.{name.replace('attn.', 'attn.relative_position_bias.')}"]
    assert dtype == "I64" and torch.equal(raw.view(torch.int64).view(TOKENS, TOKENS), state[name])
    assert got["encoder.norm.gamma"][0] == "F16"


def test_swin_is_pretrain_false_means_false(cli, tmp_path):
    """§5.2: MindFormers declares --is_pretrain with type=bool, so `--is_pretrain False` selects pretrain."""
    src = save_pth(tmp_path / "src" / "swin.pth", swin_state())
    out = tmp_path / "swin.ckpt"
    convert(cli, "--model", "swin", "--input_path", src, "--output_path", out, "--is_pretrain", "False")
    assert ms_names(out) == expected_swin()


def test_swin_replaces_an_existing_output_where_mindformers_silently_skips(cli, tmp_path):
    """§5.7: MindFormers writes nothing, and says nothing, when the output file exists."""
    out = tmp_path / "swin.ckpt"
    out.write_bytes(b"stale")
    src = save_pth(tmp_path / "src" / "swin.pth", swin_state())
    convert(cli, "--model", "swin", "--input_path", src, "--output_path", out)
    assert ms_names(out) == expected_swin()
    back = tmp_path / "back.pth"
    back.write_bytes(b"stale")
    convert(cli, "--model", "swin", "--reversed", "--input_path", out, "--output_path", back)
    assert_same_tensors(tensors_of(back), tensors_of(src))


def test_swin_reads_a_legacy_non_zip_pth(cli, tmp_path):
    """Checkpoints saved before torch 1.6 (or with _use_new_zipfile_serialization=False) are not zip archives."""
    src = tmp_path / "src" / "swin_legacy.pth"
    src.parent.mkdir()
    torch.save({"model": swin_state()}, src, _use_new_zipfile_serialization=False)
    _, back = round_trip(cli, "swin", src, tmp_path)
    assert_same_tensors(tensors_of(back), tensors_of(src))


@example("swin")
def swin_example(folder, key):
    return save_pth(folder / "swin.pth", swin_state()), ()
