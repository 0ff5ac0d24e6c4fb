#!/usr/bin/env python3
"""Benchmark: our converter against `cp -r` and MindFormers v1.3.2's own llama converter, side by side.

    .venv/bin/python benchmarks/bench_convert.py              # full (`make bench`): 5 model sizes, ~10 min
    .venv/bin/python benchmarks/bench_convert.py --quick      # one small model, under a minute (`make bench-quick`)
    .venv/bin/python benchmarks/bench_convert.py --repeat 3   # our steps and cp 3 times (median); MindFormers once
    ... --json out.json --plot out.png                        # figures as JSON; time and RSS vs size as a PNG

Sources are synthetic bf16 llama folders (benchmarks/sources.py, cached in benchmarks/.cache/): TinyLlama-1.1B
(22 and 11 layers), Llama-7B-shaped with 2 and 4 layers (full-size tensors) and a small 4-layer one (alone
with --quick).
Per model, each step is its own child process (benchmarks/harness.py: wall, CPU and peak RSS from os.wait4,
bytes read from /proc/<pid>/io), warm page cache:

    cp -r                the source folder (the yardstick)
    HF→MS bf16 .ckpt     convert_weight.py --model llama --dtype bf16          (no dtype change: byte moves)
    HF→MS fp16 / fp32    the same with --dtype fp16 / fp32 (a cast), main model only
    HF→MS folder -j N    bf16 into a folder of 300 MB MindSpore safetensors shards, in 1 and 2 worker
                         processes (main model only)
    MS→HF bf16 folder    --reversed of that bf16 .ckpt into an HF folder
    MS→HF fp16→bf16      --reversed of the fp16 .ckpt with --dtype bf16 (a cast back), main model only
    MF HF→MS bf16        MindFormers' convert_pt_to_ms(..., dtype=bf16)        (benchmarks/run_mindformers.py,
    MF MS→HF bf16 .bin   MindFormers' convert_ms_to_pt of our bf16 .ckpt       in benchmarks/.venv-mindformers)

Once per run: start-up (`--help`, and MindFormers' import) and `--dry-run` on a 70B-shaped sharded input
whose data are holes (headers only). Then our steps run once more with their input evicted from the page
cache (posix_fadvise, those files only) for the bytes read from storage, and every output of every step,
MindFormers' included, is checked tensor by tensor against the source (benchmarks/check_outputs.py).
Without the MindFormers venv (`make bench-venv`) its rows are left out and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import MIB, Run, evict, folder_bytes, load, own_rss, remove, run_child, warm
from sources import CACHE, LLAMA70B, LLAMA7B_2L, LLAMA7B_4L, QUICK, REPO, TINYLLAMA, TINYLLAMA_HALF, Model, \
    source_folder

BENCH = REPO / "benchmarks"
MF_PYTHON = BENCH / ".venv-mindformers" / "bin" / "python"
CONVERT = [sys.executable, str(REPO / "convert_weight.py")]

WALL_SAME, WALL_CAST = 1.2, 1.5  # wall ≤ × cp of the same bytes: without / with a dtype change
MF_SPEEDUP = 15  # MindFormers' wall ÷ ours, same direction and input
RSS_FACTOR, RSS_SLACK = 2, 300 * MIB  # peak RSS ≤ 2 × largest tensor handled + 300 MiB
READ_SLACK = 0.01, 32 * MIB  # bytes read ≤ source × 1.01 + 32 MiB, start-up's reads subtracted (a cast
# imports torch: ≈ 21 MiB of .py files read); from storage with the input evicted: the same bound
DRY_RUN_LIMIT = 2.0  # seconds, 70B-shaped sharded input


@dataclass
class Step:
    name: str
    argv: list[str]
    source: Path | None  # what it reads
    output: Path | None = None
    check: str | None = None  # check_outputs.py KIND:DTYPE of the output
    largest: int = 0  # largest tensor (source or output) it handles, bytes
    wall_factor: float | None = None  # target: wall ≤ this × cp of the same bytes
    ours: bool = True
    rival: str | None = None  # the MindFormers step doing the same work
    repeat: bool = True  # MindFormers runs once whatever --repeat says
    cwd: Path | None = None
    runs: list[Run] = field(default_factory=list)
    cold: Run | None = None  # our steps, input evicted from the page cache

    @property
    def wall(self) -> float:
        return statistics.median(r.wall for r in self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(r.cpu for r in self.runs)

    @property
    def rss(self) -> int:
        return max(r.rss for r in self.runs)

    @property
    def rchar(self) -> int:
        return max(r.rchar for r in self.runs)

    def run(self, log_dir: Path) -> Run:
        if self.output is not None:
            remove(self.output)
        os.sync()  # untimed: the previous step's dirty pages are not this step's cost
        tag = self.name.replace(" ", "_").replace("/", "_")
        return run_child(self.argv, log_dir / f"{tag}-{len(self.runs)}.log", self.cwd)


# ---------------------------------------------------------------- steps


def model_steps(src: Path, work: Path, largest: int, main: bool, mindformers: bool) -> list[Step]:
    fwd = CONVERT + ["--model", "llama", "--input_path", str(src), "--no-progress"]
    ckpt16, back = work / "llama_bf16.ckpt", work / "hf_back"
    steps = [Step("cp -r", ["cp", "-r", str(src), str(work / "cp_copy")], src, work / "cp_copy", "hf:bf16",
                  largest, ours=False),
             Step("HF→MS bf16 .ckpt", fwd + ["--output_path", str(ckpt16), "--dtype", "bf16"], src, ckpt16,
                  "ckpt:bf16", largest, WALL_SAME, rival="MF HF→MS bf16")]
    if main:
        for dtype, factor in (("fp16", 1), ("fp32", 2)):
            out = work / f"llama_{dtype}.ckpt"
            steps.append(Step(f"HF→MS {dtype} .ckpt", fwd + ["--output_path", str(out), "--dtype", dtype], src, out,
                              f"ckpt:{dtype}", factor * largest, WALL_CAST))
        for jobs in (1, 2):  # a folder of 300 MB shards: one file per worker process
            out = work / f"llama_ms_j{jobs}"
            steps.append(Step(f"HF→MS folder -j {jobs}", fwd + ["--output_path", f"{out}/", "--dtype", "bf16",
                                                                "--max_shard_size", "300MB", "-j", str(jobs)],
                              src, out, "ms:bf16", largest, WALL_SAME))
    back_argv = CONVERT + ["--model", "llama", "--reversed", "--config_path", str(src), "--no-progress"]
    steps.append(Step("MS→HF bf16 folder", back_argv + ["--input_path", str(ckpt16), "--output_path", f"{back}/"],
                      ckpt16, back, "hf:bf16", largest, WALL_SAME, rival="MF MS→HF bf16 .bin"))
    if main:  # the fp16 .ckpt back to bf16: a cast on the way back
        ckpt_fp16, back_cast = work / "llama_fp16.ckpt", work / "hf_back_cast"
        steps.append(Step("MS→HF fp16→bf16", back_argv + ["--input_path", str(ckpt_fp16), "--output_path",
                                                          f"{back_cast}/", "--dtype", "bf16"],
                          ckpt_fp16, back_cast, "hf:fp16>bf16", largest, WALL_CAST))
    if mindformers:
        mf = [str(MF_PYTHON), str(BENCH / "run_mindformers.py")]
        mf_ckpt, mf_bin = work / "mf_bf16.ckpt", work / "mf_back.bin"
        steps += [Step("MF HF→MS bf16", mf + ["forward", f"{src}/", str(mf_ckpt), "--dtype", "bf16"], src, mf_ckpt,
                       "ckpt:bf16", largest, ours=False, repeat=False, cwd=work),
                  Step("MF MS→HF bf16 .bin", mf + ["reverse", str(ckpt16), str(mf_bin), "--dtype", "bf16"], ckpt16,
                       mf_bin, "bin:bf16", largest, ours=False, repeat=False, cwd=work)]
    return steps


def once_steps(work: Path, mindformers: bool) -> list[Step]:
    """Start-up costs (MindFormers' when `mindformers`) and the 70B-shaped --dry-run (headers only)."""
    big = source_folder(LLAMA70B)
    steps = [Step("startup (--help)", CONVERT + ["--help"], None),
             Step("dry-run 70B (sparse)", CONVERT + ["--model", "llama", "--input_path", str(big), "--output_path",
                                                     str(work / "llama70b.ckpt"), "--dtype", "bf16", "--dry-run"],
                  big)]
    if mindformers:
        steps.append(Step("MF startup (import)", [str(MF_PYTHON), str(BENCH / "run_mindformers.py"), "--check"],
                          None, ours=False, repeat=False, cwd=work))
    return steps


# ---------------------------------------------------------------- one model


@dataclass
class ModelResult:
    model: Model
    src: Path
    source_bytes: int
    tensors: int
    largest: int
    steps: list[Step]
    problems: list[str]


def tensor_sizes(folder: Path) -> dict[str, int]:
    """name → bytes, from the safetensors headers (read here without the converter)."""
    sizes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()})
    return sizes


