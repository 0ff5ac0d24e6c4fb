"""vit: spec §2.12 — timm keys, `vit.` prefix, norm → layernorm, qkv thirds, [in, out] projections,
{"model": …} pickles.

The helpers here (random state dicts, `.pth` writing, round trips) are shared by the other vision families' tests.
"""

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of

W, NH, FF, P, L, C = 8, 2, 12, 5, 2, 3  # width, heads, MLP width (≠ 4W on purpose), 4 patches + cls, blocks, classes


def random_state(shapes: dict, dtype=torch.float32, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}


def save_pth(path, state: dict, wrap: str | None = "model"):
    """A `.pth` as the original repositories publish it: `{"model": state_dict}` (or flat)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({wrap: state} if wrap else state, path)
    return path


def ms_names(path) -> dict:
    return {n: (d, s) for n, (d, s, _) in tensors_of(path).items()}


def convert(cli, *args):
    result = cli(*map(str, args))
    assert result.code == 0, result.err
    return result


def forward(cli, key: str, source, tmp_path, *flags) -> dict:
    """source → `<key>.ckpt` with the given CLI flags; the output's {name: (dtype, shape)}."""
    out = tmp_path / f"{key}.ckpt"
    convert(cli, "--model", key, "--input_path", source, "--output_path", out, *flags)
    return ms_names(out)


def dtype_flag(flag) -> list:
    return ["--dtype", flag] if flag else []


def round_trip(cli, key: str, source, tmp_path, *, dtype=None, flags=(), back="back.pth"):
    """source → .ckpt (with --verify) → reverse at `back`; returns (ckpt, back)."""
    ckpt = tmp_path / f"{key}.ckpt"
    convert(cli, "--model", key, "--input_path", source, "--output_path", ckpt, *flags,
            *dtype_flag(dtype), "--verify")
    convert(cli, "--model", key, "--reversed", "--input_path", ckpt, "--output_path", tmp_path / back, *flags)
    return ckpt, tmp_path / back


def timm_block(prefix: str, w: int = W, ff: int = FF) -> dict:
    """A timm / MAE pre-norm block's tensors (qkv with bias)."""
    return {f"{prefix}.norm1.weight": (w,), f"{prefix}.norm1.bias": (w,),
            f"{prefix}.attn.qkv.weight": (3 * w, w), f"{prefix}.attn.qkv.bias": (3 * w,),
            f"{prefix}.attn.proj.weight": (w, w), f"{prefix}.attn.proj.bias": (w,),
            f"{prefix}.norm2.weight": (w,), f"{prefix}.norm2.bias": (w,),
            f"{prefix}.mlp.fc1.weight": (ff, w), f"{prefix}.mlp.fc1.bias": (ff,),
            f"{prefix}.mlp.fc2.weight": (w, ff), f"{prefix}.mlp.fc2.bias": (w,)}


def ms_block(prefix: str, w: int = W, ff: int = FF) -> dict:
    """Spec §2.12 table for one block: dense1/2/3 [W, W], projection and MLP weights [in, out]."""
    out = {f"{prefix}.layernorm1.gamma": (w,), f"{prefix}.layernorm1.beta": (w,),
           f"{prefix}.layernorm2.gamma": (w,), f"{prefix}.layernorm2.beta": (w,),
           f"{prefix}.attention.projection.weight": (w, w), f"{prefix}.attention.projection.bias": (w,),
           f"{prefix}.output.mapping.weight": (w, ff), f"{prefix}.output.mapping.bias": (ff,),
           f"{prefix}.output.projection.weight": (ff, w), f"{prefix}.output.projection.bias": (w,)}
    for k in (1, 2, 3):
        out.update({f"{prefix}.attention.dense{k}.weight": (w, w), f"{prefix}.attention.dense{k}.bias": (w,)})
    return out


def timm_encoder(w: int = W) -> dict:
    shapes = {"cls_token": (1, 1, w), "pos_embed": (1, P, w), "patch_embed.proj.weight": (w, 3, 2, 2),
              "patch_embed.proj.bias": (w,)}
    for i in range(L):
        shapes.update(timm_block(f"blocks.{i}", w))
    return shapes


def ms_encoder(w: int = W) -> dict:
    out = {"vit.cls_tokens": (1, 1, w), "vit.pos_embed": (1, P, w), "vit.patch_embed.proj.weight": (w, 3, 2, 2),
           "vit.patch_embed.proj.bias": (w,)}
    for i in range(L):
        out.update(ms_block(f"vit.blocks.{i}", w))
    return out


def vit_state(global_pool=True, dtype=torch.float32) -> dict:
    """MAE-finetuned ViT: fc_norm with global pooling (the released checkpoints), else a final `norm`."""
    norm = "fc_norm" if global_pool else "norm"
    shapes = {**timm_encoder(), f"{norm}.weight": (W,), f"{norm}.bias": (W,), "head.weight": (C, W), "head.bias": (C,)}
    return random_state(shapes, dtype)


