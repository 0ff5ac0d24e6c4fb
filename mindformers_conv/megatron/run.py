"""Conversions with a Megatron side: HF → Megatron, Megatron → HF, Megatron → Megatron (reshard)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .. import lora
from ..convert import Options, Result, check_not_input, convert, load_config, load_config_in
from ..errors import UsageError
from ..formats import dcp as dcp_fmt
from ..formats import megatron as fmt
from ..formats.inputs import Source, open_input
from ..mapping import MEGATRON_LORA, ModelSpec, rename
from ..outfile import make_folder
from ..plan import Plan, build_plan
from ..verify import verify
from .layout import LLM, MegatronLayout, Parallel, resolve_parallel
from .pipeline import PipelineLayers, parse_pp_layers
from .dcp import read_dcp_source, write_dcp
from .options import kept, with_llm_from
from .read import MegatronSource, read_megatron
from .write import as_layout, plan_rank_files, write_rank_files
from .detect import TARGETS


def convert_megatron(spec: ModelSpec, input_path: str, output_path: str, *, reverse: bool, options: Options) -> Result:
    layout: MegatronLayout = spec.megatron
    spec = replace(spec, lora_style=MEGATRON_LORA)  # `….lora_A.default.weight` both ways (spec §6.3)
    is_dcp = dcp_fmt.is_dcp(input_path)  # before is_megatron: a DCP root has the same tracker file
    if is_dcp or fmt.is_megatron(input_path):
        kind = "DCP" if is_dcp else "Megatron"
        if options.parallel.get("llm_hf_dir"):
            raise UsageError(f"--llm_hf_dir merges into a HF input; {input_path} is a {kind} checkpoint")
        if not reverse and options.target not in TARGETS:
            raise UsageError(f"{input_path} is a {kind} checkpoint: pass --reversed to write HF, "
                             "or --target megatron / dcp to rewrite it")
        cfg = load_config_in(Path(input_path), options.config_path, options.flags)
        found = (read_dcp_source if is_dcp else read_megatron)(input_path, layout, cfg)
        source = Source(found.refs, found.files, Path(input_path), kind.lower())
        if options.target in TARGETS:
            identity = ModelSpec(spec.key, spec.description, (rename("{name*}", "{name*}"),), extra_rules=())
            plan = build_plan(identity, source.refs, reverse=False, dtype=options.dtype, cfg=cfg,
                              mindformers_defaults=False)
            return _write(plan, layout, source, output_path, options, defaults=found)
        result = convert(replace(spec, megatron=None), input_path, output_path, reverse=True, options=options,
                         source=source)
        result.direction = f"{kind} → HF"
        return result
    if reverse:
        raise UsageError(f"--reversed needs a Megatron checkpoint folder as --input_path, got {input_path}")
    if options.target not in TARGETS:
        raise UsageError(f"--model {spec.key} converts to Megatron only: pass --target megatron (or dcp)")
    source = open_input(input_path)
    source = replace(source, refs=lora.from_peft(source.refs))
    cfg = load_config(source, options.config_path, options.flags, options.hints)
    if options.parallel.get("llm_hf_dir"):
        source = with_llm_from(spec, source, options.parallel["llm_hf_dir"], cfg)
    plan = build_plan(spec, source.refs, reverse=False, dtype=options.dtype, cfg=cfg,
                      allow_unmapped=options.allow_unmapped, mindformers_defaults=False)
    return _write(plan, layout, source, output_path, options)


TOWER_FLAGS = ("_pp_layers", "_tp")  # --{tower}_pp_layers, --{tower}_tp


def _write(plan: Plan, layout: MegatronLayout, source: Source, output_path: str, options: Options,
           defaults: MegatronSource | None = None) -> Result:
    """Place the plan's full tensors per the layout flags (a reshard keeps what it does not change)."""
    origin = {"megatron": "Megatron", "dcp": "DCP"}.get(source.format, "HF")
    if options.target == "dcp":
        return write_dcp(kept(plan, layout, options.parallel), layout, source, output_path, options, f"{origin} → DCP")
    check_not_input(source, output_path)
    par = parallel_from(options.parallel, layout, plan, defaults)  # the whole model's layer counts
    plan = kept(plan, layout, options.parallel)
    root = Path(output_path)
    files = plan_rank_files(plan, layout, par, root)
    result = Result(source, plan, as_layout(files, root), direction=f"{origin} → Megatron")
    if options.dry_run:
        return result
    make_folder(root)
    write_rank_files(plan, files, par, root, progress=options.progress)
    if options.verify:
        written = read_megatron(root, layout, plan.cfg).refs
        result.verified = verify(plan, result.layout, source, written)
    return result


def parallel_from(flags: dict, layout: MegatronLayout, plan: Plan, defaults: MegatronSource | None) -> Parallel:
    def flag(name, default):
        value = flags.get(name)
        return default if value is None else value

    towers = {m.name for m in layout.modalities}
    for key, suffix in ((k, s) for k, v in flags.items() if v is not None for s in TOWER_FLAGS if k.endswith(s)):
        if key[:-len(suffix)] not in towers:
            raise UsageError(f"--{key}: the model has no such tower (it has {', '.join(sorted(towers))})")
    pp_layers: dict[str, PipelineLayers | None] = {}
    for m in layout.modalities:
        text = flags.get(f"{m.name}_pp_layers")
        pp_layers[m.name] = parse_pp_layers(text) if text else None
    vpp, llm = flags.get("vpp"), pp_layers.get(LLM)
    if vpp and llm and llm.vpp != vpp:
        raise UsageError(f"--vpp {vpp}: --{LLM}_pp_layers {flags[f'{LLM}_pp_layers']} has {llm.vpp} "
                         f"chunk(s); give one list per chunk, e.g. [[1,2],[2,1]]")
    if defaults is not None and not any(pp_layers.values()):
        pp_layers = dict(defaults.pipelines)
    input_tps = defaults.tps if defaults else {}
    # A tower keeps the input's own TP size only where it differed from the LLM's; else it follows --tp.
    tower_tps = {m.name: flag(f"{m.name}_tp", input_tps.get(m.name) if input_tps.get(m.name) != input_tps.get(LLM)
                              else None) for m in layout.modalities if m.name != LLM}
    return resolve_parallel(layout, plan.entries, tp=flag("tp", input_tps.get(LLM, 1)),
                            ep=flag("ep", defaults.ep if defaults else 1), pp_layers=pp_layers,
                            vocab_divisible_by=flag("make_vocab_size_divisible_by", 1),
                            tower_tps=tower_tps,
                            iteration=flags.get("iteration"))

