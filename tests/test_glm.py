"""glm (ChatGLM-6B): spec §2.1 — names kept but LayerNorm gamma/beta and embedding_table; float16 default."""

import pytest
import torch

from conftest import assert_same_tensors, example, tensors_of, write_hf
from test_gpt import assert_loads_in_mindspore, names_shapes, round_trip

H, NH, I, V, L = 32, 4, 128, 40, 2
CONFIG = {
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "hidden_size": H, "num_attention_heads": NH,
    "num_layers": L, "inner_hidden_size": I, "vocab_size": V, "layernorm_epsilon": 1e-5,
    "max_sequence_length": 2048, "position_encoding_2d": True, "bos_token_id": 130004, "eos_token_id": 130005,
    "torch_dtype": "float16", "use_cache": True,
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                 "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
}
ROTARY = H // NH // 4  # inv_freq of the 2D rotary: half of head_dim / 2


def glm_state(dtype=torch.float16, seed=0) -> dict:
    """ChatGLM-6B's state_dict() names (remote code, so built directly), inv_freq buffers included."""
    shapes = {"transformer.word_embeddings.weight": (V, H), "transformer.final_layernorm.weight": (H,),
              "transformer.final_layernorm.bias": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"transformer.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (H,), f"{p}.input_layernorm.bias": (H,),
                       f"{p}.attention.rotary_emb.inv_freq": (ROTARY,),
                       f"{p}.attention.query_key_value.weight": (3 * H, H),
                       f"{p}.attention.query_key_value.bias": (3 * H,),
                       f"{p}.attention.dense.weight": (H, H), f"{p}.attention.dense.bias": (H,),
                       f"{p}.post_attention_layernorm.weight": (H,), f"{p}.post_attention_layernorm.bias": (H,),
                       f"{p}.mlp.dense_h_to_4h.weight": (I, H), f"{p}.mlp.dense_h_to_4h.bias": (I,),
                       f"{p}.mlp.dense_4h_to_h.weight": (H, I), f"{p}.mlp.dense_4h_to_h.bias": (H,)})
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}


@example("glm")
def glm_example(folder, key):
    return glm_hf(folder), ()  # fp16, as MindFormers writes it


def glm_hf(folder, dtype=torch.float16, fmt="bin"):
    return write_hf(folder, glm_state(dtype), {**CONFIG, "torch_dtype": str(dtype).removeprefix("torch.")}, fmt=fmt)


