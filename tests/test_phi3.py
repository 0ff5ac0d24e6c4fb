"""phi3: the family docs/adding-a-model.md adds, tested as that walk-through says."""

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of

H, I, NH, NKV, V = 64, 96, 4, 2, 128


@example("phi3")
def phi3_example(folder, key):
    """A tiny random Phi-3 saved by transformers itself (fixed seed)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                        num_attention_heads=NH, num_key_value_heads=NKV, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    Phi3ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder, ()


@pytest.fixture
def phi3_hf(tmp_path):
    return phi3_example(tmp_path / "hf", "phi3")[0]


def test_phi3_forward_splits_the_fused_projections(cli, phi3_hf, tmp_path):
    out = tmp_path / "phi3.ckpt"
    assert cli("--model", "auto", "--input_path", phi3_hf, "--output_path", out).code == 0
    ms, hf = tensors_of(out), tensors_of(phi3_hf)
    hd = H // NH
    assert ms["model.layers.0.attention.wq.weight"][:2] == ("BF16", (NH * hd, H))
    assert ms["model.layers.0.attention.wk.weight"][:2] == ("BF16", (NKV * hd, H))
    assert ms["model.layers.1.feed_forward.w3.weight"][:2] == ("BF16", (I, H))
    qkv = hf["model.layers.0.self_attn.qkv_proj.weight"][2]
    assert ms["model.layers.0.attention.wv.weight"][2].equal(qkv[(NH + NKV) * hd * H * 2:])


def test_phi3_ckpt_loads_in_mindspore(cli, phi3_hf, tmp_path):
    import mindspore as ms

    out = tmp_path / "phi3.ckpt"
    assert cli("--model", "phi3", "--input_path", phi3_hf, "--output_path", out).code == 0
    loaded = ms.load_checkpoint(str(out))
    assert set(loaded) == set(tensors_of(out))


def test_phi3_round_trip_is_bit_exact_and_gives_the_same_logits(cli, phi3_hf, tmp_path):
    from transformers import Phi3ForCausalLM

    ckpt, back = tmp_path / "phi3.ckpt", tmp_path / "back"
    assert cli("--model", "phi3", "--input_path", phi3_hf, "--output_path", ckpt).code == 0
    assert cli("--model", "phi3", "--reversed", "--input_path", ckpt, "--output_path", f"{back}/",
               "--config_path", phi3_hf).code == 0
    assert_same_tensors(tensors_of(back), tensors_of(phi3_hf))
    tokens = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        logits = [Phi3ForCausalLM.from_pretrained(p).eval()(tokens).logits for p in (phi3_hf, back)]
    assert torch.equal(*logits)
