"""The MindFormers-compatible command line: flags → registry lookup → convert → one-line report."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

from . import registry
from .convert import Options, Result, convert
from .dtypes import parse_user_dtype
from .errors import ConvError, UsageError
from .formats.outputs import parse_size
from .megatron.detect import megatron_spec


def str2bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


class _ConvertParser(_Parser):
    """Lists the model keys at the end of --help: built only then (it imports every declaration)."""

    def format_help(self) -> str:
        models = registry.load_models()
        width = max(map(len, models)) + 1  # two spaces at least between a key and its description
        keys = "\n".join(f"  {k:<{width}} {m.description}" for k, m in sorted(models.items()))
        self.epilog = f"model keys:\n{keys}\n  {'auto':<{width}} detect from config.json or the tensor names"
        return super().format_help()


def _flag(parser: argparse.ArgumentParser, name: str, help: str, default: bool | None = False) -> None:
    """A boolean that is on when given bare and also takes true/false/1/0 (None default: not given)."""
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


def build_parser() -> argparse.ArgumentParser:
    p = _ConvertParser(prog="convert_weight.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Convert weights between HuggingFace and MindSpore Transformers, both "
                                   "directions, bit-exactly and streaming.")
    p.add_argument("--model", required=True, metavar="KEY", help="model key (see below) or auto")
    p.add_argument("--input_path", required=True, help="HF folder (or a file in it), or a MindSpore .ckpt/.safetensors")
    p.add_argument("--output_path", required=True,
                   help=".ckpt, .safetensors, .bin/.pt, or a folder (ending in / or existing)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="cast floating tensors (default: as MindFormers)")
    _flag(p, "--reversed", "MindSpore → HF instead of HF → MindSpore")
    p.add_argument("--config_path", help="config.json (or its folder) when it is not beside the input")
    p.add_argument("--strategy", metavar="PATH", help="strategy file or folder of a distributed (rank_*/) MindSpore "
                                                      "input (default: the strategy/ folder inside or beside it)")
    p.add_argument("--n_head", type=int, help="attention heads, where config.json does not tell")
    p.add_argument("--hidden_size", type=int, help="hidden size, where config.json does not tell")
    p.add_argument("--layers", type=int, help="number of layers, where config.json does not tell")
    _flag(p, "--is_pretrain", "Swin: the checkpoint is a pre-training (SimMIM) one", None)
    p.add_argument("--telechat_type", help="TeleChat variant, e.g. telechat_12b")
    _flag(p, "--qkv_concat", "write fused q/k/v (and gate/up) where the model supports it", None)
    _flag(p, "--is_lora", "a PEFT adapter ↔ MindFormers' plain `lora_a/lora_b` names; its adapter_config.json is "
                          "written beside the output with MindFormers' module names", None)
    _flag(p, "--use_gmm", "MoE experts in the grouped-matmul layout [E, in, out]", None)
    _flag(p, "--use_contiguous_weight_layout_attention", "mcore keys: linear_qkv as [q; k; v] instead of grouped "
          "per KV head (default: config.json, else false)", None)
    _flag(p, "--use_interleaved_weight_layout_mlp", "mcore keys: linear_fc1 rows alternate gate/up instead of "
          "[gate; up] (default: config.json, else true)", None)
    p.add_argument("--qkv_layout", choices=("grouped", "contiguous"),
                   help="fused q/k/v and gate/up: grouped per KV head and row-interleaved (MindFormers ≥ 1.4, "
                        "default) or v1.3's contiguous [q; k; v] and [gate; up]")
    p.add_argument("--modal", choices=("video", "image"), help="CogVLM2: which model (default: from config.json)")
    _flag(p, "--merge_lora", "fold LoRA A/B into the base weights (W + B·A·alpha/r, in fp32)")
    p.add_argument("--lora_alpha", type=float, help="LoRA alpha, for --merge_lora and the PEFT adapter_config.json")
    _flag(p, "--dry-run", "plan only: files, tensors, bytes, predicted peak memory (reads headers only)")
    _flag(p, "--verify", "after writing, convert the output back and compare every tensor's bytes")
    _flag(p, "--allow-unmapped", "leave out tensors the mapping does not know (listed) instead of stopping")
    _flag(p, "--no-progress", "no progress bar")
    p.add_argument("-j", "--jobs", type=int, metavar="N",
                   help="worker processes for outputs of several files, one file each (default: the cores, "
                        "for outputs of 1 GiB or more)")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard in folder outputs (5GB)")
    m = p.add_argument_group("Megatron layout (MindSpeed-MM names; a Megatron --input_path is read as is, "
                             "its layout discovered from the files)")
    m.add_argument("--target", choices=("megatron", "dcp", "checkpoint2"),
                   help="write a Megatron checkpoint (from HF, or reshard one), the model as one torch DCP folder, "
                        "or a MindFormers 2.x checkpoint 2.0 folder (iteration from --iteration, default 0)")
    m.add_argument("--tp", type=int, help="tensor-parallel size (default 1, or the input's)")
    m.add_argument("--ep", type=int, help="expert-parallel size (default 1, or the input's)")
    for name, what in (("llm", "language model"), ("vit", "vision tower"), ("audio", "audio tower")):
        m.add_argument(f"--{name}_pp_layers", metavar="LIST",
                       help=f"{what} layers per PP stage, e.g. 1,3, or per VPP chunk [[1,2],[2,1]]"
                            + ("" if name == "llm" else "; fewer stages than the LLM repeat over its stages"))
    for name in ("vit", "audio"):
        m.add_argument(f"--{name}_tp", type=int, metavar="N", help=f"TP size of the {name} tower (0 or absent: --tp)")
    _flag(m, "--save_vit_only", "write the vision tower and its projector only", default=None)
    _flag(m, "--save_lora_only", "write the LoRA tensors only (….lora_A/B.default.weight)", default=None)
    m.add_argument("--llm_hf_dir", metavar="DIR", help="take the language model's weights from this HF checkpoint")
    m.add_argument("--vpp", type=int, help="virtual pipeline chunks (checked against the per-chunk layer lists)")
    m.add_argument("--iteration", type=int, help="write iter_XXXXXXX instead of release (checkpoint2: "
                                                 "iteration_XXXXXXXX, default 0)")
    m.add_argument("--make_vocab_size_divisible_by", type=int,
                   help="pad the vocab to a multiple of N × TP (default: of TP)")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in TOOLS:
            return TOOLS[argv[0]](argv[1:])
        return _run(parse(argv))
    except ConvError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mindformers-conv inspect … | head`: the reader left; nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        print(f"error: too many open files ({e.strerror}); raise the limit with `ulimit -n`", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    flags = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    options = Options(dtype=parse_user_dtype(args.dtype), allow_unmapped=args.allow_unmapped,
                      dry_run=args.dry_run, verify=args.verify,
                      progress=not args.no_progress and sys.stderr.isatty(),
                      max_shard_bytes=parse_size(args.max_shard_size), config_path=args.config_path, flags=flags,
                      merge_lora=args.merge_lora, lora_alpha=args.lora_alpha, jobs=args.jobs)
    options.target, options.parallel = args.target, {k: getattr(args, k) for k in MEGATRON_FLAGS}
    options.strategy = args.strategy
    spec = megatron_spec(args.model, args.target, args.input_path, args.config_path, flags)
    if spec is None:
        spec = None if args.model == "auto" else registry.get(args.model)
    start = time.perf_counter()
    result = convert(spec, args.input_path, args.output_path, reverse=args.reversed, options=options)
    _report(result, time.perf_counter() - start, options)
    return 0


MODEL_FLAGS = ("n_head", "hidden_size", "layers", "telechat_type", "modal", "is_pretrain", "qkv_concat", "is_lora", "qkv_layout",
               "use_gmm", "use_contiguous_weight_layout_attention", "use_interleaved_weight_layout_mlp")
MEGATRON_FLAGS = ("tp", "ep", "vpp", "llm_pp_layers", "vit_pp_layers", "iteration", "make_vocab_size_divisible_by",
                  "audio_pp_layers", "vit_tp", "audio_tp", "save_vit_only", "save_lora_only", "llm_hf_dir")


def _inspect(argv: list[str]) -> int:
    p = _Parser(prog="mindformers-conv inspect", description="List a checkpoint's tensors (headers only).")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    from .inspection import inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(t["name"]) for t in info["tensors"])
    for t in info["tensors"]:
        print(f"{t['name']:<{width}}  {t['dtype']:<5} {str(t['shape']):<20} {_human(t['bytes'])}")
    family = info["family"]
    family = f"{family['key']} (from {family['from']})" if family["key"] else f"not decided ({family['from']})"
    print(f"{info['total_tensors']} tensors, {_human(info['total_bytes'])}, format {info['format']}, "
          f"{len(info['files'])} file(s), model {family}")
    if "parallel" in info:
        print("layout: " + ", ".join(f"{k.upper()} {v}" if k != "iteration" else f"iteration {v}"
                                     for k, v in info["parallel"].items()))
    return 0


def _diff(argv: list[str]) -> int:
    p = _Parser(prog="mindformers-conv diff", description="Compare two checkpoints tensor by tensor; exit 0 only "
                "when equal. With --model, A is mapped into B's naming first (e.g. a HF folder against its .ckpt).")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--model", help="model key whose mapping relates A and B")
    args = p.parse_args(argv)
    from .inspection import diff_checkpoints

    result = diff_checkpoints(args.a, args.b, registry.get(args.model) if args.model else None)
    for name in result.missing:
        print(f"missing in B: {name}")
    for name in result.extra:
        print(f"only in B: {name}")
    for line in result.different:
        print(f"differs: {line}")
    verdict = "equal" if result.equal else "DIFFERENT"
    print(f"{verdict}: {result.compared} tensors compared, {len(result.different)} differ, "
          f"{len(result.missing)} missing, {len(result.extra)} extra")
    return 0 if result.equal else 1


def _split(argv: list[str]) -> int:
    from pathlib import Path

    from .formats import ms_distributed, strategy
    from .formats.inputs import open_input

    p = _Parser(prog="mindformers-conv split", description="Cut a whole MindSpore checkpoint into rank_*/ files "
                "by a strategy (the layout MindFormers 1.x trains from and saves).")
    p.add_argument("path", help="a whole MindSpore .ckpt / safetensors file or folder")
    p.add_argument("--strategy", required=True, metavar="PATH", help="strategy file or folder (every stage)")
    p.add_argument("--output_path", required=True, help="folder for rank_{r}/checkpoint_{r}.{ckpt|safetensors}")
    p.add_argument("--format", choices=("ckpt", "safetensors"), default="ckpt")
    args = p.parse_args(argv)
    source = open_input(args.path)
    plan = strategy.read_strategy(Path(args.strategy))
    paths = ms_distributed.write_distributed(source.refs, plan, Path(args.output_path), args.format)
    print(f"split {len(source.refs)} tensors into {len(paths)} rank files under {args.output_path}")
    return 0


TOOLS = {"inspect": _inspect, "diff": _diff, "split": _split}


def _report(result: Result, seconds: float, options: Options) -> None:
    plan, layout = result.plan, result.layout
    direction = result.direction or ("MindSpore → HF" if plan.reverse else "HF → MindSpore")
    dtypes = ", ".join(sorted({t.dtype.code for t in plan.tensors}))
    files = [str(f.path) for f in layout.files]
    where = str(layout.folder) if layout.folder else files[0]
    size = _human(plan.total_bytes)
    lines = []  # written in one go: torchrun's ranks share stdout, which torchrun leaves unbuffered
    if result.model:
        lines.append(result.model)
    if options.dry_run:
        lines.append(f"plan ({plan.spec.key}, {direction}): read {len(result.source.refs)} tensors, "
              f"{_human(result.source.total_bytes)} from {len(result.source.files)} file(s)")
        lines.append(f"  write {len(plan.tensors)} tensors, {size} ({dtypes}) into {len(files)} file(s) at {where}")
        lines.append(f"  predicted peak memory: {_human(plan.peak_work_bytes)} for tensor data (largest recipe)")
    else:
        rate = f", {_human(plan.total_bytes / seconds)}/s" if seconds > 0 else ""
        lines.append(f"{plan.spec.key}: {direction}: wrote {len(plan.tensors)} tensors, {size} ({dtypes}) "
              f"to {where} in {seconds:.1f} s{rate}")
    for reason, names in plan.dropped.items():
        lines.append(f"  left out {len(names)} ({reason}): {_sample(names)}")
    if plan.unmapped:
        lines.append(f"  left out {len(plan.unmapped)} unmapped (--allow-unmapped): {_sample(plan.unmapped)}")
    if result.verified is not None:
        lines.append(f"  verified: {result.verified} tensors convert back byte-identical")
    if result.share:
        lines.append(f"  {result.share}")
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


def _sample(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


if __name__ == "__main__":
    sys.exit(main())
