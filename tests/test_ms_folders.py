"""Output layouts MindFormers loads for big models (spec mindformers_other.md §3.4, §1.5).

- A unified safetensors folder (MindFormers 1.5–1.7 `auto_trans_ckpt` input): complete `{"format": "ms"}`
  files and `param_name_map.json`, flat or `{"metadata", "weight_map"}`; `hyper_param.safetensors` is no
  part of the model. MindSpore's own `load_distributed_checkpoint` reads ours; we read MindSpore's.
- A checkpoint 2.0 folder (MindFormers 2.x, `--target checkpoint2`): `latest_checkpointed_iteration.txt`
  (last), `iteration_{iter:08d}/model-{rank:07d}-{world:07d}.safetensors`, `common.json`, `metadata.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from conftest import CliResult, assert_same_tensors, tensors_of
from mindformers_conv import outfile
from mindformers_conv.cli import main
from mindformers_conv.errors import BadInput
from mindformers_conv.formats.inputs import open_input
from test_ckpt_format import assert_same, ms, ms_tensors

SHARD = "100KB"  # the tiny llama in fp32 is ~465 KiB: several files


def _reverse(cli, source: Path, out: Path) -> Path:
    """MindSpore → HF folder (config.json is beside the MindSpore input, carried there by the forward)."""
    result = cli("--model", "llama", "--reversed", "--input_path", source, "--output_path", f"{out}/")
    assert result.code == 0, result.err
    return out


def _ms_params(folder: Path) -> dict:
    """name → MindSpore Parameter, every model file of a folder loaded by MindSpore."""
    params = {}
    for file in sorted(folder.glob("*.safetensors")):
        params.update(ms.load_checkpoint(str(file), format="safetensors"))
    return params


# ---- unified safetensors folder -------------------------------------------------------------------------


@pytest.fixture
def unified(cli, tiny_llama, tmp_path) -> tuple[Path, Path]:
    hf = tiny_llama()
    out = tmp_path / "unified"
    result = cli("--model", "llama", "--input_path", hf, "--output_path", f"{out}/", "--max_shard_size", SHARD)
    assert result.code == 0, result.err
    return hf, out


def test_unified_folder_round_trip_is_byte_identical(cli, unified, tmp_path):
    hf, out = unified
    name_map = json.loads((out / "param_name_map.json").read_text())
    assert len(set(name_map.values())) > 1 and all(isinstance(v, str) for v in name_map.values())  # flat form
    assert_same_tensors(tensors_of(hf), tensors_of(_reverse(cli, out, tmp_path / "back")))


def test_mindspore_load_distributed_checkpoint_reads_our_unified_folder(unified, tmp_path):
    """MindFormers 1.5–1.7 load a unified folder through MindSpore's load_distributed_checkpoint."""
    _, out = unified
    ms.load_distributed_checkpoint(None, format="safetensors", unified_safetensors_dir=str(out),
                                   dst_safetensors_dir=str(tmp_path / "dst"), rank_id=0)
    assert_same(ms_tensors(tmp_path / "dst" / "rank_0" / "net.safetensors", "safetensors"), tensors_of(out))


