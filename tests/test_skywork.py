"""skywork (§4.3, §4.13): deepseek's files, i.e. llama's table through LlamaForCausalLM; Float32 default.

Skywork-13B is remote code with its own model_type; its weights are Llama's, so the fixture is built with
transformers' LlamaForCausalLM and given Skywork's config.json keys (from_pretrained only warns, §4.3).
"""

import json

import pytest

from conftest import tensors_of
from test_qwen2 import (H, I, MS_DTYPE, SIZES, assert_bin_reverse_gives_the_bytes, assert_loads_in_mindspore,
                        assert_round_trip_gives_equal_logits, dense_names, forward_ok, save_tiny)

SKYWORK_CONFIG = {"model_type": "skywork", "architectures": ["SkyworkForCausalLM"],
                  "auto_map": {"AutoConfig": "configuration_skywork.SkyworkConfig",
                               "AutoModelForCausalLM": "modeling_skywork.SkyworkForCausalLM"}}


def build_llama(folder, **config_json):
    """A tiny bf16 LlamaForCausalLM saved by transformers, its config.json updated with `config_json`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    save_tiny(folder, LlamaForCausalLM, LlamaConfig(**SIZES, torch_dtype="bfloat16"))
    config = folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **config_json}))
    return folder


def check_llama_variant(cli, key, hf, tmp_path, flag):
    """The llama table (§4.1) in the flag's dtype (Float32 without one), loadable by MindSpore, and a round
    trip to the same bytes and logits."""
    from transformers import LlamaForCausalLM

    dtype = MS_DTYPE.get(flag, "F32")
    cast = ["--dtype", flag] if flag else []
    assert forward_ok(cli, key, hf, tmp_path / "k.ckpt", *cast) == dense_names(bias=False, dtype=dtype)
    assert_loads_in_mindspore(tmp_path / "k.ckpt", dense_names(bias=False, dtype=dtype))
    assert_round_trip_gives_equal_logits(cli, key, hf, tmp_path, LlamaForCausalLM, cast)
    assert_bin_reverse_gives_the_bytes(cli, key, hf, tmp_path, cast)


@pytest.fixture
def skywork_hf(tmp_path):
    return build_llama(tmp_path / "hf", **SKYWORK_CONFIG)


@pytest.mark.parametrize("flag", [None, "bf16", "fp16"])
def test_skywork_forward_reverse_and_logits(cli, skywork_hf, tmp_path, flag):
    check_llama_variant(cli, "skywork", skywork_hf, tmp_path, flag)


def test_skywork_auto_detects_from_its_model_type(cli, skywork_hf, tmp_path):
    result = cli("--model", "auto", "--input_path", skywork_hf, "--output_path", tmp_path / "a.ckpt")
    assert result.code == 0 and "model: skywork (" in result.out


def test_skywork_python_api_exists_unlike_v1_3_2(skywork_hf, tmp_path):
    """v1.3.2's map points to research.skywork, which that tag does not ship (ModuleNotFoundError)."""
    from models.skywork.convert_reversed import convert_ms_to_pt
    from models.skywork.convert_weight import convert_pt_to_ms

    assert convert_pt_to_ms(skywork_hf / "model.safetensors", tmp_path / "s.ckpt")
    assert tensors_of(tmp_path / "s.ckpt")["model.layers.1.feed_forward.w2.weight"][:2] == ("F32", (H, I))
    assert convert_ms_to_pt(tmp_path / "s.ckpt", tmp_path / "s.bin", dtype="bf16")
    assert tensors_of(tmp_path / "s.bin").keys() == tensors_of(skywork_hf).keys()
