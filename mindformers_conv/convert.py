"""One conversion, end to end: open the input, plan, write (or only plan), verify."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import fp8, lora, registry
from . import distributed
from .dtypes import DType, parse_user_dtype
from .errors import BadInput, UsageError, VerifyMismatch
from .execute import as_refs, execute
from .formats import checkpoint2
from .formats.inputs import Source, open_input
from .formats.ms_ckpt import SLICE_BYTES
from .formats.outputs import Layout, output_kind, plan_layout
from .mapping import Config, ModelSpec
from .jsonfile import read_object
from .mf_config import read_yaml_config
from .outfile import make_folder
from .plan import Plan, build_plan
from .verify import verify


@dataclass
class Options:
    dtype: DType | None = None
    allow_unmapped: bool = False
    dry_run: bool = False
    verify: bool = False
    progress: bool = True
    max_shard_bytes: int = 5 * 10**9
    config_path: str | None = None
    ckpt_slice_bytes: int = SLICE_BYTES
    jobs: int | None = 1  # worker processes for multi-file outputs (one whole file each); None: by size
    merge_lora: bool = False  # fold LoRA A/B into their base weights (needs lora_alpha)
    lora_alpha: float | None = None  # LoRA scale numerator: merging, and the PEFT adapter_config.json
    flags: dict = field(default_factory=dict)  # model flags (n_head, qkv_concat, …) given on the CLI
    hints: dict = field(default_factory=dict)  # sizes that only fill config.json's gaps (the API's defaults)
    target: str | None = None  # "megatron" / "dcp": the Megatron backend; "checkpoint2": a MindFormers 2.x folder
    parallel: dict = field(default_factory=dict)  # Megatron layout flags: tp, ep, llm_pp_layers, … (None = default)
    strategy: str | None = None  # MindSpore strategy file/folder of a rank_*/ input (default: its strategy/ folder)


@dataclass
class Result:
    source: Source
    plan: Plan
    layout: Layout
    model: str = ""  # which key converted, and why, when it was detected or picked from the input
    verified: int | None = None
    direction: str | None = None  # for the report, when not HF ↔ MindSpore (Megatron conversions)
    share: str = ""  # under torchrun: the files this rank wrote


MS_FORMATS = ("ckpt", "ms-safetensors")  # a forward from these re-lays a MindSpore checkpoint out
SIZE_KEYS = ("n_head", "hidden_size")  # flags that only restate config.json; the other flags choose layouts


def load_config(source: Source, config_path: str | None, flags: dict, hints: dict | None = None) -> Config:
    """config.json from --config_path (file or folder) or beside the input, with the CLI flags on top.

    Size flags fill gaps and must agree with config.json; layout flags (--qkv_concat false, …) override it.
    """
    return load_config_in(source.folder, config_path, flags, hints)


def load_config_in(folder: Path, config_path: str | None, flags: dict, hints: dict | None = None) -> Config:
    if config_path:
        path = Path(config_path)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise UsageError(f"--config_path {config_path}: no config.json (or MindFormers YAML) there")
    else:
        path = folder / "config.json"
    cfg: Config = {}
    if path.suffix in (".yaml", ".yml") and path.is_file():
        cfg = read_yaml_config(path)
        cfg["_path"] = str(path)
    elif path.is_file():
        cfg = read_object(path)
        cfg["_path"] = str(path)
    for key, value in flags.items():
        if key in SIZE_KEYS and cfg.get(key, value) != value:
            raise UsageError(f"--{key} {value} contradicts {path.name}, which says {cfg[key]}")
        cfg[key] = value
    for key, value in (hints or {}).items():
        cfg.setdefault(key, value)
    return cfg


def config_dtype(cfg: Config) -> DType | None:
    """The dtype config.json declares (`torch_dtype`, or `dtype` in transformers 5), if any."""
    value = cfg.get("torch_dtype") or cfg.get("dtype")
    try:
        return parse_user_dtype(value) if isinstance(value, str) else None
    except UsageError:
        return None


def convert(spec: ModelSpec | None, input_path: str, output_path: str, *, reverse: bool,
            options: Options, source: Source | None = None) -> Result:
    """`spec` None is `--model auto`: the key comes from config.json or the tensor names.

    A Megatron declaration (spec.megatron) goes to the Megatron backend; `source`: an input already
    opened (a Megatron checkpoint read as full tensors).
    """
    if distributed.launched() and options.target in ("megatron", "dcp"):
        raise UsageError(f"--target {options.target} is written by one process; run it without torchrun")
    if spec is not None and spec.megatron is not None:
        from .megatron.run import convert_megatron
        return convert_megatron(spec, input_path, output_path, reverse=reverse, options=options)
    if options.flags.get("is_lora") and not reverse and Path(input_path, lora.ADAPTER_WEIGHTS).is_file():
        input_path = str(Path(input_path, lora.ADAPTER_WEIGHTS))  # the adapter, not a base model beside it
    source = source or open_input(input_path, options.strategy)
    check_not_input(source, output_path)
    if options.merge_lora and options.verify:
        raise UsageError("--verify cannot check a --merge_lora output: merging is not reversible")
    refs = source.refs if reverse else lora.from_peft(source.refs)
    source = replace(source, refs=lora.merge(refs, options.lora_alpha) if options.merge_lora else refs)
    cfg = load_config(source, options.config_path, options.flags, options.hints)
    if not reverse:  # FP8 weights with block scales (DeepSeek-V3) are read dequantised
        source = replace(source, refs=fp8.dequantized(source.refs, cfg))
    relayout = not reverse and source.format in MS_FORMATS
    spec, model = _choose_model(spec, cfg, list(source.refs), reverse or relayout)
    if relayout:  # MindSpore → MindSpore (fuse, unfuse, cast, another container): through the HF names
        hf = build_plan(spec, source.refs, reverse=True, dtype=None, cfg=cfg, keep_tied=True,
                        allow_unmapped=options.allow_unmapped)
        source = replace(source, refs=as_refs(hf))
    kind = output_kind(output_path, reverse)
    hf_files = reverse and kind in ("folder", "safetensors")
    plan = build_plan(spec, source.refs, reverse=reverse, dtype=options.dtype, cfg=cfg,
                      allow_unmapped=options.allow_unmapped, keep_tied=not hf_files, mindformers_defaults=not relayout,
                      hf_default=config_dtype(cfg) if hf_files else None)
    adapter = cfg.get("is_lora") or reverse and any(lora.is_hf_lora(name) for name, _, _ in plan.entries)
    peft = lora.read_adapter_config(source.folder) if adapter else None  # only a LoRA output needs it
    if options.target == "checkpoint2":
        layout = checkpoint2.plan_layout(output_path, reverse, plan.entries, options.max_shard_bytes, options.parallel)
    else:
        layout = plan_layout(output_path, reverse, plan.entries, options.max_shard_bytes, spec.pickle_wrap,
                             options.lora_alpha, peft)
    if cfg.get("is_lora") and not reverse:
        _add_renamed_adapter_config(layout, plan, spec.all_rules(cfg), options.lora_alpha, peft)
    if relayout:
        plan.dropped, plan.unmapped = {**hf.dropped, **plan.dropped}, hf.unmapped + plan.unmapped
    result = Result(source, plan, layout, model, direction="MindSpore → MindSpore" if relayout else None)
    if options.dry_run:
        return result
    for folder in {f.path.parent for f in layout.files} if layout.folder is not None else ():
        make_folder(folder)
    carry = Path(cfg["_path"]).parent if "_path" in cfg else source.folder

    def check() -> None:
        try:
            result.verified = verify(plan, layout, source)
        except VerifyMismatch as e:
            layout.remove()
            raise VerifyMismatch(f"{e}; the output was removed") from None

    with distributed.joined() as team:  # under torchrun: this rank's share of the files; rank 0 verifies
        mine = execute(plan, layout, progress=options.progress, carry_from=carry,
                       ckpt_slice_bytes=options.ckpt_slice_bytes, jobs=_jobs(options.jobs, plan), team=team)
        if options.verify:
            team.step(check if team.lead else lambda: None)
    if team.size > 1:
        result.share = (f"rank {team.rank} of {team.size} wrote {len(mine)} of {len(layout.files)} file(s)"
                        + "".join(f"{', ' if i else ': '}{p.name}" for i, p in enumerate(mine)))
    return result


def _add_renamed_adapter_config(layout: Layout, plan: Plan, rules, alpha: float | None, peft: dict | None) -> None:
    """`--is_lora`: the adapter's adapter_config.json, target_modules in MindFormers' names, beside the output.

    MindFormers rewrites the input's file in place; the input is never touched here.
    """
    sources = [(s.name, s.dtype, s.shape) for t in plan.tensors for s in t.group.sources if lora.is_hf_lora(s.name)]
    if not sources:
        raise BadInput("--is_lora: the input has no LoRA parameters (expected a PEFT adapter_model.safetensors)")
    folder = layout.folder or layout.files[0].path.parent
    layout.extras[folder / lora.ADAPTER_CONFIG] = lora.adapter_config(sources, alpha, peft, lora.module_renames(rules))


AUTO_JOBS_BYTES = 1 << 30  # below this, forking workers costs more than it saves


def _jobs(asked: int | None, plan: Plan) -> int:
    if asked is not None:
        return max(1, asked)
    if distributed.launched():  # torchrun already starts a process per core
        return 1
    return os.cpu_count() or 1 if plan.total_bytes >= AUTO_JOBS_BYTES else 1


def _choose_model(spec: ModelSpec | None, cfg: Config, names: list[str], reverse: bool) -> tuple[ModelSpec, str]:
    if spec is None:
        spec, evidence = registry.detect(cfg, names, reverse)
        layout = f"; {spec.layout_of(cfg)}" if spec.layout_of else ""
        return spec, f"model: {spec.key} (detected from {evidence}{layout})"
    spec, why = registry.resolve(spec, cfg, names, reverse)
    why = "; ".join(filter(None, [why, spec.layout_of(cfg) if spec.layout_of else None]))
    return spec, f"model: {spec.key} ({why})" if why else ""


def check_not_input(source: Source, output_path: str) -> None:
    out = Path(output_path).resolve()
    inputs = {f.resolve() for f in source.files}
    if out in inputs or (out.is_dir() and out == source.folder.resolve()):
        raise UsageError(f"output path {output_path} is the input; choose another")
