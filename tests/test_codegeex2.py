"""codegeex2 (CodeGeeX2-6B, ChatGLM2 architecture): spec §2.3 — glm-n's names, with the embedding named
as the ChatGLM2 model loads it (§5.4)."""

import pytest
import torch

from conftest import assert_same_tensors, tensors_of, write_hf
from test_gpt import assert_loads_in_mindspore, names_shapes, round_trip
from test_glm2 import expected_ms, glm2_config, glm2_state, read, weights_of

CONFIG = glm2_config(torch_dtype="float16", _name_or_path="THUDM/codegeex2-6b")


@pytest.fixture
def hf(tmp_path):
    return write_hf(tmp_path / "hf", glm2_state(torch.float16), CONFIG, fmt="bin")


def test_codegeex2_embedding_is_named_so_the_chatglm2_model_loads_it(cli, hf, tmp_path):
    """MindFormers writes `transformer.embedding.embedding_table`; ChatGLM2ForConditionalGeneration's
    parameter is `transformer.embedding.embedding_weight`, so its embedding stayed at random init (§5.4)."""
    out = tmp_path / "c.ckpt"
    result = cli("--model", "codegeex2", "--input_path", hf, "--output_path", out)
    assert result.code == 0, result.err
    assert names_shapes(out) == expected_ms("F32")  # every other name as glm-n's, float32 (§7)
    assert torch.equal(read(out)["transformer.embedding.embedding_weight"],
                       glm2_state(torch.float16)["transformer.embedding.word_embeddings.weight"].float())


def test_codegeex2_reverse_reads_mindformers_embedding_table_too(cli, hf, tmp_path):
    import mindspore as ms

    out = tmp_path / "c.ckpt"
    assert cli("--model", "codegeex2", "--input_path", hf, "--output_path", out).code == 0
    assert_loads_in_mindspore(out, expected_ms(), "float32")
    params = ms.load_checkpoint(str(out))
    stale = [{"name": n.replace("embedding_weight", "embedding_table"), "data": p} for n, p in params.items()]
    ms.save_checkpoint(stale, str(tmp_path / "mindformers.ckpt"))
    for source in (out, tmp_path / "mindformers.ckpt"):
        back = tmp_path / f"{source.stem}.bin"
        assert cli("--model", "codegeex2", "--reversed", "--input_path", source, "--output_path", back,
                   "--dtype", "fp16").code == 0
        assert_same_tensors(tensors_of(back), weights_of(hf))


@pytest.mark.parametrize("cast", [None, "fp16"])
def test_codegeex2_round_trip_gives_back_the_hf_bytes(cli, hf, tmp_path, cast):
    targets = ("folder",) if cast is None else ("folder", "bin")  # without --dtype a .bin stays float32
    for back in round_trip(cli, tmp_path, "codegeex2", hf, cast, targets):
        assert_same_tensors(tensors_of(back), weights_of(hf))


def test_codegeex2_python_api(hf, tmp_path):
    from models.codegeex2.convert_reversed import convert_ms_to_pt
    from models.codegeex2.convert_weight import convert_pt_to_ms

    assert convert_pt_to_ms(hf / "pytorch_model.bin", tmp_path / "c.ckpt", dtype="fp16")
    assert {d for d, _ in names_shapes(tmp_path / "c.ckpt").values()} == {"F16"}
    assert convert_ms_to_pt(tmp_path / "c.ckpt", tmp_path / "c.bin")
    assert_same_tensors(tensors_of(tmp_path / "c.bin"), weights_of(hf))
