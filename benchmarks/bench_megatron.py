#!/usr/bin/env python3
"""Benchmark: HF ↔ Megatron (TP=2, PP=2) on the TinyLlama-1.1B-shaped bf16 synthetic llama.

    .venv/bin/python benchmarks/bench_megatron.py            # full size (~2.2 GB), every step 3 times (median)
    .venv/bin/python benchmarks/bench_megatron.py --quick    # small shape, smoke run

Same method as bench_convert.py (its cached source, warm page cache, one child process per step, wall /
CPU / peak RSS from os.wait4). Steps: `cp -r` (the yardstick), HF → Megatron TP 2 PP 2, Megatron →
HF (layout discovered), Megatron TP 2 PP 2 → TP 1 PP 1 (reshard). The HF output is then compared byte
for byte with the source by the `safetensors` library. HF → Megatron must take ≤ 2 × cp's wall; peak RSS
must stay under 2 × the largest tensor + 300 MiB: the converter holds at most one full tensor and its
slices, never a stage or the model (llama's steps hold none: row blocks and column pieces of the files
go file to file, torch is never imported).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_convert import RSS_FACTOR, RSS_SLACK, compile_package, tensor_sizes  # noqa: E402
from harness import MIB, folder_bytes, load, run_child, warm  # noqa: E402
from sources import CACHE, QUICK, TINYLLAMA, source_folder  # noqa: E402


def steps(src: Path, work: Path) -> list[tuple[str, list[str], Path]]:
    conv = [sys.executable, str(REPO / "convert_weight.py"), "--model", "llama", "--no-progress"]
    mg, back, flat = work / "megatron_tp2_pp2", work / "hf_back", work / "megatron_tp1"
    half = str(json.loads((src / "config.json").read_text())["num_hidden_layers"] // 2)
    return [
        ("cp -r", ["cp", "-r", str(src), str(work / "cp_copy")], work / "cp_copy"),
        ("HF→Megatron TP2 PP2", conv + ["--input_path", str(src), "--output_path", str(mg), "--target", "megatron",
                                        "--tp", "2", "--llm_pp_layers", f"{half},{half}"], mg),
        ("Megatron→HF", conv + ["--reversed", "--input_path", str(mg), "--output_path", f"{back}/",
                                "--config_path", str(src)], back),
        ("reshard → TP1 PP1", conv + ["--input_path", str(mg), "--output_path", str(flat), "--target", "megatron",
                                      "--tp", "1", "--llm_pp_layers", str(2 * int(half)), "--config_path", str(src)],
         flat),
    ]


def check_back(src: Path, back: Path) -> list[str]:
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                out.update({k: (file, k) for k in f.keys()})
        return out

    a, b = tensors(src), tensors(back)
    problems = [f"missing in the HF output: {n}" for n in sorted(a.keys() - b.keys())]
    for name in sorted(a.keys() & b.keys()):
        with safe_open(a[name][0], "pt") as fa, safe_open(b[name][0], "pt") as fb:
            if not fa.get_tensor(name).view(-1).view(dtype=__import__("torch").uint8).equal(
                    fb.get_tensor(name).view(-1).view(dtype=__import__("torch").uint8)):
                problems.append(f"differs: {name}")
    return problems


CP_FACTOR = 2  # issue #7: HF → Megatron TP 2 PP 2 within 2 × cp of the same bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape (smoke run)")
    parser.add_argument("--repeat", type=int, default=3, metavar="N", help="every step N times, interleaved; median")
    args = parser.parse_args()
    src = source_folder(QUICK if args.quick else TINYLLAMA)
    largest = max(tensor_sizes(src).values())
    work = CACHE / "megatron-work"
    compile_package()
    warm(src)
    model = folder_bytes(src)
    print(f"source: {src.name}, {model / MIB:.0f} MiB, largest tensor {largest / MIB:.0f} MiB; load average {load()}")
    runs: dict[str, list] = {}
    sizes: dict[str, int] = {}
    for _ in range(args.repeat):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for name, argv, out in steps(src, work):
            os.sync()
            runs.setdefault(name, []).append(run_child(argv, work / f"{name.split()[0]}.log"))
            sizes[name] = folder_bytes(out)
    print(f"{'step':<22} {'wall s':>8} {'cpu s':>8} {'peak RSS MiB':>13} {'× cp':>6} {'output MiB':>11}   "
          f"(median of {args.repeat})")
    failures = []
    bound = RSS_FACTOR * largest + RSS_SLACK
    cp = statistics.median(r.wall for r in runs["cp -r"])
    for name, done in runs.items():
        wall, cpu = statistics.median(r.wall for r in done), statistics.median(r.cpu for r in done)
        rss = max(r.rss for r in done)
        print(f"{name:<22} {wall:8.2f} {cpu:8.2f} {rss / MIB:13.0f} {wall / cp:6.2f} {sizes[name] / MIB:11.0f}")
        if name != "cp -r" and rss > bound:
            failures.append(f"{name}: peak RSS {rss / MIB:.0f} MiB > {bound / MIB:.0f} MiB")
        if name.startswith("HF→Megatron") and wall > CP_FACTOR * cp and not args.quick:
            failures.append(f"{name}: {wall / cp:.2f} × cp > {CP_FACTOR} × cp")
    failures += check_back(src, work / "hf_back")
    for line in failures:
        print(f"FAIL {line}")
    if not failures:
        print(f"ok: Megatron→HF is byte-identical to the source; every peak RSS ≤ {bound / MIB:.0f} MiB "
              f"(2 × largest tensor + 300 MiB)" + ("" if args.quick else f"; HF→Megatron ≤ {CP_FACTOR} × cp"))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
