#!/usr/bin/env python3
"""Benchmark: our converter against `cp -r` on a TinyLlama-1.1B-shaped bf16 HF checkpoint.

    .venv/bin/python benchmarks/bench_convert.py              # full size (~2.2 GB), what `make bench` runs
    .venv/bin/python benchmarks/bench_convert.py --quick      # small shape, CI smoke (`make bench-quick`)
    .venv/bin/python benchmarks/bench_convert.py --repeat 3   # median of 3 runs per step
    .venv/bin/python benchmarks/bench_convert.py --keep       # leave the outputs of the last run in place

The synthetic source (random weights, real names and config.json) is built once and cached in
benchmarks/.cache/ (gitignored). Every step runs as its own child process; os.wait4 gives its wall
time, CPU time and peak RSS (ru_maxrss). Steps:

    cp -r           the source folder to a fresh folder on the same filesystem (the yardstick)
    startup         `convert_weight.py --help`: interpreter + imports + model registry, no data
    HF→MS bf16      convert_weight.py --model llama ... --output_path X.ckpt --dtype bf16   (pure byte moves)
    HF→MS fp32      the same with --dtype fp32                                              (a cast)
    MS→HF           convert_weight.py --reversed X.ckpt → HF folder                         (bf16, byte moves)

Page cache: all runs are warm-cache. The source is read once before timing (so cp does not pay a cold
read the converter then gets for free), outputs are not fsync'ed by cp nor by us, and os.sync() runs
(untimed) before every step so a previous step's dirty pages are not written back on the next one's clock.

After timing, the outputs of the last run are checked tensor by tensor, independently of the
converter's own mapping (a hand-written llama name table, the `safetensors` library for HF files):
the bf16 .ckpt holds the source bytes, the fp32 .ckpt holds the source upcast, the MS→HF folder holds
the source bytes again. A wrong output fails the run (exit 1); a missed target only with --strict.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Nothing heavy (torch, mindformers_conv) is imported at the top: on Linux a child's ru_maxrss starts
# from the RSS its parent had at fork, so this process stays small until every timed child has run.

CACHE = REPO / "benchmarks" / ".cache"
MIB = 1 << 20
# Shapes as LlamaShape keyword arguments. Full: mindformers_conv.synthetic.TINYLLAMA_1B.
# --quick: the TinyLlama vocabulary and head layout, narrower and 4 layers (~90 MB in bf16).
FULL = "TINYLLAMA_1B"
QUICK = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4)
WALL_FACTOR = 2.0  # HF→MS wall ≤ 2 × cp
RSS_FACTOR, RSS_SLACK = 2, 300 * MIB  # peak RSS ≤ 2 × largest tensor + 300 MiB

# HF llama name → MindFormers name, written out here so the check does not trust the converter's tables.
MS_NAMES = [(r"model\.embed_tokens\.weight", "model.tok_embeddings.embedding_weight"),
            (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"model.layers.\1.attention.w\2.weight"),
            (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"model.layers.\1.feed_forward.w1.weight"),
            (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"model.layers.\1.feed_forward.w2.weight"),
            (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"model.layers.\1.feed_forward.w3.weight"),
            (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"model.layers.\1.attention_norm.weight"),
            (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"model.layers.\1.ffn_norm.weight"),
            (r"model\.norm\.weight", "model.norm_out.weight"),
            (r"lm_head\.weight", "lm_head.weight")]


def ms_name(hf: str) -> str:
    for pattern, repl in MS_NAMES:
        if re.fullmatch(pattern, hf):
            return re.sub(pattern, repl, hf)
    raise KeyError(hf)


# ---------------------------------------------------------------- source


def source_folder(quick: bool) -> Path:
    """The cached synthetic HF folder; built (in a child, under a temporary name, then renamed) when missing."""
    shape = f"LlamaShape(**{QUICK!r})" if quick else FULL
    name = "quick-" + "-".join(f"{v}" for v in QUICK.values()) if quick else "tinyllama-1.1b"
    folder = CACHE / f"{name}-bf16-seed0"
    if (folder / "config.json").is_file():
        return folder
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    print(f"building the synthetic source once: {folder} ...", flush=True)
    start = time.perf_counter()
    code = ("import sys; from mindformers_conv.synthetic import LlamaShape, TINYLLAMA_1B, write_llama; "
            f"write_llama(sys.argv[1], {shape}, dtype='BF16', seed=0)")
    subprocess.run([sys.executable, "-c", code, str(building)], cwd=REPO, check=True)
    shutil.rmtree(folder, ignore_errors=True)
    building.rename(folder)
    print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    return folder


def tensor_sizes(folder: Path) -> dict[str, int]:
    """name → bytes, from the safetensors header (read here without the converter)."""
    sizes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()})
    return sizes


def warm(folder: Path) -> float:
    """Read every file once so all steps start from the same (warm) page cache."""
    start = time.perf_counter()
    buf = bytearray(MIB)  # small and reused: this process's RSS is every child's ru_maxrss floor
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    return time.perf_counter() - start


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def own_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ---------------------------------------------------------------- steps


@dataclass
class Step:
    name: str
    argv: list[str]
    output: Path | None
    largest: int = 0  # largest tensor (source or output) this step handles, bytes
    target_wall: bool = False  # held to WALL_FACTOR × cp
    ours: bool = True
    runs: list[tuple[float, float, int]] = field(default_factory=list)  # (wall s, cpu s, maxrss bytes)

    @property
    def wall(self) -> float:
        return statistics.median(r[0] for r in self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(r[1] for r in self.runs)

    @property
    def rss(self) -> int:
        return max(r[2] for r in self.runs)


def run_child(argv: list[str], log: Path) -> tuple[float, float, int]:
    """Run one child; wall time, user+sys CPU and peak RSS from os.wait4. Fails loudly on a non-zero exit."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"error: {' '.join(argv)} exited {code}:\n{log.read_text()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def make_steps(src: Path, work: Path, largest_bf16: int) -> list[Step]:
    conv = [sys.executable, str(REPO / "convert_weight.py")]
    ckpt16, ckpt32, hf_back = work / "llama_bf16.ckpt", work / "llama_fp32.ckpt", work / "hf_back"
    fwd = conv + ["--model", "llama", "--input_path", str(src), "--no-progress"]
    return [
        Step("cp -r", ["cp", "-r", str(src), str(work / "cp_copy")], work / "cp_copy", largest_bf16, ours=False),
        Step("startup (--help)", conv + ["--help"], None, 0),
        Step("HF→MS bf16 .ckpt", fwd + ["--output_path", str(ckpt16), "--dtype", "bf16"], ckpt16, largest_bf16,
             target_wall=True),
        Step("HF→MS fp32 .ckpt", fwd + ["--output_path", str(ckpt32), "--dtype", "fp32"], ckpt32, 2 * largest_bf16,
             target_wall=True),
        # reads the bf16 .ckpt of the same run, so it runs after it
        Step("MS→HF bf16 folder", conv + ["--model", "llama", "--reversed", "--input_path", str(ckpt16),
                                          "--output_path", str(hf_back) + "/", "--config_path", str(src),
                                          "--no-progress"], hf_back, largest_bf16),
    ]


# ---------------------------------------------------------------- correctness


def check_outputs(src: Path, steps: list[Step]) -> list[str]:
    """Independent tensor-by-tensor check of the last run's outputs; returns the problems found."""
    import torch
    from safetensors import safe_open

    from mindformers_conv.formats.ms_ckpt import read_index

    problems = []
    out = {s.name: s.output for s in steps}
    copy = out["cp -r"]
    if folder_bytes(copy) != folder_bytes(src):
        problems.append("cp -r: the copy's size differs from the source")
    files = sorted(src.glob("*.safetensors"))
    ckpts = {"bf16": read_index(out["HF→MS bf16 .ckpt"]), "fp32": read_index(out["HF→MS fp32 .ckpt"])}
    back_files = sorted(out["MS→HF bf16 folder"].glob("*.safetensors"))
    back = {}
    for file in back_files:
        with safe_open(file, "pt") as f:
            back.update({k: file for k in f.keys()})
    seen = 0
    for file in files:
        with safe_open(file, "pt") as f:
            for name in f.keys():
                seen += 1
                original = f.get_tensor(name)
                for label, refs in ckpts.items():
                    ref = refs.get(ms_name(name))
                    if ref is None:
                        problems.append(f"{label} .ckpt: {ms_name(name)} missing")
                        continue
                    want = original if label == "bf16" else original.float()
                    got = ref.read()
                    if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape) or \
                            not torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
                        problems.append(f"{label} .ckpt: {ms_name(name)} differs from the source")
                if name not in back:
                    problems.append(f"MS→HF: {name} missing")
                    continue
                with safe_open(back[name], "pt") as b:
                    got = b.get_tensor(name)
                if got.dtype != original.dtype or not torch.equal(got.view(torch.uint8), original.view(torch.uint8)):
                    problems.append(f"MS→HF: {name} differs from the source")
    for label, refs in ckpts.items():
        if len(refs) != seen:
            problems.append(f"{label} .ckpt: {len(refs)} tensors, the source has {seen}")
    if len(back) != seen:
        problems.append(f"MS→HF: {len(back)} tensors, the source has {seen}")
    return problems


