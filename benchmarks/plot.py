"""Plot bench_convert.py's JSON: wall time and peak RSS against model size, ours and MindFormers'.

    benchmarks/.venv-mindformers/bin/python benchmarks/plot.py FIGURES.json OUT.png

matplotlib lives in the benchmark venv only; it is never a dependency of mindformers-conv.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

GIB, MIB = 1 << 30, 1 << 20
SERIES = [("HF→MS bf16 .ckpt", "ours HF→MS", "C0", "o-"), ("MS→HF bf16 folder", "ours MS→HF", "C0", "s--"),
          ("MF HF→MS bf16", "MindFormers HF→MS", "C3", "o-"), ("MF MS→HF bf16 .bin", "MindFormers MS→HF", "C3", "s--"),
          ("cp -r", "cp -r", "0.5", ".:")]


def main() -> int:
    figures = json.load(open(sys.argv[1]))
    rows = [r for r in figures["rows"] if r.get("model_bytes") and r["model"] != "-"]
    fig, (time_ax, rss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for step, label, color, style in SERIES:
        points = sorted((r["model_bytes"] / GIB, r["wall_s"], r["peak_rss_bytes"] / MIB)
                        for r in rows if r["step"] == step)
        if not points:
            continue
        size, wall, rss = zip(*points)
        time_ax.plot(size, wall, style, color=color, label=label)
        if step != "cp -r":  # cp's RSS is the measuring process's own floor
            rss_ax.plot(size, rss, style, color=color, label=label)
    time_ax.set(xlabel="model size (GiB, bf16)", ylabel="wall time (s)", xscale="log", yscale="log",
                title="wall time, warm page cache")
    rss_ax.set(xlabel="model size (GiB, bf16)", ylabel="peak RSS (MiB)", xscale="log", yscale="log", title="peak RSS")
    for ax in (time_ax, rss_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    fig.suptitle(f"mindformers-conv vs MindFormers v1.3.2 (llama, bf16) — {figures['date']}, {figures['machine']}",
                 fontsize=8)
    handles, labels = time_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    models = ", ".join(f"{m} {size:.2f}" for size, m in sorted({(r["model_bytes"] / GIB, r["model"]) for r in rows}))
    fig.text(0.5, 0.065, f"models (GiB): {models}", ha="center", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.1, 1, 0.97))
    fig.savefig(sys.argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
