"""Distributed MindFormers 1.x checkpoints (`rank_{r}/…-{epoch}_{step}.ckpt` + `strategy/`) merged into one model.

Spec: mindformers_other.md §3.4 "Legacy MindFormers 1.x". The rank files are written by MindSpore's own
`save_checkpoint` (or sliced by MindSpore's own `transform_checkpoints`), the strategy files with MindSpore's
own `node_strategy_pb2` (or merged by `merge_pipeline_strategys`). Slices are cut in the test by the spec's
rule: ranks count row-major through dev_matrix, tensor_map value m names dev_matrix axis len-1-m, optimizer
sharding cuts axis 0 of a slice again over the free device axes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import GQA, assert_same_tensors, tensors_of
from mindformers_conv.synthetic import write_llama
from mindformers_conv.tensor_ref import raw_bytes

ms = pytest.importorskip("mindspore")
from mindspore.train import node_strategy_pb2 as pb  # noqa: E402

ROWS, COLS, WHOLE = [0, -1], [-1, 0], [-1]  # dev_matrix [dp=2, mp=2]: value 0 is mp, value 1 is dp
EMBED, HEAD = "model.tok_embeddings.embedding_weight", "lm_head.weight"


def tensor_maps(layer: int) -> dict[str, list[int]]:
    p = f"model.layers.{layer}."
    return {p + "attention.wq.weight": ROWS, p + "attention.wk.weight": ROWS, p + "attention.wv.weight": ROWS,
            p + "attention.wo.weight": COLS, p + "feed_forward.w1.weight": ROWS, p + "feed_forward.w3.weight": ROWS,
            p + "feed_forward.w2.weight": COLS, p + "attention_norm.weight": WHOLE, p + "ffn_norm.weight": WHOLE}


# Pipeline stage → {name: tensor_map}; the embedding is also optimizer-sharded over dp (size 2, step 2),
# the head is cut on both axes (rows over dp, columns over mp).
STAGES = [{EMBED: ROWS, **tensor_maps(0)}, {**tensor_maps(1), "model.norm_out.weight": WHOLE, HEAD: [1, 0]}]
OPT_SHARDED = {EMBED}


def rank_slice(name: str, full: torch.Tensor, rank: int) -> torch.Tensor:
    """The spec's placement, written out: local rank = dp * 2 + mp."""
    dp, mp = rank % 4 // 2, rank % 2
    if name == HEAD:
        return full.chunk(2, 0)[dp].chunk(2, 1)[mp]
    tmap = next(s[name] for s in STAGES if name in s)
    piece = full if tmap == WHOLE else full.chunk(2, 0 if tmap == ROWS else 1)[mp]
    return piece.chunk(2, 0)[dp] if name in OPT_SHARDED else piece


def write_strategy(path: Path, stage: int, maps: dict[str, list[int]], dev=(2, 2), prefix: bool = False) -> Path:
    """A `ParallelStrategyMap` through MindSpore's own protobuf classes."""
    msg = pb.ParallelStrategyMap(current_stage=1)
    item = msg.parallel_strategy_item.add(node_name="Default/MatMul-op0")
    item.parallel_strategys.stage = stage
    item.parallel_strategys.parallel_strategy.add().dim.extend([2, 1])
    for name, tmap in maps.items():
        layout = msg.parallel_layout_item.add(param_name=f"{stage}-{name}" if prefix else name).parallel_layouts
        layout.dev_matrix.add().dim.extend(dev)
        layout.tensor_map.add().dim.extend(tmap)
        layout.param_split_shape.add()
        layout.indices_offset.add()
        layout.field = 0
        sharded = name in OPT_SHARDED
        layout.opt_weight_shard_step, layout.opt_weight_shard_size = (2, 2) if sharded else (0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msg.SerializeToString())
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny bf16 llama: its HF folder, its full MindSpore .ckpt (ours, checked by MindSpore) and its tensors."""
    from mindformers_conv.cli import main

    root = tmp_path_factory.mktemp("dist")
    hf = write_llama(root / "hf", GQA, dtype="BF16", seed=3)
    full = root / "full.ckpt"
    assert main(["--model", "llama", "--input_path", str(hf), "--output_path", str(full), "--dtype", "bf16",
                 "--no-progress"]) == 0
    params = ms.load_checkpoint(str(full))
    state = {n: torch.from_numpy(p.float().asnumpy()).to(torch.bfloat16) for n, p in params.items()}
    return hf, full, state


def ms_tensor(t: torch.Tensor):
    return ms.Tensor(t.float().numpy(), ms.bfloat16)


def save_ranks(folder: Path, ranks: dict[int, dict[str, torch.Tensor]], fmt: str = "ckpt", **kwargs) -> None:
    """Each rank's slices with MindSpore's own save_checkpoint, named as MindFormers' CheckpointMonitor names them."""
    for rank, tensors in ranks.items():
        (folder / f"rank_{rank}").mkdir(parents=True)
        data = [{"name": n, "data": ms_tensor(t)} for n, t in tensors.items()]
        ms.save_checkpoint(data, str(folder / f"rank_{rank}" / f"llama_rank_{rank}-2_5.{fmt}"), format=fmt, **kwargs)


