"""Block-quantised FP8 HF sources (DeepSeek-V3's release): each float8_e4m3fn `X` with its `X_scale_inv`
becomes one fp32 tensor, `X` times its block's scale, read lazily; the scales leave the input.

Facts: spec/mindformers_other.md §3.2 (FP8 weights block-dequantised with `…_scale_inv`, block 128×128;
the scales are not written). The result is then cast like any float source (bf16 by default).
"""

from __future__ import annotations

import math

from .dtypes import BY_CODE
from .errors import BadInput
from .mapping import Config
from .tensor_ref import TensorRef
from .lazy import torch

SCALE_SUFFIX = "_scale_inv"
BLOCK = (128, 128)  # MindFormers' and DeepSeek's, when config.json's quantization_config does not say


def block_size(cfg: Config) -> tuple[int, int]:
    """The quantisation block (rows, columns) from config.json's `quantization_config.weight_block_size`."""
    size = (cfg.get("quantization_config") or {}).get("weight_block_size") or BLOCK
    return int(size[0]), int(size[1])


def dequantized(refs: dict[str, TensorRef], cfg: Config) -> dict[str, TensorRef]:
    """The input with every FP8 weight that has a `_scale_inv` folded with it (others unchanged)."""
    pairs = {n: refs[n + SCALE_SUFFIX] for n, r in refs.items()
             if r.dtype.code == "F8_E4M3" and n + SCALE_SUFFIX in refs}
    if not pairs:
        return refs
    block, out = block_size(cfg), {}
    for name, ref in refs.items():
        if name in pairs:
            out[name] = _folded(ref, pairs[name], block)
        elif name.removesuffix(SCALE_SUFFIX) not in pairs:
            out[name] = ref
    return out


def _folded(weight: TensorRef, scale: TensorRef, block: tuple[int, int]) -> TensorRef:
    """The pair as one lazy fp32 tensor, once the scale grid is seen to fit the weight."""
    grid = tuple(math.ceil(size / b) for size, b in zip(weight.shape, block))
    if len(weight.shape) != 2 or tuple(scale.shape) != grid:
        raise BadInput(f"{scale.name!r} has shape {list(scale.shape)}; FP8 weight {weight.name!r} "
                       f"{list(weight.shape)} in {block[0]}×{block[1]} blocks needs {list(grid)}")
    return TensorRef(weight.name, BY_CODE["F32"], weight.shape,
                     loader=lambda: dequantize(weight.read(), scale.read(), block))


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight · scale of its block, in fp32 (the edge blocks cropped), one row of blocks at a time."""
    rows, cols = block
    out = weight.float()
    per_column = scale.float().repeat_interleave(cols, dim=1)[:, :out.shape[1]]
    for i, factors in enumerate(per_column):
        out[i * rows:(i + 1) * rows].mul_(factors)
    return out

