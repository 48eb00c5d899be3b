"""Performance figures from the comparison command's machine-readable output.

Reads ``docs/_data/bench_cpu.json``, written by::

    python -m numba_bn.bench --json docs/_data/bench_cpu.json

and draws ``docs/figures/bench_<dtype>.png``: per operation and case, the
time of numba_bn, JAX/XLA and NumPy relative to PyTorch's (log scale), and
numba_bn's share of the memory-bandwidth floor; it also writes the table
``docs/_data/bench_cpu.csv`` that the performance page shows. The date,
machine and versions come from the JSON, so a figure always says which run
it shows.

It also writes ``docs/_data/bench_fused.csv``, the fused cases' table of
the guide page "Fusing batch norm into your network", from
``docs/_data/bench_fused.json``, written by::

    python -m numba_bn.bench --cases fused --json docs/_data/bench_fused.json

and ``docs/_data/bench_mixed.csv``, the performance page's table of calls
whose arrays mix memory layouts, from ``docs/_data/bench_mixed.json``::

    python -m numba_bn.bench --cases mixed --json docs/_data/bench_mixed.json

Run from the repository root: ``python docs/scripts/plot_bench.py``.
"""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _stamp import DATA, save  # noqa: E402

OPERATIONS = ("train", "eval", "backward")
TITLES = {"train": "training forward", "eval": "eval forward",
          "backward": "backward"}
LABELS = {"numba_bn": "numba_bn", "jax": "JAX/XLA (jax.jit)", "numpy": "NumPy"}
COLORS = {"numba_bn": "C0", "jax": "C2", "numpy": "0.7"}


def case_label(case):
    shape = ",".join(str(s) for s in case["shape"])
    layout = " CL" if case["layout"] == "channels_last" else ""
    return f"({shape}){layout}"


def plot(run, dtype):
    cases = [c for c in run["cases"] if c["dtype"] == dtype]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4), sharey="row")
    for column, op in enumerate(OPERATIONS):
        mine = [c for c in cases if c["op"] == op]
        where = np.arange(len(mine))
        contenders = [name for name in ("numba_bn", "jax", "numpy")
                      if name in mine[0]["seconds"]]
        width = 0.8 / len(contenders)
        ax = axes[0, column]
        for i, name in enumerate(contenders):
            ax.bar(where + (i - (len(contenders) - 1) / 2) * width,
                   [c["seconds"][name] / c["seconds"]["torch"] for c in mine],
                   width, label=LABELS[name], color=COLORS[name])
        ax.axhline(1.0, color="k", lw=0.8, label="PyTorch")
        ax.set_yscale("log")
        ax.set_title(f"{TITLES[op]}: time / PyTorch's")
        ax.set_xticks(where, [case_label(c) for c in mine], rotation=60,
                      ha="right", fontsize=7)
        ax = axes[1, column]
        ax.bar(where, [100 * c["floor_share"] for c in mine], 0.6)
        ax.axhline(100, color="k", lw=0.8)
        ax.set_title(f"{TITLES[op]}: numba_bn, % of floor")
        ax.set_xticks(where, [case_label(c) for c in mine], rotation=60,
                      ha="right", fontsize=7)
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_ylabel("ratio (lower is faster)")
    axes[1, 0].set_ylabel("% (over 100: cache, or streaming stores)")
    versions = run["versions"]
    fig.suptitle(f"{dtype}, {run['threads']} threads, copy bandwidth "
                 f"{run['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (median; "
                 "each floor at its case's own) (CL = channels-last)")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.text(0.01, 0.005,
             f"{run['date']} · python -m numba_bn.bench --json · "
             f"docs/scripts/plot_bench.py · numba_bn {versions['numba_bn']}, "
             f"numba {versions['numba']}, numpy {versions['numpy']}, torch "
             f"{versions['torch']}, jax {versions.get('jax')} · {run['machine']}",
             fontsize=6, color="0.4", ha="left", va="bottom")
    save(fig, f"bench_{dtype}")
    plt.close(fig)