@pytest.fixture
def pipeline(model, tmp_path):
    """8 ranks: 2 pipeline stages × dev_matrix [2, 2], with optimizer moments and loop state, + strategy/."""
    _, _, state = model
    ckpt = tmp_path / "output" / "checkpoint"
    ranks = {}
    for rank in range(8):
        names = STAGES[rank // 4]
        ranks[rank] = {n: rank_slice(n, state[n], rank) for n in names}
        wq = "model.layers.0.attention.wq.weight"
        if wq in names:
            ranks[rank]["adam_m." + wq] = rank_slice(wq, state[wq] * 0.5, rank)
        ranks[rank]["global_step"] = torch.tensor([7.0])
    save_ranks(ckpt, ranks)
    for rank in range(8):
        write_strategy(tmp_path / "output" / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt", rank // 4,
                       STAGES[rank // 4])
    return ckpt


def converted(cli, *argv) -> str:
    result = cli(*argv)
    assert result.code == 0, result.err
    return result.out


def test_pipeline_tensor_and_optimizer_parallel_merge_back_to_the_hf_original(cli, model, pipeline, tmp_path):
    hf, _, _ = model
    out = converted(cli, "--model", "llama", "--reversed", "--input_path", pipeline,
                    "--output_path", f"{tmp_path}/hf_out/", "--config_path", hf)
    assert_same_tensors(tensors_of(tmp_path / "hf_out"), tensors_of(hf))
    assert "training state" in out and "adam_m." in out


def test_merged_into_one_ckpt_equals_the_unsharded_one(cli, model, pipeline, tmp_path):
    hf, full, _ = model
    converted(cli, "--model", "llama", "--input_path", pipeline, "--output_path", tmp_path / "merged.ckpt",
              "--config_path", hf)
    assert_same_tensors(tensors_of(tmp_path / "merged.ckpt"), tensors_of(full))
    loaded = ms.load_checkpoint(str(tmp_path / "merged.ckpt"))
    assert tuple(loaded[HEAD].shape) == (256, 64) and tuple(loaded[EMBED].shape) == (256, 64)


def test_axis0_splits_stay_file_ranges(model, pipeline):
    """wq (rows over mp) and the optimizer-sharded embedding are concatenations of the rank files' bytes."""
    from mindformers_conv.formats.inputs import open_input

    refs = open_input(pipeline).refs
    wq, wo = refs["model.layers.0.attention.wq.weight"], refs["model.layers.0.attention.wo.weight"]
    assert [Path(p).parent.name for p, _, _ in wq.ranges] == ["rank_0", "rank_1"]
    assert [Path(p).parent.name for p, _, _ in refs[EMBED].ranges] == ["rank_0", "rank_2", "rank_1", "rank_3"]
    assert wo.ranges == () and wo.shape == (64, 64)
    assert refs["model.norm_out.weight"].ranges[0][0].endswith("rank_4/llama_rank_4-2_5.ckpt")


def test_a_merged_strategy_file_from_mindspore(cli, model, pipeline, tmp_path):
    """`--strategy` naming the file `mindspore.merge_pipeline_strategys` writes (names prefixed `{stage}-`)."""
    hf, _, _ = model
    merged = tmp_path / "merged_ckpt_strategy.ckpt"
    ms.merge_pipeline_strategys(str(tmp_path / "output" / "strategy"), str(merged))
    converted(cli, "--model", "llama", "--reversed", "--input_path", pipeline, "--output_path", f"{tmp_path}/o/",
              "--config_path", hf, "--strategy", merged)
    assert_same_tensors(tensors_of(tmp_path / "o"), tensors_of(hf))


def test_the_latest_epoch_step_is_merged(cli, model, pipeline, tmp_path):
    hf, _, state = model
    for rank in range(8):  # an older checkpoint beside each rank's latest
        old = [{"name": n, "data": ms_tensor(rank_slice(n, state[n], rank) * 0)} for n in STAGES[rank // 4]]
        ms.save_checkpoint(old, str(pipeline / f"rank_{rank}" / f"llama_rank_{rank}-2_3.ckpt"))
    converted(cli, "--model", "llama", "--reversed", "--input_path", pipeline, "--output_path", f"{tmp_path}/o/",
              "--config_path", hf)
    assert_same_tensors(tensors_of(tmp_path / "o"), tensors_of(hf))


def test_safetensors_with_remove_redundancy(cli, model, tmp_path):
    """Each slice saved once (here by the highest rank holding it), `"remove_redundancy": "True"` in the metadata."""
    hf, _, state = model
    maps = {**STAGES[0], **STAGES[1]}
    ranks: dict[int, dict] = {r: {} for r in range(4)}
    for name in maps:
        pieces = {rank: rank_slice(name, state[name], rank) for rank in range(4)}
        keeper = {raw_bytes(p).numpy().tobytes(): rank for rank, p in pieces.items()}  # the last rank wins
        for rank, piece in pieces.items():
            if keeper[raw_bytes(piece).numpy().tobytes()] == rank:
                ranks[rank][name] = piece
    assert "model.norm_out.weight" in ranks[3] and "model.norm_out.weight" not in ranks[0]
    save_ranks(tmp_path / "ckpt", ranks, fmt="safetensors", remove_redundancy=True)
    write_strategy(tmp_path / "strategy" / "ckpt_strategy_rank_0.ckpt", 0, maps)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "rank_1" / "llama_rank_1-2_5.safetensors"), "np") as f:
        assert f.metadata()["remove_redundancy"] == "True"
    converted(cli, "--model", "llama", "--reversed", "--input_path", tmp_path / "ckpt",
              "--output_path", f"{tmp_path}/o/", "--config_path", hf)
    assert_same_tensors(tensors_of(tmp_path / "o"), tensors_of(hf))


def test_rank_files_sliced_by_mindspore_itself(cli, model, tmp_path):
    """MindSpore's `transform_checkpoints` cuts the full .ckpt for a [2, 2] strategy (with optimizer sharding)."""
    hf, full, _ = model
    (tmp_path / "src" / "rank_0").mkdir(parents=True)
    (tmp_path / "src" / "rank_0" / "llama.ckpt").write_bytes(full.read_bytes())
    strategy = write_strategy(tmp_path / "strategy" / "ckpt_strategy_rank_0.ckpt", 0, {**STAGES[0], **STAGES[1]})
    ms.transform_checkpoints(str(tmp_path / "src"), str(tmp_path / "dist"), "llama", None, str(strategy))
    converted(cli, "--model", "llama", "--reversed", "--input_path", tmp_path / "dist",
              "--output_path", f"{tmp_path}/o/", "--config_path", hf, "--strategy", strategy)
    assert_same_tensors(tensors_of(tmp_path / "o"), tensors_of(hf))


def failure(cli, pipeline, tmp_path, *extra) -> str:
    result = cli("--model", "llama", "--reversed", "--input_path", pipeline, "--output_path", f"{tmp_path}/bad/",
                 *extra)
    assert result.code == 3, result.err
    assert result.err.count("\n") == 1 and result.err.startswith("error: ")
    assert not (tmp_path / "bad").exists()
    return result.err


def test_a_missing_rank_is_named(cli, pipeline, tmp_path):
    import shutil

    shutil.rmtree(pipeline / "rank_6")
    assert "rank_6 is missing" in failure(cli, pipeline, tmp_path)


def test_a_strategy_parameter_no_rank_holds(cli, pipeline, tmp_path):
    write_strategy(tmp_path / "output" / "strategy" / "ckpt_strategy_rank_0.ckpt", 0,
                   {**STAGES[0], "model.layers.9.attention.wq.weight": ROWS})
    err = failure(cli, pipeline, tmp_path)
    assert "'model.layers.9.attention.wq.weight' is in the strategy but in no rank file" in err


def test_a_corrupt_strategy_file(cli, pipeline, tmp_path):
    path = tmp_path / "output" / "strategy" / "ckpt_strategy_rank_5.ckpt"
    path.write_bytes(path.read_bytes()[:-7])
    err = failure(cli, pipeline, tmp_path)
    assert "ckpt_strategy_rank_5.ckpt: not a MindSpore strategy file" in err


def test_several_ranks_without_a_strategy(cli, pipeline, tmp_path):
    import shutil

    shutil.rmtree(tmp_path / "output" / "strategy")
    assert "8 rank folders but no strategy/" in failure(cli, pipeline, tmp_path)


LAYOUTS = {  # dev_matrix, tensor_map entries (several: one per tensor axis, MindSpore's Layout API), opt size
    "rows-over-the-outer-axis": ((2, 4), [[1, -1]], 0),
    "both-axes": ((2, 2, 2), [[2, 0]], 0),
    "opt-over-two-free-axes": ((2, 2, 2), [[1, -1]], 4),
    "opt-over-part-of-an-axis": ((4, 2), [[-1, 0]], 2),
    "opt-over-every-free-axis": ((2, 2, 2), [[-1, 1]], -1),
    "one-axis-over-two-device-axes": ((2, 2, 2), [[2, 0], [1]], 0),
}


@pytest.mark.parametrize("case", LAYOUTS)
def test_slices_placed_by_mindspore_merge_back(case, tmp_path):
    """MindSpore's own `transform_checkpoints` places the slices; merging them gives the tensor back."""
    from mindformers_conv.formats.inputs import open_input

    dev, maps, opt = LAYOUTS[case]
    full = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)
    (tmp_path / "src" / "rank_0").mkdir(parents=True)
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(full.numpy())}], str(tmp_path / "src" / "rank_0" / "w.ckpt"))
    msg = pb.ParallelStrategyMap(current_stage=1)
    msg.parallel_strategy_item.add(node_name="n").parallel_strategys.stage = 0
    layout = msg.parallel_layout_item.add(param_name="w").parallel_layouts
    layout.dev_matrix.add().dim.extend(dev)
    for tmap in maps:
        layout.tensor_map.add().dim.extend(tmap)
    layout.param_split_shape.add()
    layout.indices_offset.add()
    layout.field, layout.opt_weight_shard_size = 0, opt
    layout.opt_weight_shard_step = 0 if opt == 0 else 2 if case == "opt-over-part-of-an-axis" else 1
    strategy = tmp_path / "strategy.ckpt"
    strategy.write_bytes(msg.SerializeToString())
    ms.transform_checkpoints(str(tmp_path / "src"), str(tmp_path / "dist"), "w", None, str(strategy))
    merged = open_input(tmp_path / "dist", str(strategy)).refs["w"]
    assert merged.shape == (16, 8)
    assert torch.equal(merged.read(), full)


