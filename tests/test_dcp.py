"""`--target dcp` and DCP folders as input (spec §1.2): the layout on disk, torch's own DCP loader
reading what we write (equal to the Megatron tensors), our reader on what torch's FileSystemWriter
writes, round trips HF → DCP → HF and through Megatron, inspect, and the allow-listed unpickling."""

import io
import json
import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import assert_same_tensors, tensors_of
from megatron_helpers import rank_files
from test_megatron_qwen2_5_vl import write_qwen2_5_vl
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

from mindformers_conv.cli import main
from mindformers_conv.formats import dcp as fmt
from mindformers_conv.synthetic import LlamaShape, write_llama

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
SHAPE = LlamaShape(vocab_size=255, hidden_size=32, intermediate_size=96, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return {tied: write_llama(root / f"tied{tied}", LlamaShape(**{**SHAPE.__dict__, "tie_word_embeddings": tied}))
            for tied in (False, True)}


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory):
    return write_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl") / "hf")


def ok(r):
    assert r.code == 0, r.err
    return r


def torch_load(folder):
    """What torch's DCP loader reads from a folder (no process group), as MindSpeed-MM loads it."""
    state = {}
    _load_state_dict(state, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return state


def megatron_state(cli, model, hf, out):
    """The full Megatron tensors (TP 1, PP 1 rank file) of the same model: what DCP must hold."""
    ok(cli("--model", model, "--input_path", hf, "--output_path", out, "--target", "megatron"))
    return rank_files(out)["release/mp_rank_00"]["model"]


def same_state(a: dict, b: dict):
    assert list(a) == list(b)
    for name, t in a.items():
        assert t.dtype == b[name].dtype and t.shape == b[name].shape, name
        assert t.view(torch.uint8).equal(b[name].view(torch.uint8)), name


@pytest.mark.parametrize("model", ["qwen2_5_vl", "llama"])
def test_dcp_layout_loads_with_torch_and_equals_the_megatron_tensors(cli, llamas, qwen2_5_vl, tmp_path, model):
    hf = qwen2_5_vl if model == "qwen2_5_vl" else llamas[False]
    ok(cli("--model", model, "--input_path", hf, "--output_path", tmp_path / "dcp", "--target", "dcp"))
    assert (tmp_path / "dcp/latest_checkpointed_iteration.txt").read_bytes() == b"release"
    assert sorted(os.listdir(tmp_path / "dcp/release")) == [".metadata", "__0_0.distcp"]
    state = torch_load(tmp_path / "dcp/release")
    assert state.keys() == {"model", "checkpoint_version"} and state["checkpoint_version"] == 3.0
    same_state(state["model"], megatron_state(cli, model, hf, tmp_path / "mg"))
    md = FileSystemReader(tmp_path / "dcp/release").read_metadata()
    assert set(md.state_dict_metadata) == {"checkpoint_version", *(f"model.{n}" for n in state["model"])}
    # The public API too, into a state dict of the right shapes (as a trainer resumes).
    target = {"model": {n: torch.zeros_like(t) for n, t in state["model"].items()}}
    dcp.load(target, checkpoint_id=tmp_path / "dcp/release", no_dist=True)
    same_state(target["model"], state["model"])


@pytest.mark.parametrize("tied", [False, True])
def test_llama_hf_to_dcp_to_hf_is_byte_identical(cli, llamas, tmp_path, tied):
    hf = llamas[tied]
    ok(cli("--model", "llama", "--input_path", hf, "--output_path", tmp_path / "dcp", "--target", "dcp", "--verify"))
    names = torch_load(tmp_path / "dcp/release")["model"]
    assert ("output_layer.weight" in names) is not tied  # tied: one stage shares the embedding (Megatron)
    ok(cli("--model", "llama", "--reversed", "--input_path", tmp_path / "dcp", "--output_path", f"{tmp_path}/back/",
           "--config_path", hf))
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))


def test_qwen2_5_vl_hf_to_dcp_to_hf_and_transformers_loads_it(cli, qwen2_5_vl, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = qwen2_5_vl
    r = ok(cli("--model", "qwen2_5_vl", "--input_path", hf, "--output_path", tmp_path / "dcp", "--target", "dcp"))
    assert "HF → DCP" in r.out
    r = ok(cli("--model", "qwen2_5_vl", "--reversed", "--input_path", tmp_path / "dcp/release",  # the folder itself
               "--output_path", f"{tmp_path}/back/", "--config_path", hf))
    assert "DCP → HF" in r.out
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))
    a = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf).state_dict()
    b = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_a_dcp_that_torch_wrote_is_read(cli, llamas, tmp_path):
    """torch's FileSystemWriter output (its own torch.save archives, a padded vocab) → HF, byte-identical."""
    hf = llamas[False]
    state = megatron_state(cli, "llama", hf, tmp_path / "mg")
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):  # padded to 256 rows by a trainer
        state[name] = torch.cat([state[name], torch.zeros(1, state[name].shape[1], dtype=state[name].dtype)])
    _save_state_dict({"model": state, "checkpoint_version": 3.0}, FileSystemWriter(tmp_path / "dcp/release"),
                     no_dist=True)
    (tmp_path / "dcp/latest_checkpointed_iteration.txt").write_text("release")
    ok(cli("--model", "llama", "--reversed", "--input_path", tmp_path / "dcp", "--output_path", f"{tmp_path}/back/",
           "--config_path", hf))
    assert_same_tensors(tensors_of(hf), tensors_of(tmp_path / "back"))


