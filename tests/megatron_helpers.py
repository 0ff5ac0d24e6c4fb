"""Helpers shared by the Megatron tests: run conversions, read rank files with torch's safe loader."""

from __future__ import annotations

from pathlib import Path

import torch


def rank_files(root: Path) -> dict[str, dict]:
    """'release/mp_rank_00_001' → the pickled dict, loaded with torch.load(weights_only=True)."""
    out = {}
    for path in sorted(Path(root).glob("*/mp_rank_*/model_optim_rng.pt")):
        out[f"{path.parent.parent.name}/{path.parent.name}"] = torch.load(path, weights_only=True, map_location="cpu")
    return out


def assert_same_rank_files(a: dict, b: dict) -> None:
    """The same folders, chunk keys, tensor names in order, dtypes, shapes and bytes."""
    assert a.keys() == b.keys()
    for folder in a:
        assert a[folder].keys() == b[folder].keys(), folder
        for key, state in a[folder].items():
            if not key.startswith("model"):
                assert state == b[folder][key]
                continue
            assert list(state) == list(b[folder][key]), (folder, key)
            for name, tensor in state.items():
                other = b[folder][key][name]
                assert tensor.dtype == other.dtype and tensor.shape == other.shape, (folder, name)
                assert tensor.view(torch.uint8).equal(other.view(torch.uint8)), (folder, name)


def save_dcp_from_two_ranks(folder: Path, state_path: Path, store: Path) -> None:
    """torch's own dcp.save from 2 gloo ranks (spawned processes): 2-D tensors sharded as DTensors, rows
    (Shard(0)) or, for the MLP's fc2, columns (Shard(1)); the rest replicated. The saved object is
    MindSpeed-MM's {'model': …, 'checkpoint_version': 3.0}."""
    import torch.multiprocessing as mp

    mp.spawn(_save_rank, args=(folder, state_path, store), nprocs=2, join=True)


def _save_rank(rank: int, folder: Path, state_path: Path, store: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        model = {}
        for name, tensor in torch.load(state_path, weights_only=True).items():
            placement = Replicate() if tensor.dim() < 2 else Shard(1) if "linear_fc2" in name else Shard(0)
            model[name] = distribute_tensor(tensor, mesh, [placement])
        dcp.save({"model": model, "checkpoint_version": 3.0}, checkpoint_id=str(folder))
    finally:
        dist.destroy_process_group()


def megatron_round_trip(cli, key: str, hf: Path, tmp_path: Path, tp: int, layers: dict | None = None, *extra,
                        back: bool = True) -> dict[str, dict]:
    """HF → Megatron in `tmp_path/mg` (TP, `{"vit": "4,0", …}` PP lists, extra flags), then, unless `back`
    is off, Megatron → HF in `tmp_path/back/`; returns the rank files."""
    flags = [str(a) for name, value in (layers or {}).items() if value for a in (f"--{name}_pp_layers", value)]
    r = cli("--model", key, "--input_path", hf, "--output_path", tmp_path / "mg", "--target", "megatron",
            "--tp", tp, *flags, *extra)
    assert r.code == 0, r.err
    if back:
        r = cli("--model", key, "--reversed", "--input_path", tmp_path / "mg", "--output_path", f"{tmp_path}/back/",
                "--config_path", hf)
        assert r.code == 0, r.err
    return rank_files(tmp_path / "mg")
