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
