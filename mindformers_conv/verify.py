"""--verify: read the written output back, run it through the inverse mapping, compare with the input."""

from __future__ import annotations


from . import dtypes
from .errors import VerifyMismatch
from .formats.inputs import Source, open_input
from .formats.outputs import Layout
from .plan import Plan, build_plan
from .tensor_ref import TensorRef, raw_bytes
from .lazy import torch


def verify(plan: Plan, layout: Layout, source: Source, written: dict[str, TensorRef] | None = None) -> int:
    """Every input tensor the plan used must come back byte-identical (after the cast that was asked for).

    `written`: the output's tensors when it is not a file `open_input` reads (a Megatron checkpoint).
    Returns the number of tensors compared; raises VerifyMismatch naming the first difference.
    """
    if written is None:
        written = open_input(layout.folder or layout.files[0].path).refs
    back = build_plan(plan.spec, written, reverse=not plan.reverse, dtype=None, cfg=plan.cfg,
                      keep_tied=True, mindformers_defaults=False)
    used = {s.name for t in plan.tensors for s in t.group.sources if s.name in source.refs}
    produced = set()
    for group in {id(t.group): t.group for t in back.tensors}.values():
        for name, tensor in zip(group.targets, group.compute()):
            if name not in source.refs:
                continue  # e.g. the tied head the forward added
            produced.add(name)
            _compare(name, source.refs[name].read(), tensor)
    missing = sorted(used - produced)
    if missing:
        raise VerifyMismatch(f"verify: input tensor {missing[0]!r} does not come back from the output")
    return len(produced)


def _compare(name: str, original: torch.Tensor, returned: torch.Tensor) -> None:
    expected = dtypes.cast(original, dtypes.from_torch(returned.dtype))
    if tuple(expected.shape) != tuple(returned.shape):
        raise VerifyMismatch(f"verify: {name!r} comes back with shape {list(returned.shape)}, "
                             f"expected {list(expected.shape)}")
    a, b = raw_bytes(expected), raw_bytes(returned)
    if not torch.equal(a, b):
        first = int((a != b).nonzero()[0]) // max(expected.element_size(), 1)
        raise VerifyMismatch(f"verify: {name!r} differs from the input (first at element {first})")