@pytest.fixture
def mindspore_unified(unified, tmp_path) -> tuple[Path, Path]:
    """The unified folder as MindSpore's unifier writes it: part{K}.safetensors by mindspore.save_checkpoint,
    param_name_map.json under `weight_map` with `metadata.total_size`, hyper_param.safetensors."""
    hf, ours = unified
    params = _ms_params(ours)
    names = sorted(params)
    folder = tmp_path / "ms_unified"
    folder.mkdir()
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    for k, part in enumerate(parts):
        ms.save_checkpoint([{"name": n, "data": params[n]} for n in part], str(folder / f"part{k}.safetensors"),
                           format="safetensors")
    ms.save_checkpoint([{"name": "global_step", "data": ms.Tensor([1000], ms.int32)},
                        {"name": "scale_sense", "data": ms.Tensor([65536.0], ms.float32)}],
                       str(folder / "hyper_param.safetensors"), format="safetensors")
    weight_map = {n: f"part{k}.safetensors" for k, part in enumerate(parts) for n in part}
    total = sum(len(p.get_bytes()) for p in params.values())
    (folder / "param_name_map.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                            "weight_map": weight_map}, indent=4))
    (folder / "config.json").write_bytes((hf / "config.json").read_bytes())
    return hf, folder


def test_mindspore_written_unified_folder_reads_as_mindspore_loads_it(mindspore_unified):
    _, folder = mindspore_unified
    with safe_open(str(folder / "part0.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "ms"
    expected = {}
    for k in (0, 1):
        expected.update(ms_tensors(folder / f"part{k}.safetensors", "safetensors"))
    assert_same(expected, tensors_of(folder))  # hyper_param's global_step / scale_sense are left out


def test_mindspore_written_unified_folder_converts_back_to_the_hf_input(cli, mindspore_unified, tmp_path):
    hf, folder = mindspore_unified
    assert_same_tensors(tensors_of(hf), tensors_of(_reverse(cli, folder, tmp_path / "back")))


def test_unified_folder_without_a_map_reads_every_part_but_hyper_param(cli, mindspore_unified, tmp_path):
    hf, folder = mindspore_unified
    (folder / "param_name_map.json").unlink()
    assert "global_step" not in tensors_of(folder)
    assert_same_tensors(tensors_of(hf), tensors_of(_reverse(cli, folder, tmp_path / "back")))


# ---- checkpoint 2.0 --------------------------------------------------------------------------------------


def _write_checkpoint2(cli, hf: Path, out: Path, *flags: str):
    return cli("--model", "llama", "--input_path", hf, "--output_path", out, "--target", "checkpoint2",
               "--max_shard_size", SHARD, *flags)


@pytest.fixture
def checkpoint2(cli, tiny_llama, tmp_path) -> tuple[Path, Path]:
    hf = tiny_llama()
    out = tmp_path / "ckpt2"
    result = _write_checkpoint2(cli, hf, out, "--verify")
    assert result.code == 0, result.err
    assert "verified: 21 tensors" in result.out
    return hf, out


def test_checkpoint2_folder_layout(checkpoint2):
    _, root = checkpoint2
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "0"
    folder = root / "iteration_00000000"
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    world = len(files)
    assert world > 2
    assert files == [f"model-{k:07d}-{world:07d}.safetensors" for k in range(world)]
    assert json.loads((folder / "common.json").read_text()) == {
        "epoch_num": 0, "step_num": 0, "global_step": 0, "loss_scale": 1.0, "global_batch_size": None,
        "consumed_samples": None, "ckpt_status": None}
    raw = (folder / "metadata.json").read_bytes()
    assert raw == json.dumps(json.loads(raw), separators=(",", ":")).encode()  # compact
    for name in files:  # every rank file is a MindSpore safetensors file MindSpore loads
        with safe_open(str(folder / name), "pt") as f:
            assert f.metadata() == {"format": "ms"}
        assert ms.load_checkpoint(str(folder / name), format="safetensors")


def _headers(folder: Path) -> dict[str, tuple[str, str, list[int]]]:
    """name → (file, dtype code, shape) from the safetensors headers (the safetensors library's reader)."""
    found = {}
    for file in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                assert name not in found, name
                piece = f.get_slice(name)
                found[name] = (file.name, piece.get_dtype(), list(piece.get_shape()))
    return found


def test_checkpoint2_metadata_matches_the_files(checkpoint2):
    """Every parameter once, at slice 0 of an unsplit grid, stored by the rank of the file that holds it."""
    from mindspore.parallel import Layout

    _, root = checkpoint2
    folder = root / "iteration_00000000"
    headers = _headers(folder)
    meta = json.loads((folder / "metadata.json").read_text())
    params, storage = meta["state_dict_metadata"], meta["storage_data"]
    assert params.keys() == headers.keys()
    assert "model.layers.0.attention.wq.weight" in params and "lm_head.weight" in params
    assert len(storage) == len(params)
    for name, p in params.items():
        file, code, shape = headers[name]
        rank = int(file.split("-")[1])
        assert p["properties"] == {"dtype": {"F32": "Float32", "BF16": "BFloat16"}[code], "replica_id": 0,
                                   "allow_shape_mismatch": False, "allow_to_save": True}
        assert p["global_shape"] == shape and p["axis_fragmentations"] == [1] * len(shape)
        assert p["chunk"] == [{"global_offset": [0], "local_shape": shape}]
        assert storage[f"('{name}', (0,))"] == [{"file_name": file, "storage_rank": rank, "rank_group": [rank]}]
        assert (folder / file).is_file()
        # the layout is a MindSpore Layout, rebuilt as MindFormers' metadata loader does
        layout = p["layout"]
        alias = {len(layout["alias_name"]) - 1 - i: a for i, a in enumerate(layout["alias_name"])}
        dims = ["None" if d == -1 else alias[d] for d in layout["tensor_map"]]
        rebuilt = Layout(tuple(layout["device_matrix"]), tuple(layout["alias_name"]),
                                     layout["rank_list"])(*dims).to_dict()
        assert json.loads(json.dumps(rebuilt)) == layout


def test_checkpoint2_converts_back_to_the_hf_input_byte_identical(cli, checkpoint2, tmp_path):
    hf, root = checkpoint2
    assert_same_tensors(tensors_of(hf), tensors_of(_reverse(cli, root, tmp_path / "back")))
    # the iteration folder itself, or one of its files, names the same checkpoint
    folder = root / "iteration_00000000"
    assert_same_tensors(tensors_of(root), tensors_of(folder))
    assert_same_tensors(tensors_of(root), tensors_of(next(folder.glob("model-*.safetensors"))))


def test_checkpoint2_without_metadata_reads_the_headers(cli, checkpoint2, tmp_path):
    """MindFormers builds the metadata from the safetensors headers when metadata.json is missing."""
    hf, root = checkpoint2
    (root / "iteration_00000000" / "metadata.json").unlink()
    assert_same_tensors(tensors_of(hf), tensors_of(_reverse(cli, root, tmp_path / "back")))


def test_checkpoint2_iteration_flag(cli, tiny_llama, tmp_path):
    root = tmp_path / "ckpt2"
    assert _write_checkpoint2(cli, tiny_llama(), root, "--iteration", "1200").code == 0
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "1200"
    common = json.loads((root / "iteration_00001200" / "common.json").read_text())
    assert (common["step_num"], common["global_step"]) == (1200, 1200)


def test_checkpoint2_inspect_shows_format_and_iteration(capsys, checkpoint2):
    _, root = checkpoint2
    result = _inspect(capsys, root)
    assert result.code == 0, result.err
    assert "21 tensors" in result.out and "format checkpoint2" in result.out and "model llama" in result.out
    assert "layout: iteration 0" in result.out


def test_checkpoint2_tracker_is_written_last(cli, tiny_llama, tmp_path, monkeypatch):
    committed = []
    real = outfile.OutputFile.commit
    monkeypatch.setattr(outfile.OutputFile, "commit", lambda self: (committed.append(self.final.name), real(self)))
    assert _write_checkpoint2(cli, tiny_llama(), tmp_path / "ckpt2").code == 0
    assert committed[-1] == "latest_checkpointed_iteration.txt"
    assert committed.index("metadata.json") > max(i for i, n in enumerate(committed) if n.startswith("model-"))


def test_checkpoint2_crash_before_the_tracker_leaves_no_loadable_checkpoint(cli, tiny_llama, tmp_path, monkeypatch):
    real = outfile.OutputFile.commit

    def commit(self):
        if self.final.name == "latest_checkpointed_iteration.txt":
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(outfile.OutputFile, "commit", commit)
    root = tmp_path / "ckpt2"
    assert _write_checkpoint2(cli, tiny_llama(), root).code == 130
    assert not (root / "latest_checkpointed_iteration.txt").exists()
    assert not [p for p in root.rglob("*") if p.name.endswith(outfile.TMP_SUFFIX)]
    with pytest.raises(BadInput):
        open_input(root)


def _inspect(capsys, path: Path) -> CliResult:
    code = main(["inspect", str(path)])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def _one_line_error(result) -> str:
    assert result.code == 3, result.out + result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    return lines[0]


def test_checkpoint2_tracker_naming_a_missing_iteration(cli, checkpoint2, tmp_path):
    _, root = checkpoint2
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    error = _one_line_error(cli("--model", "llama", "--reversed", "--input_path", root,
                                "--output_path", f"{tmp_path / 'back'}/"))
    assert error.endswith("latest_checkpointed_iteration.txt names iteration 5, but iteration_00000005 does not exist")
    assert not (tmp_path / "back").exists()


def test_checkpoint2_corrupt_metadata(capsys, checkpoint2):
    _, root = checkpoint2
    path = root / "iteration_00000000" / "metadata.json"
    path.write_bytes(path.read_bytes()[:200])
    error = _one_line_error(_inspect(capsys, root))
    assert "metadata.json: not a checkpoint 2.0 metadata file (JSONDecodeError" in error


@pytest.mark.parametrize("damage, message", [
    (lambda p: p["storage_data"].popitem(), "has no storage_data entry"),
    (lambda p: next(iter(p["storage_data"].values()))[0].update(file_name="model-0000099-0000099.safetensors"),
     "shard model-0000099-0000099.safetensors does not exist"),
    (lambda p: next(iter(p["storage_data"].values()))[0].update(file_name="../x.safetensors"),
     "is outside the checkpoint folder"),
    (lambda p: next(iter(p["state_dict_metadata"].values()))["properties"].update(dtype="Float16"),
     "metadata.json says F16"),
    (lambda p: next(iter(p["state_dict_metadata"].values())).pop("chunk"), "has malformed metadata (KeyError"),
])
def test_checkpoint2_metadata_disagreeing_with_the_files(capsys, checkpoint2, damage, message):
    _, root = checkpoint2
    path = root / "iteration_00000000" / "metadata.json"
    meta = json.loads(path.read_text())
    damage(meta)
    path.write_text(json.dumps(meta))
    assert message in _one_line_error(_inspect(capsys, root))


def test_checkpoint2_refuses_flags_that_do_not_apply(cli, checkpoint2, tmp_path):
    hf, root = checkpoint2
    result = _write_checkpoint2(cli, hf, tmp_path / "a", "--tp", "2")
    assert result.code == 2 and "--tp does not apply" in result.err
    result = _write_checkpoint2(cli, root, tmp_path / "b", "--reversed")
    assert result.code == 2 and "leave out --reversed" in result.err


def test_checkpoint2_refuses_files_of_another_checkpoint(cli, checkpoint2, tmp_path):
    hf, root = checkpoint2
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    result = cli("--model", "llama", "--input_path", hf, "--output_path", root, "--target", "checkpoint2")
    assert result.code == 2 and "of another checkpoint; write to an empty folder" in result.err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


# ---- checkpoint 2.0 as MindFormers saves it with tensor parallelism: chunks put back together --------------


def _split(param, axis: int) -> list:
    assert param.dtype == ms.float32  # numpy holds fp32 exactly
    return [ms.Tensor(np.ascontiguousarray(a)) for a in np.split(param.asnumpy(), 2, axis=axis)]


def _tp2_checkpoint(checkpoint2: Path, target: Path) -> Path:
    """The fp32 checkpoint re-saved by mindspore.save_checkpoint as two TP ranks: q rows and o columns
    split in two (slices (0,) and (1,) of fragmentations [2, 1] and [1, 2]), everything else on both."""
    params = _ms_params(checkpoint2 / "iteration_00000000")
    split = {"model.layers.0.attention.wq.weight": 0, "model.layers.0.attention.wo.weight": 1}
    folder = target / "iteration_00000100"
    folder.mkdir(parents=True)
    meta, storage = {}, {}
    for rank in (0, 1):
        file = f"model-{rank:07d}-0000002.safetensors"
        tensors = [{"name": n, "data": _split(params[n], split[n])[rank] if n in split else params[n]}
                   for n in sorted(params)]
        ms.save_checkpoint(tensors, str(folder / file), format="safetensors")
        for n in sorted(params):
            shape = list(params[n].shape)
            grid = [1] * len(shape)
            if n in split:
                grid[split[n]] = 2
            local = [s // g for s, g in zip(shape, grid)]
            slice_id = rank if n in split else 0
            entry = meta.setdefault(n, {"properties": {"dtype": str(params[n].dtype), "replica_id": 0,
                                                      "allow_shape_mismatch": False, "allow_to_save": True},
                                        "global_shape": shape, "axis_fragmentations": grid, "layout": {},
                                        "chunk": []})
            if {"global_offset": [slice_id], "local_shape": local} not in entry["chunk"]:
                entry["chunk"].append({"global_offset": [slice_id], "local_shape": local})
            storage.setdefault(str((n, (slice_id,))), []).append(
                {"file_name": file, "storage_rank": rank, "rank_group": [rank] if n in split else [0, 1]})
    (folder / "metadata.json").write_text(json.dumps({"state_dict_metadata": meta, "storage_data": storage}))
    (target / "latest_checkpointed_iteration.txt").write_text("100")
    return target


def test_checkpoint2_tensor_parallel_chunks_are_put_back_together(cli, checkpoint2, tmp_path):
    hf, root = checkpoint2
    tp2 = _tp2_checkpoint(root, tmp_path / "tp2")
    assert_same_tensors(tensors_of(root), tensors_of(tp2))
    wq = open_input(tp2).refs["model.layers.0.attention.wq.weight"]
    assert len(wq.ranges) == 2  # row halves stay byte ranges of the two files (nothing read to plan)
    (tp2 / "config.json").write_bytes((hf / "config.json").read_bytes())
    assert_same_tensors(tensors_of(hf), tensors_of(_reverse(cli, tp2, tmp_path / "back")))


def test_checkpoint2_missing_chunk_is_refused(capsys, checkpoint2, tmp_path):
    _, root = checkpoint2
    tp2 = _tp2_checkpoint(root, tmp_path / "tp2")
    path = tp2 / "iteration_00000100" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["state_dict_metadata"]["model.layers.0.attention.wo.weight"]["chunk"].pop()
    path.write_text(json.dumps(meta))
    error = _one_line_error(_inspect(capsys, tp2))
    assert "'model.layers.0.attention.wo.weight': 1 of its 2 chunks are listed" in error


def test_checkpoint2_optimizer_files_are_left_out(checkpoint2):
    """`opt-*` files hold optimizer state (MindFormers saves it beside the model): not network weights."""
    _, root = checkpoint2
    folder = root / "iteration_00000000"
    before = tensors_of(root)
    name, file = "adam_m.model.norm_out.weight", "opt-0000000-0000001.safetensors"
    ms.save_checkpoint([{"name": name, "data": ms.Tensor(np.zeros(64, np.float32))}], str(folder / file),
                       format="safetensors")
    meta = json.loads((folder / "metadata.json").read_text())
    meta["state_dict_metadata"][name] = {**meta["state_dict_metadata"]["model.norm_out.weight"]}
    meta["storage_data"][str((name, (0,)))] = [{"file_name": file, "storage_rank": 0, "rank_group": [0]}]
    (folder / "metadata.json").write_text(json.dumps(meta))
    assert_same_tensors(before, tensors_of(root))
    (folder / "metadata.json").unlink()
    assert_same_tensors(before, tensors_of(root))