def bench_model(model: Model, main: bool, args, work: Path) -> ModelResult:
    src = source_folder(model)
    sizes = tensor_sizes(src)
    largest = max(sizes.values())
    steps = model_steps(src, work, largest, main, args.mindformers)
    print(f"\n{model.label}: {len(sizes)} tensors, {folder_bytes(src) / MIB:,.1f} MiB; warm-up read "
          f"{warm(src):.2f} s; load average {load()}", flush=True)
    for rep in range(args.repeat):
        for s in steps:
            if s.repeat or rep == 0:
                settle(s, steps)
                s.runs.append(s.run(work))
                r = s.runs[-1]
                print(f"  run {rep + 1}/{args.repeat}  {s.name:<22} {r.wall:7.2f} s  cpu {r.cpu:6.2f} s  "
                      f"rss {r.rss / MIB:7.1f} MiB  read {r.rchar / MIB:8.1f} MiB", flush=True)
    for s in steps:
        if s.ours:
            evict(s.source)
            s.cold = s.run(work)
    print(f"  load average after: {load()}", flush=True)
    problems = [] if args.no_check else check(src, steps)
    return ModelResult(model, src, folder_bytes(src), len(sizes), largest, steps, problems)


def settle(step: Step, steps: list[Step]) -> None:
    """Untimed, before a run: the other steps' outputs leave the page cache (a cache filled with them makes
    every later write reclaim pages first: the last steps ran ≈ 25 % slower), this step's input is warm."""
    for other in steps:
        if other.output is not None and other.output != step.source and other.output.exists():
            evict(other.output)
    if step.source is not None:
        warm(step.source)