def split(*argv) -> None:
    from mindformers_conv.cli import main

    assert main(["split", *map(str, argv)]) == 0


def test_split_cuts_what_mindspore_transform_checkpoints_cuts(cli, model, tmp_path):
    """`split` of the whole .ckpt for a [2, 2] strategy (optimizer sharding too) equals MindSpore's own cut, rank by rank."""
    _, full, _ = model
    strategy = write_strategy(tmp_path / "s" / "strategy.ckpt", 0, {**STAGES[0], **STAGES[1]})
    split(full, "--strategy", strategy, "--output_path", tmp_path / "ours")
    (tmp_path / "src" / "rank_0").mkdir(parents=True)
    (tmp_path / "src" / "rank_0" / "llama.ckpt").write_bytes(full.read_bytes())
    ms.transform_checkpoints(str(tmp_path / "src"), str(tmp_path / "theirs"), "llama", None, str(strategy))
    for rank in range(4):
        ours = tmp_path / "ours" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
        assert_same_tensors(tensors_of(ours), tensors_of(tmp_path / "theirs" / f"rank_{rank}" / f"llama{rank}.ckpt"))
        assert ms.load_checkpoint(str(ours)).keys() == {**STAGES[0], **STAGES[1]}.keys()
    assert (tmp_path / "ours" / "strategy" / "strategy.ckpt").read_bytes() == strategy.read_bytes()