# ---------------------------------------------------------------- report


def report(steps: list[Step], model_bytes: int, largest: int, repeat: int, quick: bool) -> tuple[list[str], list[str]]:
    cp = steps[0].wall
    cp_rate = folder_bytes(steps[0].output) / cp if steps[0].output.exists() else 0
    lines = [f"model: {model_bytes / MIB:,.1f} MiB ({model_bytes:,} B) bf16, largest tensor "
             f"{largest / MIB:,.1f} MiB ({largest:,} B); median of {repeat} run(s); warm page cache", ""]
    head = (f"{'step':<20} {'wall s':>8} {'cpu s':>7} {'out MiB':>8} {'GiB/s':>6} {'peak RSS MiB':>13} {'× cp':>6} "
            f"{'×cp/B':>6}   targets")
    lines += [head, "-" * (len(head) + 48)]
    misses = []
    for s in steps:
        written = folder_bytes(s.output) if s.output is not None and s.output.exists() else 0
        rate = f"{written / s.wall / (1 << 30):6.2f}" if written else f"{'':6}"
        per_byte = f"{cp_rate / (written / s.wall):6.2f}" if written and cp_rate else f"{'':6}"
        out_mib = f"{written / MIB:8.0f}" if written else f"{'':8}"
        targets = []
        if s.target_wall:
            ok = s.wall <= WALL_FACTOR * cp
            targets.append(f"wall ≤ {WALL_FACTOR:g}×cp {'pass' if ok else 'FAIL'}")
            if not ok:
                misses.append(s.name)
        if s.ours and s.largest:
            limit = RSS_FACTOR * s.largest + RSS_SLACK
            ok = s.rss <= limit
            targets.append(f"RSS ≤ {RSS_FACTOR}×{s.largest / MIB:.0f}+300 = {limit / MIB:.0f} MiB "
                           f"{'pass' if ok else 'FAIL'}")
            if not ok:
                misses.append(s.name)
        lines.append(f"{s.name:<20} {s.wall:8.2f} {s.cpu:7.2f} {out_mib} {rate} {s.rss / MIB:13.1f} {s.wall / cp:6.2f} "
                     f"{per_byte}   " + "; ".join(targets))
    lines += ["", "× cp: wall time over cp's; ×cp/B: the same per byte written (the fp32 output is twice the bytes).",
              "Every converter row includes the fixed start-up cost of the `startup (--help)` row; cp's RSS is",
              "this process's own (the floor ru_maxrss inherits at fork)."]
    if quick:
        lines += ["", "(--quick: the model is small, so fixed start-up cost dominates; the wall target is "
                      "meaningful only at full size)"]
    return lines, misses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small 4-layer shape (~90 MB) for a CI smoke run")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="run every step N times, report the median")
    p.add_argument("--keep", action="store_true", help="keep the last run's outputs (benchmarks/.cache/run-*)")
    p.add_argument("--no-check", action="store_true", help="skip the tensor-by-tensor check of the outputs")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed too")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be ≥ 1")

    src = source_folder(args.quick)
    sizes = tensor_sizes(src)
    model_bytes, largest = sum(sizes.values()), max(sizes.values())
    work = CACHE / f"run-{os.getpid()}"
    work.mkdir(parents=True)
    steps = make_steps(src, work, largest)
    try:
        print(f"source: {src} ({len(sizes)} tensors, {model_bytes / MIB:,.1f} MiB)", flush=True)
        print(f"warm-up read of the source: {warm(src):.2f} s; load average {load()}; "
              f"this process's RSS {own_rss() / MIB:.0f} MiB (the floor of every child's peak RSS)", flush=True)
        for rep in range(args.repeat):
            for s in steps:
                if s.output is not None:
                    remove(s.output)
                os.sync()  # untimed: the previous step's dirty pages are not this step's cost
                s.runs.append(run_child(s.argv, work / f"{len(s.runs)}-{s.name.split()[0]}.log"))
                wall, cpu, rss = s.runs[-1]
                print(f"  run {rep + 1}/{args.repeat}  {s.name:<20} {wall:7.2f} s  cpu {cpu:6.2f} s  "
                      f"rss {rss / MIB:7.1f} MiB", flush=True)
        os.sync()
        print(f"load average after: {load()}")
        lines, misses = report(steps, model_bytes, largest, args.repeat, args.quick)
        print()
        print("\n".join(lines))
        problems = []
        if not args.no_check:
            start = time.perf_counter()
            problems = check_outputs(src, steps)
            verdict = "OK, every tensor of every output matches the source" if not problems else "WRONG OUTPUT"
            print(f"\noutput check ({time.perf_counter() - start:.1f} s): {verdict}")
            for line in problems[:20]:
                print(f"  {line}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "quick": args.quick, "repeat": args.repeat, "model_bytes": model_bytes, "largest_tensor": largest,
                "steps": [{"step": s.name, "wall_s": s.wall, "cpu_s": s.cpu, "peak_rss_bytes": s.rss,
                           "ratio_to_cp": s.wall / steps[0].wall, "runs": s.runs} for s in steps],
                "targets_missed": misses, "output_problems": problems}, indent=2))
        if problems:
            return 1
        return 1 if args.strict and misses else 0
    finally:
        if args.keep:
            print(f"\noutputs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
