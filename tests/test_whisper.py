"""whisper: spec §2.10 / §7 — HF names kept except conv [d, c, 3] → [d, c, 1, 3], embeddings → embedding_weight,
layer_norm gamma/beta; source dtype kept; flat torch dict reverse; identical logits after HF → MS → HF."""

import json

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of
from test_vit import convert, dtype_flag, forward

D, MEL, FF, SRC, TGT, V, L = 8, 4, 12, 6, 8, 16, 2  # d_model, mel bins, ffn, positions (enc, dec), vocab, layers


def build(folder, dtype=torch.float32, fmt="safetensors"):
    """A tiny random WhisperForConditionalGeneration saved with save_pretrained; returns (folder, model)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=V, num_mel_bins=MEL, d_model=D, encoder_layers=L, decoder_layers=L,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=FF,
                           decoder_ffn_dim=FF, max_source_positions=SRC, max_target_positions=TGT, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    model = WhisperForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():  # LayerNorms start at 1/0: randomise them so a gamma/beta mix-up would show
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.normal_()
    model.save_pretrained(folder, safe_serialization=fmt == "safetensors")
    return folder, model


def logits(model):
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(1, MEL, 2 * SRC, generator=gen).to(model.dtype)
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=torch.tensor([[3, 5, 7, 11]])).logits


def expected_ms(dtype="F32", proj_out=False) -> dict:
    """Spec §2.10 table, literally."""
    out = {"model.encoder.conv1.weight": (D, MEL, 1, 3), "model.encoder.conv1.bias": (D,),
           "model.encoder.conv2.weight": (D, D, 1, 3), "model.encoder.conv2.bias": (D,),
           "model.encoder.embed_positions.embedding_weight": (SRC, D),
           "model.encoder.layer_norm.gamma": (D,), "model.encoder.layer_norm.beta": (D,),
           "model.decoder.embed_tokens.embedding_weight": (V, D),
           "model.decoder.embed_positions.embedding_weight": (TGT, D),
           "model.decoder.layer_norm.gamma": (D,), "model.decoder.layer_norm.beta": (D,)}
    for side, attns in (("encoder", ("self_attn",)), ("decoder", ("self_attn", "encoder_attn"))):
        for i in range(L):
            p = f"model.{side}.layers.{i}"
            out.update({f"{p}.fc1.weight": (FF, D), f"{p}.fc1.bias": (FF,), f"{p}.fc2.weight": (D, FF),
                        f"{p}.fc2.bias": (D,), f"{p}.final_layer_norm.gamma": (D,), f"{p}.final_layer_norm.beta": (D,)})
            for a in attns:
                out.update({f"{p}.{a}_layer_norm.gamma": (D,), f"{p}.{a}_layer_norm.beta": (D,)})
                out.update({f"{p}.{a}.{x}_proj.weight": (D, D) for x in "qkv"})
                out.update({f"{p}.{a}.{x}_proj.bias": (D,) for x in "qv"})  # k_proj has no bias
                out.update({f"{p}.{a}.out_proj.weight": (D, D), f"{p}.{a}.out_proj.bias": (D,)})
    if proj_out:
        out["proj_out.weight"] = (V, D)
    return {n: (dtype, s) for n, s in out.items()}


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("flag, dtype", [(None, "F32"), ("fp16", "F16")])
def test_whisper_forward_names_shapes_and_dtypes(cli, tmp_path, fmt, flag, dtype):
    """MindFormers reads the HF pytorch_model.bin, which carries the tied proj_out.weight: it is kept by name."""
    hf, _ = build(tmp_path / "hf", fmt=fmt)
    assert forward(cli, "whisper", hf, tmp_path, *dtype_flag(flag)) == expected_ms(dtype, proj_out=fmt == "bin")


def test_whisper_conv_weights_gain_axis_2_and_norms_become_gamma_beta(cli, tmp_path):
    hf, model = build(tmp_path / "hf")
    out = tmp_path / "w.ckpt"
    convert(cli, "--model", "whisper", "--input_path", hf, "--output_path", out)
    from mindformers_conv.formats.inputs import open_input

    refs, sd = open_input(out).refs, model.state_dict()
    assert torch.equal(refs["model.encoder.conv2.weight"].read(), sd["model.encoder.conv2.weight"].unsqueeze(2))
    assert torch.equal(refs["model.decoder.layers.1.encoder_attn_layer_norm.beta"].read(),
                       sd["model.decoder.layers.1.encoder_attn_layer_norm.bias"])
    assert torch.equal(refs["model.decoder.layers.1.encoder_attn.k_proj.weight"].read(),
                       sd["model.decoder.layers.1.encoder_attn.k_proj.weight"])  # no transpose


def test_whisper_ckpt_loads_in_mindspore(cli, tmp_path):
    import mindspore as ms

    hf, _ = build(tmp_path / "hf", fmt="bin")
    convert(cli, "--model", "whisper", "--input_path", hf / "pytorch_model.bin", "--output_path", tmp_path / "w.ckpt")
    params = ms.load_checkpoint(str(tmp_path / "w.ckpt"))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected_ms(proj_out=True).items()}
    assert {p.dtype for p in params.values()} == {ms.float32}


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("source, cast", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "bf16")])
def test_whisper_round_trip_gives_back_bytes_and_logits(cli, tmp_path, fmt, source, cast):
    """bf16 sources too: MindFormers goes through `.numpy()`, which raises on bf16."""
    from transformers import WhisperForConditionalGeneration

    hf, model = build(tmp_path / "hf", dtype=source, fmt=fmt)
    ckpt = tmp_path / "w.ckpt"
    convert(cli, "--model", "whisper", "--input_path", hf, "--output_path", ckpt,
            *dtype_flag(cast), "--verify")
    convert(cli, "--model", "whisper", "--reversed", "--input_path", ckpt, "--output_path", f"{tmp_path}/back/",
            "--config_path", hf)
    assert_same_tensors(tensors_of(tmp_path / "back"), tensors_of(hf))
    back = WhisperForConditionalGeneration.from_pretrained(tmp_path / "back", torch_dtype=source).eval()
    assert torch.equal(logits(back), logits(model))


def test_whisper_reverse_bin_is_a_flat_dict_as_mindformers_writes(cli, tmp_path):
    hf, _ = build(tmp_path / "hf", fmt="bin")
    ckpt, back = tmp_path / "w.ckpt", tmp_path / "whisper.bin"
    convert(cli, "--model", "whisper", "--input_path", hf, "--output_path", ckpt)
    convert(cli, "--model", "whisper", "--reversed", "--input_path", ckpt, "--output_path", back)
    loaded = torch.load(back, weights_only=True)
    assert "model.decoder.embed_tokens.weight" in loaded and "model" not in loaded
    assert_same_tensors(tensors_of(back), tensors_of(hf / "pytorch_model.bin"))


def test_whisper_model_auto_from_config(cli, tmp_path):
    hf, _ = build(tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["model_type"] == "whisper"
    result = convert(cli, "--model", "auto", "--input_path", hf, "--output_path", tmp_path / "w.ckpt")
    assert "model: whisper" in result.out


@example("whisper")
def whisper_example(folder, key):
    return build(folder)[0], ()
