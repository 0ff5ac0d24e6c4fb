"""gpt (GPT-2): spec §2.8 — backbone names, c_attn split in thirds and transposed, Conv1D weights copied."""

import json

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of, write_hf

H, NH, V, P, L = 16, 4, 32, 24, 2


def build(folder, n_layer=L, dtype=torch.float32, seed=0):
    """A tiny random GPT2LMHeadModel saved with save_pretrained (`transformer.`-prefixed names, tied head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=P, n_embd=H, n_layer=n_layer, n_head=NH))
    model = model.to(dtype).eval()
    with torch.no_grad():  # LayerNorms start at 1/0 and biases at 0: randomise so a mix-up would show
        for name, p in model.named_parameters():
            if ".ln_" in name or name.endswith("bias"):
                p.normal_()
    model.save_pretrained(folder)
    return folder, model


def hub_style(folder, saved, model):
    """What the hub's gpt2 pytorch_model.bin holds: unprefixed GPT2Model keys plus the causal-mask buffers."""
    state = dict(model.transformer.state_dict())
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return write_hf(folder, state, json.loads((saved / "config.json").read_text()), fmt="bin")


@example("gpt")
def gpt_example(folder, key):
    return hub_style(folder, *build(folder.parent / "saved")), ()


def weights_of(path) -> dict:
    """The input's tensors without the causal-mask buffers (which the conversion leaves out)."""
    return {n: t for n, t in tensors_of(path).items() if n.split(".")[-2:] not in (["attn", "bias"],
                                                                                  ["attn", "masked_bias"])}


def logits(model, ids=torch.tensor([[1, 5, 7, 2, 30, 11]])):
    with torch.no_grad():
        return model(ids).logits


def expected_ms(n_layer: int = L, dtype: str = "F32") -> dict:
    """Spec §2.8 table: dense1/2/3 [out, in]; projection, mapping, projection [in, out] (Conv1D)."""
    out = {"backbone.embedding.word_embedding.embedding_table": (V, H),
           "backbone.embedding.position_embedding.embedding_table": (P, H),
           "backbone.layernorm.gamma": (H,), "backbone.layernorm.beta": (H,)}
    for i in range(n_layer):
        out.update(legacy_block(f"backbone.blocks.{i}", H))
    return {n: (dtype, s) for n, s in out.items()}


def legacy_block(b: str, h: int) -> dict:
    """One MindFormers TransformerEncoderLayer block (GPT-2, BLOOM): dense1/2/3 [out, in]; projection,
    mapping and output projection [in, out] (`transpose_b=False`); LayerNorm gamma/beta."""
    return {f"{b}.layernorm1.gamma": (h,), f"{b}.layernorm1.beta": (h,),
            f"{b}.layernorm2.gamma": (h,), f"{b}.layernorm2.beta": (h,),
            f"{b}.attention.dense1.weight": (h, h), f"{b}.attention.dense1.bias": (h,),
            f"{b}.attention.dense2.weight": (h, h), f"{b}.attention.dense2.bias": (h,),
            f"{b}.attention.dense3.weight": (h, h), f"{b}.attention.dense3.bias": (h,),
            f"{b}.attention.projection.weight": (h, h), f"{b}.attention.projection.bias": (h,),
            f"{b}.output.mapping.weight": (h, 4 * h), f"{b}.output.mapping.bias": (4 * h,),
            f"{b}.output.projection.weight": (4 * h, h), f"{b}.output.projection.bias": (h,)}


def names_shapes(path) -> dict:
    return {n: (d, s) for n, (d, s, _) in tensors_of(path).items()}