def test_split_by_pipeline_stage_and_merge_back(cli, model, pipeline, tmp_path):
    """Each rank gets its stage's parameters, cut as the spec says; the folder merges back to the whole .ckpt."""
    hf, full, state = model
    strategy = tmp_path / "output" / "strategy"
    split(full, "--strategy", strategy, "--output_path", tmp_path / "ours", "--format", "safetensors")
    for rank in range(8):
        got = tensors_of(tmp_path / "ours" / f"rank_{rank}" / f"checkpoint_{rank}.safetensors")
        assert got.keys() == STAGES[rank // 4].keys()
        for name, (_, shape, data) in got.items():
            want = rank_slice(name, state[name], rank)
            assert shape == tuple(want.shape) and data.equal(raw_bytes(want)), (rank, name)
    converted(cli, "--model", "llama", "--input_path", tmp_path / "ours", "--output_path", tmp_path / "m.ckpt",
              "--config_path", hf)
    assert_same_tensors(tensors_of(tmp_path / "m.ckpt"), tensors_of(full))


def test_strategy_flag_on_an_undistributed_input_is_a_usage_error(cli, model, tmp_path):
    hf, full, _ = model
    result = cli("--model", "llama", "--reversed", "--input_path", full, "--output_path", f"{tmp_path}/o/",
                 "--config_path", hf, "--strategy", full)
    assert result.code == 2 and "--strategy applies to a folder of rank_*/ checkpoints" in result.err


def test_a_field_layout_is_refused(cli, pipeline, tmp_path):
    path = tmp_path / "output" / "strategy" / "ckpt_strategy_rank_0.ckpt"
    msg = pb.ParallelStrategyMap()
    msg.ParseFromString(path.read_bytes())
    msg.parallel_layout_item[0].parallel_layouts.field = 2
    path.write_bytes(msg.SerializeToString())
    assert "is laid out by `field`" in failure(cli, pipeline, tmp_path)
