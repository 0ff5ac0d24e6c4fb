"""knowlm (§4.14): KnowLM-13B is a LlamaForCausalLM checkpoint; llama's name_replace, pt2ms, exact reverse."""

import pytest

from conftest import assert_same_tensors, tensors_of
from test_skywork import build_llama, check_llama_variant


@pytest.fixture
def knowlm_hf(tmp_path):
    return build_llama(tmp_path / "hf")  # KnowLM's config.json is a plain llama one


@pytest.mark.parametrize("flag", [None, "bf16"])
def test_knowlm_forward_reverse_and_logits(cli, knowlm_hf, tmp_path, flag):
    check_llama_variant(cli, "knowlm", knowlm_hf, tmp_path, flag)


def test_knowlm_writes_what_llama_writes(cli, knowlm_hf, tmp_path):
    """Same name_replace as llama (§4.14, 2): the two keys give identical files."""
    for key in ("knowlm", "llama"):
        assert cli("--model", key, "--input_path", knowlm_hf, "--output_path", tmp_path / f"{key}.ckpt").code == 0
    assert_same_tensors(tensors_of(tmp_path / "knowlm.ckpt"), tensors_of(tmp_path / "llama.ckpt"))


def test_knowlm_python_api_exists_unlike_v1_3_2(knowlm_hf, tmp_path):
    """v1.3.2's map points to research.knowlm, which that tag does not ship; its print-and-return-False
    on a load error (exit 0, no file) is an exception here."""
    from models.knowlm.convert_reversed import convert_ms_to_pt
    from models.knowlm.convert_weight import convert_pt_to_ms

    from mindformers_conv.errors import ConvError

    assert convert_pt_to_ms(knowlm_hf, tmp_path / "k.ckpt", dtype="bf16")
    assert convert_ms_to_pt(tmp_path / "k.ckpt", tmp_path / "k.bin")
    assert_same_tensors(tensors_of(tmp_path / "k.bin"), tensors_of(knowlm_hf))
    with pytest.raises(ConvError):
        convert_pt_to_ms(tmp_path / "missing", tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