def expected_ms(dtype: str = "F16") -> dict:
    out = {"transformer.word_embeddings.embedding_table": (V, H), "transformer.final_layernorm.gamma": (H,),
           "transformer.final_layernorm.beta": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"transformer.layers.{i}"
        out.update({f"{p}.input_layernorm.gamma": (H,), f"{p}.input_layernorm.beta": (H,),
                    f"{p}.attention.query_key_value.weight": (3 * H, H),
                    f"{p}.attention.query_key_value.bias": (3 * H,),
                    f"{p}.attention.dense.weight": (H, H), f"{p}.attention.dense.bias": (H,),
                    f"{p}.post_attention_layernorm.gamma": (H,), f"{p}.post_attention_layernorm.beta": (H,),
                    f"{p}.mlp.dense_h_to_4h.weight": (I, H), f"{p}.mlp.dense_h_to_4h.bias": (I,),
                    f"{p}.mlp.dense_4h_to_h.weight": (H, I), f"{p}.mlp.dense_4h_to_h.bias": (H,)})
    return {n: (dtype, s) for n, s in out.items()}


WEIGHTS = [n for n in glm_state() if not n.endswith("inv_freq")]


@pytest.mark.parametrize("source", [torch.float16, torch.float32, torch.bfloat16])
def test_glm_forward_is_float16_whatever_the_source(cli, tmp_path, source):
    """MindFormers `.half()`s the loaded model: every tensor float16 without --dtype (§7)."""
    hf = glm_hf(tmp_path / "hf", source)
    out = tmp_path / "g.ckpt"
    result = cli("--model", "glm", "--input_path", hf, "--output_path", out)
    assert result.code == 0, result.err
    assert names_shapes(out) == expected_ms("F16")
    from mindformers_conv.formats.inputs import open_input

    got, state = open_input(out).refs, glm_state(source)
    assert torch.equal(got["transformer.layers.1.attention.query_key_value.weight"].read(),
                       state["transformer.layers.1.attention.query_key_value.weight"].half())
    assert torch.equal(got["transformer.layers.0.input_layernorm.beta"].read(),
                       state["transformer.layers.0.input_layernorm.bias"].half())
    assert torch.equal(got["transformer.word_embeddings.embedding_table"].read(),
                       state["transformer.word_embeddings.weight"].half())


def test_glm_rotary_inv_freq_buffers_are_left_out(cli, tmp_path):
    """MindFormers copies `attention.rotary_emb.inv_freq` into the .ckpt, where nothing loads it (§5.11)."""
    hf = glm_hf(tmp_path / "hf")
    result = cli("--model", "glm", "--input_path", hf, "--output_path", tmp_path / "g.ckpt")
    assert result.code == 0 and f"left out {L} (rotary inv_freq buffer" in result.out
    assert not any("inv_freq" in n for n in tensors_of(tmp_path / "g.ckpt"))


def test_glm_dtype_flag_applies_to_input_layernorm_too(cli, tmp_path):
    """MindFormers forces input_layernorm back to float16 whatever --dtype says; we honour --dtype (the MS
    LayerNorm is float32 anyway, and the detour only rounds)."""
    hf = glm_hf(tmp_path / "hf", torch.float32)
    out = tmp_path / "g.ckpt"
    assert cli("--model", "glm", "--input_path", hf, "--output_path", out, "--dtype", "fp32").code == 0
    assert names_shapes(out) == expected_ms("F32")
    layernorm = tensors_of(out)["transformer.layers.0.input_layernorm.gamma"][2]
    assert layernorm.equal(tensors_of(hf)["transformer.layers.0.input_layernorm.weight"][2])


def test_glm_ckpt_loads_in_mindspore(cli, tmp_path):
    hf = glm_hf(tmp_path / "hf")
    assert cli("--model", "glm", "--input_path", hf, "--output_path", tmp_path / "g.ckpt").code == 0
    assert_loads_in_mindspore(tmp_path / "g.ckpt", expected_ms(), "float16")


@pytest.mark.parametrize("source, cast", [(torch.float16, None), (torch.bfloat16, "bf16")])
def test_glm_round_trip_gives_back_the_hf_bytes(cli, tmp_path, source, cast):
    hf = glm_hf(tmp_path / "hf", source)
    original = tensors_of(hf)
    for back in round_trip(cli, tmp_path, "glm", hf, cast):
        assert_same_tensors(tensors_of(back), {n: original[n] for n in WEIGHTS})


@pytest.mark.parametrize("form", ["folder", "folder/", "file"])
def test_glm_input_path_is_the_hf_folder_not_its_dirname(cli, tmp_path, form):
    """MindFormers loads `dirname(input_path)`: the documented HF folder without a trailing `/` loads its
    parent (§5.3). Any of the three forms reads this folder here."""
    hf = glm_hf(tmp_path / "hf")
    path = {"folder": str(hf), "folder/": f"{hf}/", "file": str(hf / "pytorch_model.bin")}[form]
    out = tmp_path / "g.ckpt"
    assert cli("--model", "glm", "--input_path", path, "--output_path", out).code == 0
    assert names_shapes(out) == expected_ms()


def test_glm_lora_names_and_python_api(tmp_path):
    """The glm reverse maps MindFormers' `tk_delta_lora_a/_b` to PEFT's `lora_A/B.weight` (§2.1 reverse)."""
    import mindspore as ms

    from models.glm.convert_reversed import convert_ms_to_pt
    from models.glm.convert_weight import convert_pt_to_ms

    hf = glm_hf(tmp_path / "hf")
    assert convert_pt_to_ms(hf / "pytorch_model.bin", tmp_path / "g.ckpt", dtype=None)
    params = [{"name": n, "data": p} for n, p in ms.load_checkpoint(str(tmp_path / "g.ckpt")).items()]
    lora = "transformer.layers.0.attention.query_key_value.tk_delta_lora_"
    params += [{"name": f"{lora}a", "data": ms.Tensor(torch.ones(2, H).numpy())},
               {"name": f"{lora}b", "data": ms.Tensor(torch.ones(3 * H, 2).numpy())}]
    ms.save_checkpoint(params, str(tmp_path / "lora.ckpt"))
    assert convert_ms_to_pt(tmp_path / "lora.ckpt", tmp_path / "g.bin")
    names = set(tensors_of(tmp_path / "g.bin"))
    assert names == {*WEIGHTS, "transformer.layers.0.attention.query_key_value.lora_A.weight",
                     "transformer.layers.0.attention.query_key_value.lora_B.weight"}


def test_glm_auto_tells_chatglm_6b_from_glm2_by_the_names(cli, tmp_path):
    """model_type "chatglm" is shared by ChatGLM-6B and GLM2/3/4: the tensor names decide between them."""
    out = tmp_path / "auto.ckpt"
    result = cli("--model", "auto", "--input_path", glm_hf(tmp_path / "hf"), "--output_path", out)
    assert result.code == 0, result.err
    assert "model: glm (detected from config.json model_type 'chatglm' and the tensor names)" in result.out