def write_table(run):
    """``bench_cpu.csv``: per case numba_bn's time, its ratios to PyTorch
    and JAX, and its share of the floor."""
    rows = ["operation,shape,dtype,layout,numba_bn (ms),vs PyTorch,vs JAX,"
            "% of floor"]
    for c in run["cases"]:
        jax = c.get("ratio_to_jax")
        rows.append(",".join([
            TITLES[c["op"]], '"(' + ", ".join(map(str, c["shape"])) + ')"',
            c["dtype"], "channels-last" if c["layout"] == "channels_last"
            else ("(N, C)" if len(c["shape"]) == 2 else "NCHW"),
            f"{c['seconds']['numba_bn'] * 1e3:.3f}",
            f"{c['ratio_to_torch']:.2f}x", "-" if jax is None else f"{jax:.2f}x",
            f"{100 * c['floor_share']:.0f}"]))
    path = os.path.join(DATA, "bench_cpu.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    print("wrote", os.path.normpath(path))


FUSED_TITLES = {"train+relu": "training forward, BN + ReLU",
                "train+add+relu": "training forward, BN + add + ReLU",
                "eval+relu": "eval forward, BN + ReLU",
                "backward+relu+add": "backward, ReLU + add + BN"}


def write_fused_table(run):
    """``bench_fused.csv``: per fused case the contenders' times, numba_bn's
    ratio to PyTorch's steps and its share of the fused pass's floor."""
    rows = ["operation,numba_bn fused,PyTorch steps,torch.compile,"
            "numba_bn + NumPy steps,vs PyTorch,% of floor"]
    for c in run["fused_cases"]:
        t = c["seconds"]

        def ms(name):
            return f"{t[name] * 1e3:.1f}" if name in t else "-"
        rows.append(",".join([
            '"' + FUSED_TITLES[c["op"]] + '"', ms("numba_bn"), ms("torch"),
            ms("torch.compile"), ms("numba_bn+numpy"),
            f"{c['ratio_to_torch']:.2f}x", f"{100 * c['floor_share']:.0f}"]))
    path = os.path.join(DATA, "bench_fused.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    print("wrote", os.path.normpath(path))


MIXED_TITLES = {"backward": "backward", "train": "training forward"}
MIXED_ARRAYS = {"backward": "x, dy, out", "train": "x, out"}
LAYOUT_NAMES = {"n": "NCHW", "c": "CL"}


def write_mixed_table(run):
    """``bench_mixed.csv``: per mixed-layout case the time with the arrays
    as given and with all of them in ``x``'s layout, and their ratio."""
    rows = ["operation,shape,dtype,arrays,layouts,as given (ms),"
            "all in x's layout (ms),ratio"]
    for c in run["mixed_layout_cases"]:
        t = c["seconds"]
        rows.append(",".join([
            MIXED_TITLES[c["op"]], '"' + "x".join(map(str, c["shape"])) + '"',
            c["dtype"], '"' + MIXED_ARRAYS[c["op"]] + '"',
            '"' + ", ".join(LAYOUT_NAMES[code] for code in c["layouts"]) + '"',
            f"{t['numba_bn'] * 1e3:.2f}", f"{t['matched'] * 1e3:.2f}",
            f"{c['ratio_to_matched']:.2f}x"]))
    path = os.path.join(DATA, "bench_mixed.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    print("wrote", os.path.normpath(path))


def main():
    with open(os.path.join(DATA, "bench_cpu.json")) as f:
        run = json.load(f)
    for dtype in sorted({c["dtype"] for c in run["cases"]}):
        plot(run, dtype)
    write_table(run)
    with open(os.path.join(DATA, "bench_fused.json")) as f:
        write_fused_table(json.load(f))
    with open(os.path.join(DATA, "bench_mixed.json")) as f:
        write_mixed_table(json.load(f))


if __name__ == "__main__":
    main()
