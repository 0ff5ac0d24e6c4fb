"""wizardcoder (GPTBigCode): spec §4.15 — backbone names, c_attn split from config, c_proj/c_fc transposed."""

import json

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of

H, NH, V, P, L = 16, 4, 32, 32, 2


def build(folder, multi_query=True, n_layer=L, dtype=torch.float32, tied=True, seed=0):
    """A tiny random GPTBigCodeForCausalLM saved with save_pretrained; returns (folder, model)."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(seed)
    config = GPTBigCodeConfig(vocab_size=V, n_positions=P, n_embd=H, n_layer=n_layer, n_head=NH,
                              multi_query=multi_query, tie_word_embeddings=tied)
    model = GPTBigCodeForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # LayerNorms start at 1/0: randomise them so a mix-up would show
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.normal_()
    model.save_pretrained(folder)
    # transformers leaves out tie_word_embeddings when it is the default (True); state it, as real configs do
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": tied}))
    return folder, model


def logits(model, ids=torch.tensor([[1, 5, 7, 2, 30, 11]])):
    with torch.no_grad():
        return model(ids).logits


def expected_ms(kv: int, n_layer: int = L, dtype: str = "F32") -> dict:
    """Spec §4.15 table: [out, in] q/k/v, [in, out] projections and mapping."""
    out = {"backbone.embedding.word_embedding.embedding_table": (V, H),
           "backbone.embedding.position_embedding.embedding_table": (P, H),
           "backbone.layernorm.gamma": (H,), "backbone.layernorm.beta": (H,), "head.head_weight": (V, H)}
    for i in range(n_layer):
        b = f"backbone.blocks.{i}"
        out.update({f"{b}.layernorm1.gamma": (H,), f"{b}.layernorm1.beta": (H,),
                    f"{b}.layernorm2.gamma": (H,), f"{b}.layernorm2.beta": (H,),
                    f"{b}.attention.dense1.weight": (H, H), f"{b}.attention.dense1.bias": (H,),
                    f"{b}.attention.dense2.weight": (kv, H), f"{b}.attention.dense2.bias": (kv,),
                    f"{b}.attention.dense3.weight": (kv, H), f"{b}.attention.dense3.bias": (kv,),
                    f"{b}.attention.projection.weight": (H, H), f"{b}.attention.projection.bias": (H,),
                    f"{b}.output.mapping.weight": (H, 4 * H), f"{b}.output.mapping.bias": (4 * H,),
                    f"{b}.output.projection.weight": (4 * H, H), f"{b}.output.projection.bias": (H,)})
    return {n: (dtype, s) for n, s in out.items()}


@pytest.mark.parametrize("multi_query, kv", [(True, H // NH), (False, H)])
def test_wizardcoder_forward_split_sizes_come_from_config(cli, tmp_path, multi_query, kv):
    """MindFormers splits c_attn at the hard-coded rows 6144/6272 (WizardCoder-15B only)."""
    hf, model = build(tmp_path / "hf", multi_query=multi_query)
    out = tmp_path / "w.ckpt"
    result = cli("--model", "wizardcoder", "--input_path", hf, "--output_path", out)
    assert result.code == 0, result.err
    assert {n: (d, s) for n, (d, s, _) in tensors_of(out).items()} == expected_ms(kv)
    from mindformers_conv.formats.inputs import open_input

    got, sd = open_input(out).refs, model.state_dict()
    c_attn = sd["transformer.h.1.attn.c_attn.weight"]
    assert torch.equal(got["backbone.blocks.1.attention.dense1.weight"].read(), c_attn[:H])
    assert torch.equal(got["backbone.blocks.1.attention.dense2.weight"].read(), c_attn[H:H + kv])
    assert torch.equal(got["backbone.blocks.1.attention.dense3.weight"].read(), c_attn[H + kv:])
    assert torch.equal(got["backbone.blocks.1.output.mapping.weight"].read(), sd["transformer.h.1.mlp.c_fc.weight"].t())
    assert torch.equal(got["backbone.blocks.1.attention.projection.weight"].read(),
                       sd["transformer.h.1.attn.c_proj.weight"].t())
    assert torch.equal(got["head.head_weight"].read(), sd["transformer.wte.weight"])  # tied head emitted


def test_wizardcoder_ckpt_loads_in_mindspore(cli, tmp_path):
    import mindspore as ms

    hf, _ = build(tmp_path / "hf")
    assert cli("--model", "wizardcoder", "--input_path", hf, "--output_path", tmp_path / "w.ckpt",
               "--dtype", "bf16").code == 0
    params = ms.load_checkpoint(str(tmp_path / "w.ckpt"))
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: s for n, (_, s) in expected_ms(H // NH).items()}
    assert {p.dtype for p in params.values()} == {ms.bfloat16}


@pytest.mark.parametrize("source, cast", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("multi_query", [True, False])
def test_wizardcoder_round_trip_gives_back_bytes_and_logits(cli, tmp_path, source, cast, multi_query):
    from transformers import GPTBigCodeForCausalLM

    hf, model = build(tmp_path / "hf", multi_query=multi_query, dtype=source)
    ckpt = tmp_path / "w.ckpt"
    assert cli("--model", "wizardcoder", "--input_path", hf, "--output_path", ckpt,
               *(["--dtype", cast] if cast else []), "--verify").code == 0
    result = cli("--model", "wizardcoder", "--reversed", "--input_path", ckpt, "--output_path", f"{tmp_path}/back/",
                 "--config_path", hf)
    assert result.code == 0, result.err
    assert_same_tensors(tensors_of(tmp_path / "back"), tensors_of(hf))  # the tied head is left out again
    back = GPTBigCodeForCausalLM.from_pretrained(tmp_path / "back", torch_dtype=source).eval()
    assert torch.equal(logits(back), logits(model))


def test_wizardcoder_untied_head_and_bin_reverse(cli, tmp_path):
    hf, model = build(tmp_path / "hf", tied=False)
    ckpt, back = tmp_path / "w.ckpt", tmp_path / "w.bin"
    assert cli("--model", "wizardcoder", "--input_path", hf, "--output_path", ckpt).code == 0
    from mindformers_conv.formats.inputs import open_input

    assert torch.equal(open_input(ckpt).refs["head.head_weight"].read(), model.state_dict()["lm_head.weight"])
    assert cli("--model", "wizardcoder", "--reversed", "--input_path", ckpt, "--output_path", back).code == 0
    assert_same_tensors(tensors_of(back), tensors_of(hf))


def test_wizardcoder_converts_every_layer_without_layers_flag(cli, tmp_path):
    """MindFormers converts `--layers` blocks, and its CLI always passes 12: block 12 of 13 would be lost."""
    hf, _ = build(tmp_path / "hf", n_layer=13)
    out = tmp_path / "w.ckpt"
    assert cli("--model", "wizardcoder", "--input_path", hf, "--output_path", out).code == 0
    assert {n: (d, s) for n, (d, s, _) in tensors_of(out).items()} == expected_ms(H // NH, n_layer=13)


def test_wizardcoder_layers_flag_limits_the_blocks(cli, tmp_path):
    hf, _ = build(tmp_path / "hf", n_layer=3)
    out = tmp_path / "w.ckpt"
    result = cli("--model", "wizardcoder", "--input_path", hf, "--output_path", out, "--layers", 1)
    assert result.code == 0, result.err
    assert {n: (d, s) for n, (d, s, _) in tensors_of(out).items()} == expected_ms(H // NH, n_layer=1)
    assert "beyond --layers 1" in result.out
    back = tmp_path / "w.bin"
    assert cli("--model", "wizardcoder", "--reversed", "--input_path", out, "--output_path", back,
               "--config_path", hf).code == 0
    assert not any(n.startswith(("transformer.h.1.", "transformer.h.2.")) for n in tensors_of(back))


def test_wizardcoder_sizes_from_cli_flags_without_config(cli, tmp_path):
    hf, _ = build(tmp_path / "hf")
    (hf / "config.json").unlink()
    missing = cli("--model", "wizardcoder", "--input_path", hf, "--output_path", tmp_path / "x.ckpt")
    assert missing.code == 3 and "n_embd" in missing.err and not (tmp_path / "x.ckpt").exists()
    assert cli("--model", "wizardcoder", "--input_path", hf, "--output_path", tmp_path / "y.ckpt",
               "--hidden_size", H, "--n_head", NH).code == 0
    names = tensors_of(tmp_path / "y.ckpt")
    assert names["backbone.blocks.0.attention.dense2.weight"][1] == (H // NH, H)
    # No config.json: a file without a head is a tied model (transformers' default), so the head is emitted.
    head, embedding = names["head.head_weight"], names["backbone.embedding.word_embedding.embedding_table"]
    assert head[:2] == embedding[:2] and head[2].equal(embedding[2])


def test_wizardcoder_tied_head_when_config_omits_tie_word_embeddings(cli, tmp_path):
    hf, model = build(tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    (hf / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "w.ckpt"
    assert cli("--model", "wizardcoder", "--input_path", hf, "--output_path", out).code == 0
    assert "head.head_weight" in tensors_of(out)


def test_wizardcoder_python_api(tmp_path):
    from models.wizardcoder.convert_reversed import convert_ms_to_pt
    from models.wizardcoder.convert_weight import convert_pt_to_ms

    hf, _ = build(tmp_path / "hf")
    assert convert_pt_to_ms(hf / "model.safetensors", tmp_path / "w.ckpt", dtype=None, layers=40)
    assert convert_ms_to_pt(tmp_path / "w.ckpt", f"{tmp_path}/back/", config_path=hf)
    assert_same_tensors(tensors_of(tmp_path / "back"), tensors_of(hf))


@example("wizardcoder")
def wizardcoder_example(folder, key):
    return build(folder)[0], ()
