"""mae: spec §2.11 / §7 — vit's encoder rules, `vit.norm` kept, decoder blocks as encoder blocks,
{"model": …} pickles."""

import pytest
import torch

from conftest import assert_same_tensors, example, run_script, tensors_of
from test_vit import (L, P, W, convert, dtype_flag, forward, ms_block, ms_encoder, ms_names, random_state,
                      round_trip, save_pth, timm_block, timm_encoder)

DW, DFF, PATCH = 6, 10, 2 * 2 * 3  # decoder width, decoder MLP width, pixels per patch (2×2, RGB)


def mae_state(decoder=True, dtype=torch.float32) -> dict:
    """Facebook MAE `models_mae.py` names: mae_pretrain_*.pth has the encoder only, visualize checkpoints all."""
    shapes = {**timm_encoder(), "norm.weight": (W,), "norm.bias": (W,)}
    if decoder:
        shapes.update({"mask_token": (1, 1, DW), "decoder_embed.weight": (DW, W), "decoder_embed.bias": (DW,),
                       "decoder_pos_embed": (1, P, DW), "decoder_norm.weight": (DW,), "decoder_norm.bias": (DW,),
                       "decoder_pred.weight": (PATCH, DW), "decoder_pred.bias": (PATCH,)})
        for i in range(L):
            shapes.update(timm_block(f"decoder_blocks.{i}", DW, DFF))
    return random_state(shapes, dtype)


def expected_mae(decoder=True, dtype="F32") -> dict:
    """Encoder under `vit.` (§2.11); decoder at the top level, as ViTMAEForPreTraining holds it."""
    out = {**ms_encoder(), "vit.norm.gamma": (W,), "vit.norm.beta": (W,)}
    if decoder:
        out.update({"mask_tokens": (1, 1, DW), "decoder_embed.weight": (DW, W), "decoder_embed.bias": (DW,),
                    "decoder_pos_embed": (1, P, DW), "decoder_norm.gamma": (DW,), "decoder_norm.beta": (DW,),
                    "decoder_pred.weight": (PATCH, DW), "decoder_pred.bias": (PATCH,)})
        for i in range(L):
            out.update(ms_block(f"decoder_blocks.{i}", DW, DFF))
    return {n: (dtype, s) for n, s in out.items()}


@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.parametrize("flag, dtype", [(None, "F32"), ("fp16", "F16")])
def test_mae_forward_names_shapes_and_dtypes(cli, tmp_path, decoder, flag, dtype):
    src = save_pth(tmp_path / "src" / "mae_pretrain_vit_base.pth", mae_state(decoder))
    assert forward(cli, "mae", src, tmp_path, *dtype_flag(flag)) == expected_mae(decoder, dtype)


def test_mae_decoder_at_top_level_where_mindformers_prefixes_vit(cli, tmp_path):
    """§5.9: MindFormers writes `vit.decoder_blocks.…`, `vit.mask_tokens`, …, names ViTMAEForPreTraining does not
    have (its decoder is top-level), so the decoder silently keeps its random init. Here the decoder loads."""
    src = save_pth(tmp_path / "src" / "mae.pth", mae_state())
    out = tmp_path / "mae.ckpt"
    convert(cli, "--model", "mae", "--input_path", src, "--output_path", out)
    names = ms_names(out)
    assert not any(n.startswith(("vit.decoder", "vit.mask_token")) for n in names)
    assert {n.split(".")[0] for n in names} == {"vit", "mask_tokens", "decoder_embed", "decoder_pos_embed",
                                                "decoder_blocks", "decoder_norm", "decoder_pred"}
    from mindformers_conv.formats.inputs import open_input

    refs, state = open_input(out).refs, mae_state()
    assert torch.equal(refs["decoder_embed.weight"].read(), state["decoder_embed.weight"])  # not transposed
    assert torch.equal(refs["decoder_blocks.1.output.mapping.weight"].read(),
                       state["decoder_blocks.1.mlp.fc1.weight"].t())


def test_mae_ckpt_loads_in_mindspore(cli, tmp_path):
    import mindspore as ms

    src = save_pth(tmp_path / "src" / "mae.pth", mae_state())
    convert(cli, "--model", "mae", "--input_path", src, "--output_path", tmp_path / "mae.ckpt", "--dtype", "bf16")
    params = ms.load_checkpoint(str(tmp_path / "mae.ckpt"))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected_mae().items()}
    assert {p.dtype for p in params.values()} == {ms.bfloat16}


@pytest.mark.parametrize("source, cast", [(torch.float32, None), (torch.bfloat16, "bf16")])
def test_mae_round_trip_gives_back_the_pth_bytes(cli, tmp_path, source, cast):
    src = save_pth(tmp_path / "src" / "mae.pth", mae_state(dtype=source))
    _, back = round_trip(cli, "mae", src, tmp_path, dtype=cast)
    assert_same_tensors(tensors_of(back), tensors_of(src))
    assert list(torch.load(back, weights_only=True)) == ["model"]


def test_mae_root_cli_runs_where_mindformers_raises_type_error(tmp_path):
    """§5.1: `python convert_weight.py --model mae …` raises TypeError in MindFormers v1.3.2 (no **kwargs)."""
    src = save_pth(tmp_path / "src" / "mae.pth", mae_state(decoder=False))
    result = run_script("--model", "mae", "--input_path", src, "--output_path", tmp_path / "mae.ckpt")
    assert result.code == 0, result.err
    assert ms_names(tmp_path / "mae.ckpt") == expected_mae(decoder=False)


@example("mae")
def mae_example(folder, key):
    return save_pth(folder / "mae.pth", mae_state()), ()
