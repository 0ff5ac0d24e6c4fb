"""Conversions with a torch DCP side (`--target dcp`, or a DCP folder as input): the model's full,
unsharded Megatron tensors under `model.<name>` (spec §1.2), one `.distcp` data file.

Writing goes through the same placement as a Megatron checkpoint of one stage (TP 1, PP 1), so names,
order and the tied head follow Megatron's rules; each tensor is computed once and streamed into the
data file. Reading gives full Megatron names as byte ranges; the vocab is cut back to config.json's
vocab_size when the saved rows were padded.
"""

from __future__ import annotations

from pathlib import Path


from .. import registry
from ..convert import Options, Result, check_not_input, load_config_in
from ..errors import ConvError, UsageError
from ..execute import GroupOutputs
from ..formats import dcp as fmt
from ..formats import megatron as mfmt
from ..formats.inputs import Source
from ..formats.outputs import FileSpec, Layout
from ..mapping import Config
from ..outfile import OutputFile, make_folder
from ..plan import Plan
from ..progress import byte_bar
from ..verify import verify
from .layout import MegatronLayout, Placement, place, resolve_parallel
from .read import MegatronSource
from .write import commit_with_tracker


def read_dcp_source(path: str | Path, layout: MegatronLayout, cfg: Config) -> MegatronSource:
    """A DCP folder's model tensors by full Megatron name (one stage, TP 1: nothing to merge)."""
    found, refs, files = fmt.read_dcp(path)
    vocab = layout.vocab_size(cfg)
    for name, ref in refs.items():
        if layout.split_of(name).kind == "vocab" and vocab and ref.shape and ref.shape[0] > vocab:
            refs[name] = fmt.rows_prefix(ref, vocab)  # padded to a multiple by the trainer
    return MegatronSource(refs, files, tps={}, ep=1, pipelines={}, iteration=found.iteration)


def _placements(plan: Plan, layout: MegatronLayout) -> list[Placement]:
    par = resolve_parallel(layout, plan.entries, tp=1, ep=1, pp_layers={})
    return place(layout, plan.entries, par, plan.cfg)


def write_dcp(plan: Plan, layout: MegatronLayout, source: Source, output_path: str, options: Options,
              direction: str) -> Result:
    check_not_input(source, output_path)
    layout_flags = [k for k in ("tp", "ep", "vpp", "llm_pp_layers", "vit_pp_layers", "audio_pp_layers", "vit_tp",
                                "audio_tp", "make_vocab_size_divisible_by") if options.parallel.get(k) not in (None, 1)]
    if layout_flags:
        raise UsageError(f"--target dcp writes full, unsharded tensors: --{layout_flags[0]} does not apply")
    iteration = options.parallel.get("iteration")
    root = Path(output_path)
    folder = root / mfmt.iteration_dir(iteration)
    placements = _placements(plan, layout)
    entries = [(p.local, p.dtype, p.shape) for p in placements]
    result = Result(source, plan, Layout([FileSpec(folder / fmt.DATA_FILE, "dcp", entries)], {}, root),
                    direction=direction)
    if options.dry_run:
        return result
    make_folder(folder)
    by_name = {t.name: t for t in plan.tensors}
    groups = GroupOutputs()
    bar = byte_bar(plan.total_bytes, "writing DCP", options.progress)
    outs: list[OutputFile] = []
    try:
        data = OutputFile(folder / fmt.DATA_FILE, bar.update)
        outs.append(data)
        writer = fmt.DcpWriter(data, str(folder))
        for p, entry in zip(placements, entries):
            writer.add(*entry, groups.bytes_of(by_name[p.source]))
        data.close()
        meta = OutputFile(folder / fmt.METADATA)
        outs.append(meta)
        meta.write(writer.metadata_bytes())
        commit_with_tracker(outs, root, iteration)
    except BaseException:
        for out in outs:
            out.abort()
        raise
    finally:
        bar.close()
    if options.verify:
        written = read_dcp_source(root, layout, plan.cfg).refs
        result.verified = verify(plan, result.layout, source, written)
    return result


def inspect_dcp(path: str) -> dict:
    """`inspect` of a DCP folder: the model tensors as stored (`model.<name>`) and the family."""
    found, refs, files = fmt.read_dcp(path)
    tensors = [{"name": fmt.MODEL + r.name, "dtype": r.dtype.code, "shape": list(r.shape), "bytes": r.nbytes}
               for r in refs.values()]
    try:
        spec, evidence = registry.detect_megatron(load_config_in(Path(path), None, {}))
        family = {"key": spec.key, "from": evidence}
    except ConvError:
        family = {"key": None, "from": "no config.json in the folder (pass --model and --config_path to convert)"}
    return {"path": str(path), "format": "dcp", "files": [str(f) for f in files], "family": family,
            "parallel": {"iteration": found.iteration if found.iteration is not None else "release"},
            "tensors": tensors, "total_tensors": len(tensors), "total_bytes": sum(t["bytes"] for t in tensors)}