def expected_vit(global_pool=True, dtype="F32") -> dict:
    norm = "vit.fc_norm" if global_pool else "vit.layernorm"
    out = {**ms_encoder(), f"{norm}.gamma": (W,), f"{norm}.beta": (W,), "head.weight": (C, W), "head.bias": (C,)}
    return {n: (dtype, s) for n, s in out.items()}


@pytest.fixture
def vit_pth(tmp_path):
    return save_pth(tmp_path / "src" / "mae_finetuned_vit_base.pth", vit_state())


@pytest.mark.parametrize("global_pool", [True, False])
@pytest.mark.parametrize("flag, dtype", [(None, "F32"), ("bf16", "BF16")])
def test_vit_forward_names_shapes_and_dtypes(cli, tmp_path, global_pool, flag, dtype):
    src = save_pth(tmp_path / "src" / "vit.pth", vit_state(global_pool))
    assert forward(cli, "vit", src, tmp_path, *dtype_flag(flag)) == expected_vit(global_pool, dtype)


def test_vit_ckpt_loads_in_mindspore(cli, vit_pth, tmp_path):
    import mindspore as ms

    out = tmp_path / "vit.ckpt"
    convert(cli, "--model", "vit", "--input_path", vit_pth, "--output_path", out)
    params = ms.load_checkpoint(str(out))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected_vit().items()}
    assert {p.dtype for p in params.values()} == {ms.float32}


def test_vit_qkv_thirds_and_in_out_projections(cli, vit_pth, tmp_path):
    out = tmp_path / "vit.ckpt"
    convert(cli, "--model", "vit", "--input_path", vit_pth, "--output_path", out)
    from mindformers_conv.formats.inputs import open_input

    refs, src, b = open_input(out).refs, vit_state(), "blocks.1"
    for k, part in enumerate(("dense1", "dense2", "dense3")):
        for p in ("weight", "bias"):
            rows = src[f"{b}.attn.qkv.{p}"][k * W:(k + 1) * W]
            assert torch.equal(refs[f"vit.{b}.attention.{part}.{p}"].read(), rows)
    assert torch.equal(refs[f"vit.{b}.attention.projection.weight"].read(), src[f"{b}.attn.proj.weight"].t())
    assert torch.equal(refs[f"vit.{b}.output.mapping.weight"].read(), src[f"{b}.mlp.fc1.weight"].t())
    assert torch.equal(refs[f"vit.{b}.output.projection.weight"].read(), src[f"{b}.mlp.fc2.weight"].t())
    assert torch.equal(refs["head.weight"].read(), src["head.weight"])


@pytest.mark.parametrize("source, cast", [(torch.float32, None), (torch.bfloat16, "bf16")])
def test_vit_round_trip_gives_back_the_pth_bytes_wrapped_in_model(cli, tmp_path, source, cast):
    src = save_pth(tmp_path / "src" / "vit.pth", vit_state(dtype=source))
    _, back = round_trip(cli, "vit", src, tmp_path, dtype=cast)
    assert_same_tensors(tensors_of(back), tensors_of(src))
    loaded = torch.load(back, weights_only=True)
    assert list(loaded) == ["model"] and list(loaded["model"]) == list(vit_state())


def test_vit_root_cli_keywords_accepted_where_mindformers_raises_type_error(vit_pth, tmp_path):
    """§5.1: v1.3.2's root passes n_head/hidden_size/layers/is_pretrain/telechat_type to a converter without
    **kwargs (TypeError). The same call works here, through the Python API and the CLI."""
    from models.vit.convert_reversed import convert_ms_to_pt
    from models.vit.convert_weight import convert_pt_to_ms

    root_kwargs = dict(n_head=32, hidden_size=4096, layers=12, is_pretrain=False, telechat_type="telechat_12b")
    assert convert_pt_to_ms(vit_pth, tmp_path / "v.ckpt", dtype=None, **root_kwargs)
    assert convert_ms_to_pt(tmp_path / "v.ckpt", tmp_path / "v.pth", dtype=None, **root_kwargs)
    assert_same_tensors(tensors_of(tmp_path / "v.pth"), tensors_of(vit_pth))


def test_vit_reads_model_entry_of_a_training_checkpoint(cli, tmp_path):
    src = tmp_path / "src" / "checkpoint-99.pth"
    src.parent.mkdir()
    torch.save({"model": vit_state(), "epoch": 99, "scaler": {"scale": 1024.0}}, src)
    convert(cli, "--model", "vit", "--input_path", src, "--output_path", tmp_path / "vit.ckpt")
    assert ms_names(tmp_path / "vit.ckpt") == expected_vit()


@example("vit")
def vit_example(folder, key):
    return save_pth(folder / "vit.pth", vit_state()), ()