def test_dcp_to_megatron_and_back_to_dcp(cli, qwen2_5_vl, tmp_path):
    hf = qwen2_5_vl
    ok(cli("--model", "qwen2_5_vl", "--input_path", hf, "--output_path", tmp_path / "dcp", "--target", "dcp"))
    r = ok(cli("--model", "qwen2_5_vl", "--input_path", tmp_path / "dcp", "--output_path", tmp_path / "mg",
               "--target", "megatron", "--tp", "2", "--vit_pp_layers", "4,0", "--llm_pp_layers", "1,3",
               "--config_path", hf))
    assert "DCP → Megatron" in r.out
    assert len(rank_files(tmp_path / "mg")) == 4
    ok(cli("--model", "qwen2_5_vl", "--input_path", tmp_path / "mg", "--output_path", tmp_path / "dcp2",
           "--target", "dcp", "--config_path", hf, "--iteration", "7"))
    assert (tmp_path / "dcp2/latest_checkpointed_iteration.txt").read_text() == "7"
    same_state(torch_load(tmp_path / "dcp2/iter_0000007")["model"], torch_load(tmp_path / "dcp/release")["model"])


def test_dcp_writer_streams_aligned_archives(cli, llamas, tmp_path):
    ok(cli("--model", "llama", "--input_path", llamas[False], "--output_path", tmp_path / "dcp", "--target", "dcp"))
    md = FileSystemReader(tmp_path / "dcp/release").read_metadata()
    infos = sorted(md.storage_data.values(), key=lambda i: i.offset)
    assert infos[0].offset == 0 and {i.relative_path for i in infos} == {"__0_0.distcp"}
    assert all(i.offset % 64 == 0 for i in infos)
    assert all(a.offset + a.length <= b.offset for a, b in zip(infos, infos[1:]))
    _, refs, _ = fmt.read_dcp(tmp_path / "dcp")
    assert all(r.ranges and r.ranges[0][1] % 64 == 0 for r in refs.values())  # zero-copy byte ranges


def inspect(capsys, path, *flags):
    code = main(["inspect", str(path), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_a_dcp_folder(cli, llamas, tmp_path, capsys):
    ok(cli("--model", "llama", "--input_path", llamas[False], "--output_path", tmp_path / "dcp", "--target", "dcp"))
    shutil.copy(llamas[False] / "config.json", tmp_path / "dcp")
    code, out, _ = inspect(capsys, tmp_path / "dcp", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["format"] == "dcp" and info["family"]["key"] == "llama"
    assert "model.embedding.word_embeddings.weight" in {t["name"] for t in info["tensors"]}
    assert info["total_tensors"] == 4 * 6 + 3  # per layer: qkv, proj, fc1, fc2, two norms


class Boom:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_a_metadata_pickle_outside_the_allow_list_is_refused(cli, llamas, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ok(cli("--model", "llama", "--input_path", llamas[False], "--output_path", tmp_path / "dcp", "--target", "dcp"))
    md = tmp_path / "dcp/release/.metadata"
    good = md.read_bytes()
    md.write_bytes(pickle.dumps(Boom()))
    r = cli("--model", "llama", "--reversed", "--input_path", tmp_path / "dcp", "--output_path", f"{tmp_path}/back/",
            "--config_path", llamas[False])
    assert r.code == 3 and "refused" in r.err and "posix.system" in r.err, r.err
    assert not (tmp_path / "pwned").exists()
    md.write_bytes(good[: len(good) // 2])
    code, _, err = inspect(capsys, tmp_path / "dcp")
    assert code == 3 and "corrupt DCP metadata" in err, err


def test_a_tensor_archive_outside_the_allow_list_is_refused(cli, llamas, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ok(cli("--model", "llama", "--input_path", llamas[False], "--output_path", tmp_path / "dcp", "--target", "dcp"))
    folder = tmp_path / "dcp/release"
    md = FileSystemReader(folder).read_metadata()
    buf = io.BytesIO()
    torch.save(Boom(), buf)  # a full archive standing where a tensor's archive was
    data = bytearray((folder / "__0_0.distcp").read_bytes())
    (index, info), = [(i, s) for i, s in md.storage_data.items() if i.fqn == "model.decoder.final_layernorm.weight"]
    info.offset, info.length = len(data), len(buf.getvalue())
    (folder / "__0_0.distcp").write_bytes(bytes(data) + buf.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    code, _, err = inspect(capsys, tmp_path / "dcp")
    assert code == 3 and "refused" in err and "system" in err, err
    assert not (tmp_path / "pwned").exists()


def test_dry_run_writes_nothing_and_a_non_megatron_model_is_refused(cli, llamas, tmp_path):
    r = ok(cli("--model", "llama", "--input_path", llamas[False], "--output_path", tmp_path / "dcp", "--target", "dcp",
               "--dry-run"))
    assert "HF → DCP" in r.out and "into 1 file" in r.out and not (tmp_path / "dcp").exists()
    r = cli("--model", "glm", "--input_path", llamas[False], "--output_path", tmp_path / "dcp", "--target", "dcp")
    assert r.code == 2 and "no Megatron layout" in r.err, r.err


def test_layout_flags_do_not_apply_to_dcp(cli, llamas, tmp_path):
    r = cli("--model", "llama", "--input_path", llamas[False], "--output_path", tmp_path / "dcp", "--target", "dcp",
            "--tp", "2")
    assert r.code == 2 and "--tp does not apply" in r.err, r.err
    assert not (tmp_path / "dcp").exists()