@pytest.mark.parametrize("style", ["save_pretrained", "hub"])
def test_gpt_forward_names_shapes_and_values(cli, tmp_path, style):
    hf, model = build(tmp_path / "hf")
    if style == "hub":
        hf = hub_style(tmp_path / "hub", hf, model)
    out = tmp_path / "g.ckpt"
    result = cli("--model", "gpt", "--input_path", hf, "--output_path", out)
    assert result.code == 0, result.err
    assert names_shapes(out) == expected_ms()
    from mindformers_conv.formats.inputs import open_input

    got, sd = open_input(out).refs, model.state_dict()
    c_attn, b = sd["transformer.h.1.attn.c_attn.weight"], "backbone.blocks.1"
    for k in range(3):  # Conv1D [in, out]: the k-th third of the columns, transposed
        assert torch.equal(got[f"{b}.attention.dense{k + 1}.weight"].read(), c_attn[:, k * H:(k + 1) * H].t())
        assert torch.equal(got[f"{b}.attention.dense{k + 1}.bias"].read(),
                           sd["transformer.h.1.attn.c_attn.bias"][k * H:(k + 1) * H])
    assert torch.equal(got[f"{b}.output.mapping.weight"].read(), sd["transformer.h.1.mlp.c_fc.weight"])
    assert torch.equal(got[f"{b}.attention.projection.weight"].read(), sd["transformer.h.1.attn.c_proj.weight"])
    assert torch.equal(got["backbone.layernorm.beta"].read(), sd["transformer.ln_f.bias"])


def test_gpt_ckpt_loads_in_mindspore(cli, tmp_path):
    hf, _ = build(tmp_path / "hf")
    assert cli("--model", "gpt", "--input_path", hf, "--output_path", tmp_path / "g.ckpt", "--dtype", "fp16").code == 0
    assert_loads_in_mindspore(tmp_path / "g.ckpt", expected_ms(), "float16")


@pytest.mark.parametrize("source, cast", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, "fp16")])
def test_gpt_round_trip_gives_back_bytes(cli, tmp_path, source, cast):
    """Hub-style input (unprefixed, with the mask buffers): every weight comes back byte for byte."""
    hub = hub_style(tmp_path / "hub", *build(tmp_path / "hf", dtype=source))
    folder, pickle = round_trip(cli, tmp_path, "gpt", hub, cast)
    assert_same_tensors(tensors_of(folder), weights_of(hub))
    assert_same_tensors(tensors_of(pickle), weights_of(hub))
    assert type(torch.load(pickle, weights_only=True)) is dict  # a flat dict, as MindFormers'


def assert_loads_in_mindspore(path, expected: dict, dtype: str) -> None:
    """`mindspore.load_checkpoint` reads the file: the expected names and shapes, every tensor of `dtype`."""
    import mindspore as ms

    params = ms.load_checkpoint(str(path))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected.items()}
    assert {p.dtype for p in params.values()} == {getattr(ms, dtype)}


def round_trip(cli, tmp_path, key, src, cast=None, targets=("folder", "bin")) -> list:
    """HF → .ckpt (with --verify, and --dtype `cast`) → an HF folder and/or a .bin, config from `src`."""
    ckpt = tmp_path / "round_trip.ckpt"
    result = cli("--model", key, "--input_path", src, "--output_path", ckpt, *(["--dtype", cast] if cast else []),
                 "--verify")
    assert result.code == 0, result.err
    outs = [tmp_path / ("back" if target == "folder" else "back.bin") for target in targets]
    for out, target in zip(outs, targets):
        result = cli("--model", key, "--reversed", "--input_path", ckpt, "--config_path", src,
                     "--output_path", f"{out}/" if target == "folder" else out)
        assert result.code == 0, result.err
    return outs


def check_reversed_logits(cli, tmp_path, key, hf, model, dtype):
    """HF (save_pretrained, `transformer.` names) → MS → HF folder: the hub's unprefixed names, same bytes,
    and `from_pretrained` of the result gives the original logits exactly."""
    ckpt = tmp_path / "m.ckpt"
    assert cli("--model", key, "--input_path", hf, "--output_path", ckpt).code == 0
    assert cli("--model", key, "--reversed", "--input_path", ckpt, "--output_path", f"{tmp_path}/back/",
               "--config_path", hf).code == 0
    unprefixed = {n.removeprefix("transformer."): t for n, t in tensors_of(hf).items()}
    assert_same_tensors(tensors_of(tmp_path / "back"), unprefixed)  # MindFormers' (and the hub's) names
    back = type(model).from_pretrained(tmp_path / "back", torch_dtype=dtype).eval()
    assert torch.equal(logits(back), logits(model))


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
def test_gpt_reversed_folder_gives_identical_logits(cli, tmp_path, source):
    hf, model = build(tmp_path / "hf", dtype=source)
    check_reversed_logits(cli, tmp_path, "gpt", hf, model, source)