def check(src: Path, steps: list[Step]) -> list[str]:
    start = time.perf_counter()
    specs = [f"{s.check}:{s.output}" for s in steps if s.check]
    proc = subprocess.run([sys.executable, str(BENCH / "check_outputs.py"), str(src), *specs], cwd=REPO,
                          capture_output=True, text=True)
    problems = proc.stdout.splitlines()
    if proc.returncode and not problems or proc.returncode not in (0, 1):  # it crashed
        problems.append(f"check_outputs exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    verdict = "WRONG OUTPUT" if problems else "OK, every tensor of every output matches the source"
    print(f"  output check of {len(specs)} outputs ({time.perf_counter() - start:.1f} s): {verdict}", flush=True)
    return problems


# ---------------------------------------------------------------- report


@dataclass
class Row:
    figures: dict
    targets: list[tuple[str, bool]]

    def text(self) -> str:
        f = self.figures
        cells = [f"{f['step']:<22}", f"{f['wall_s']:8.2f}", f"{f['cpu_s']:7.2f}", f"{f['peak_rss_bytes'] / MIB:9.0f}",
                 _cell(f.get("read_per_source"), 7), _cell(f.get("cold_read_per_source"), 7),
                 _cell(f.get("ratio_to_cp"), 6), _cell(f.get("ratio_to_cp_per_byte"), 6),
                 _cell(f.get("mindformers_over_ours"), 6, ".1f")]
        marks = "; ".join(f"{label} {'pass' if ok else 'FAIL'}" for label, ok in self.targets)
        return " ".join(cells) + (f"   {marks}" if marks else "")


HEAD = (f"{'step':<22} {'wall s':>8} {'cpu s':>7} {'RSS MiB':>9} {'read÷src':>7} {'cold÷src':>7} {'×cp':>6} "
        f"{'×cp/B':>6} {'MF÷us':>6}   targets")


def _cell(value, width: int, fmt: str = ".2f") -> str:
    return f"{value:{width}{fmt}}" if value is not None else " " * width


def model_rows(res: ModelResult, startup: Run | None) -> list[Row]:
    by_name = {s.name: s for s in res.steps}
    cp = by_name["cp -r"]
    cp_rate = res.source_bytes / cp.wall
    base = startup.rchar if startup else 0
    rows = []
    for s in res.steps:
        written = folder_bytes(s.output) if s.output is not None else 0
        read_src = folder_bytes(s.source)
        f = {"model": res.model.label, "model_bytes": res.source_bytes, "largest_tensor": res.largest,
             "step": s.name, "ours": s.ours, "wall_s": s.wall, "cpu_s": s.cpu, "peak_rss_bytes": s.rss,
             "rchar": s.rchar, "read_per_source": max(s.rchar - (base if s.ours else 0), 0) / read_src,
             "written_bytes": written, "ratio_to_cp": s.wall / cp.wall,
             "ratio_to_cp_per_byte": s.wall / (max(written, read_src) / cp_rate), "runs": [r.__dict__ for r in s.runs]}
        targets = []
        if s.cold is not None:
            f["cold_read_bytes"] = s.cold.read_bytes
            f["cold_read_per_source"] = s.cold.read_bytes / read_src
            f["cold"] = s.cold.__dict__
            limit = read_src * (1 + READ_SLACK[0]) + READ_SLACK[1]
            targets.append(("read once", max(s.rchar - base, s.cold.read_bytes) <= limit))
        if s.wall_factor:
            targets.append((f"≤{s.wall_factor:g}×cp/B", f["ratio_to_cp_per_byte"] <= s.wall_factor))
        if s.ours:
            limit = RSS_FACTOR * s.largest + RSS_SLACK
            targets.append((f"RSS≤{limit / MIB:.0f}", s.rss <= limit))
        if s.rival in by_name:
            f["mindformers_over_ours"] = by_name[s.rival].wall / s.wall
            targets.append((f"≥{MF_SPEEDUP}×MF", f["mindformers_over_ours"] >= MF_SPEEDUP))
        rows.append(Row(f, targets))
    return rows


def once_rows(steps: list[Step]) -> list[Row]:
    rows = []
    for s in steps:
        f = {"model": "-", "step": s.name, "ours": s.ours, "wall_s": s.wall, "cpu_s": s.cpu,
             "peak_rss_bytes": s.rss, "rchar": s.rchar, "runs": [r.__dict__ for r in s.runs]}
        targets = []
        if s.name.startswith("dry-run"):
            f["model_bytes"] = folder_bytes(s.source)
            f["read_per_source"] = s.rchar / f["model_bytes"]
            targets.append((f"<{DRY_RUN_LIMIT:g} s", s.wall < DRY_RUN_LIMIT))
        rows.append(Row(f, targets))
    return rows


def report(once: list[Row], models: list[tuple[ModelResult, list[Row]]], repeat: int) -> list[str]:
    lines = [f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()}; median of {repeat} run(s) "
             f"(MindFormers: 1); warm page cache", "", HEAD, "-" * (len(HEAD) + 40)]
    lines += [r.text() for r in once]
    for res, rows in models:
        lines += ["", f"{res.model.label}: {res.source_bytes / MIB:,.0f} MiB bf16, {res.tensors} tensors, largest "
                      f"{res.largest / MIB:,.0f} MiB"]
        lines += [r.text() for r in rows]
    lines += ["",
              "read÷src: bytes the process read (rchar: read/pread/copy_file_range; mmap not counted) over the",
              "  bytes of its input, start-up's reads subtracted for ours; cold÷src: bytes read from storage",
              "  (mmap included) in an extra run with the input evicted from the page cache. MindFormers' rows",
              "  include its imports' reads (~80 MiB) and leave out its mmap of the safetensors source.",
              "×cp: wall over cp's; ×cp/B: over the time cp takes for as many bytes as the step reads or writes",
              "  (the fp32 output is twice the source). MF÷us: MindFormers' wall over ours, same input and direction.",
              "RSS: peak (ru_maxrss) of the child; targets: 2 × the largest tensor handled + 300 MiB."]
    return lines


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return f"{os.cpu_count()} cores {cpu}, {mem / (1 << 30):.0f} GiB RAM, Linux {platform.release()}"


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small model, under a minute (CI smoke)")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="our steps and cp N times, median")
    p.add_argument("--no-mindformers", dest="mindformers", action="store_false",
                   help="leave MindFormers' converter out (it is left out anyway when its venv is missing)")
    p.add_argument("--keep", action="store_true", help="keep the outputs (benchmarks/.cache/run-*)")
    p.add_argument("--no-check", action="store_true", help="skip the tensor-by-tensor check of the outputs")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed too")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--plot", metavar="PNG", help="time and peak RSS against model size (matplotlib, from the "
                                                  "MindFormers venv; implies a JSON file beside it)")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be ≥ 1")
    if args.mindformers and not MF_PYTHON.exists():
        print(f"MindFormers is left out: no {MF_PYTHON} (make bench-venv sets it up)")
        args.mindformers = False

    models = [QUICK] if args.quick else [TINYLLAMA, QUICK, TINYLLAMA_HALF, LLAMA7B_2L, LLAMA7B_4L]
    compile_package()
    work = CACHE / f"run-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        print(f"load average {load()}; this process's RSS {own_rss() / MIB:.0f} MiB "
              f"(the floor of every child's peak RSS)", flush=True)
        once = once_steps(work, args.mindformers and not args.quick)
        for s in once:
            for _ in range(args.repeat if s.repeat else 1):
                s.runs.append(s.run(work))
        startup = once[0].runs[0]
        results = []
        for model in models:
            model_work = work / model.label
            model_work.mkdir()
            res = bench_model(model, model is models[0], args, model_work)
            results.append((res, model_rows(res, startup)))
            if not args.keep:
                shutil.rmtree(model_work, ignore_errors=True)
        rows = once_rows(once)
        lines = report(rows, results, args.repeat)
        print("\n" + "\n".join(lines))
        problems = [f"{res.model.label}: {line}" for res, _ in results for line in res.problems]
        misses = [f"{r.figures['model']} {r.figures['step']}: {label}" for r in rows + [r for _, rs in results
                  for r in rs] for label, ok in r.targets if not ok]
        print(f"\ntargets missed: {len(misses)}" + "".join(f"\n  {m}" for m in misses))
        for line in problems:
            print(f"WRONG OUTPUT {line}")
        json_path = args.json or (str(Path(args.plot).with_suffix(".json")) if args.plot else None)
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps({
                "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "quick": args.quick,
                "repeat": args.repeat, "rows": [r.figures for r in rows] + [r.figures for _, rs in results for r in rs],
                "targets_missed": misses, "output_problems": problems, "table": lines}, indent=1))
            print(f"figures: {json_path}")
        if args.plot:
            plot(json_path, args.plot)
        if problems:
            return 1
        return 1 if args.strict and misses else 0
    finally:
        if args.keep:
            print(f"\noutputs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def compile_package() -> None:
    """Byte-compile our modules once, as installing a package does: start-up is then timed as users see it,
    also where PYTHONDONTWRITEBYTECODE is set (the children would otherwise compile every module each run)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "mindformers_conv"), str(REPO / "models"),
                    str(REPO / "convert_weight.py")], check=True, stdout=subprocess.DEVNULL)


def plot(json_path: str, png: str) -> None:
    if not MF_PYTHON.exists():
        print(f"no plot: matplotlib lives in {MF_PYTHON.parent.parent} (make bench-venv)")
        return
    subprocess.run([str(MF_PYTHON), str(BENCH / "plot.py"), json_path, png], check=True)
    print(f"plot: {png}")


if __name__ == "__main__":
    sys.exit(main())