def test_gpt_causal_mask_buffers_are_left_out_not_copied_as_beta(cli, tmp_path):
    """MindFormers copies h.{i}.attn.bias / masked_bias into the .ckpt as attention.beta / masked_beta (§5.11)."""
    hub = hub_style(tmp_path / "hub", *build(tmp_path / "hf"))
    out = tmp_path / "g.ckpt"
    result = cli("--model", "gpt", "--input_path", hub, "--output_path", out)
    assert result.code == 0, result.err
    assert not any("beta" in n and "layernorm" not in n for n in tensors_of(out))
    assert f"left out {2 * L} (causal-mask buffers" in result.out


def test_gpt_converts_every_layer_without_layers_flag(cli, tmp_path):
    """MindFormers converts `--layers` blocks (default 12) and silently drops the rest (§5.7)."""
    hf, _ = build(tmp_path / "hf", n_layer=13)
    out = tmp_path / "g.ckpt"
    assert cli("--model", "gpt", "--input_path", hf, "--output_path", out).code == 0
    assert names_shapes(out) == expected_ms(n_layer=13)
    limited = tmp_path / "g1.ckpt"
    result = cli("--model", "gpt", "--input_path", hf, "--output_path", limited, "--layers", 1)
    assert result.code == 0 and "beyond --layers 1" in result.out
    assert names_shapes(limited) == expected_ms(n_layer=1)


def test_gpt_unknown_or_untied_head_stops_instead_of_silently_dropping(cli, tmp_path):
    """MindFormers drops every key outside its table without a word (§5.7)."""
    _, model = build(tmp_path / "hf")
    state = dict(model.transformer.state_dict())
    hf = write_hf(tmp_path / "odd", {**state, "h.0.attn.extra": torch.zeros(2)}, model.config.to_dict())
    result = cli("--model", "gpt", "--input_path", hf, "--output_path", tmp_path / "x.ckpt")
    assert result.code == 3 and "h.0.attn.extra" in result.err and not (tmp_path / "x.ckpt").exists()
    untied = write_hf(tmp_path / "untied", {**state, "lm_head.weight": torch.randn(V, H)},
                      {**model.config.to_dict(), "tie_word_embeddings": False})
    result = cli("--model", "gpt", "--input_path", untied, "--output_path", tmp_path / "y.ckpt")
    assert result.code == 3 and "lm_head.weight" in result.err
    tied = write_hf(tmp_path / "tied", {**state, "lm_head.weight": state["wte.weight"].clone()}, model.config.to_dict())
    result = cli("--model", "gpt", "--input_path", tied, "--output_path", tmp_path / "z.ckpt")
    assert result.code == 0 and "lm_head.weight" in result.out  # reported as left out (tied to wte)


def test_gpt_auto_and_python_api(cli, tmp_path):
    from models.gpt.convert_reversed import convert_ms_to_pt
    from models.gpt.convert_weight import convert_pt_to_ms

    hub = hub_style(tmp_path / "hub", *build(tmp_path / "hf"))
    result = cli("--model", "auto", "--input_path", hub, "--output_path", tmp_path / "a.ckpt")
    assert result.code == 0 and "gpt" in result.out
    assert convert_pt_to_ms(hub / "pytorch_model.bin", tmp_path / "g.ckpt", dtype=None, layers=L)
    assert convert_ms_to_pt(tmp_path / "g.ckpt", tmp_path / "g.bin")
    assert_same_tensors(tensors_of(tmp_path / "g.ckpt"), tensors_of(tmp_path / "a.ckpt"))
    assert_same_tensors(tensors_of(tmp_path / "g.bin"), weights_of(hub))
