"""Hard-input accuracy of numba_bn and PyTorch against a float64 reference.

Inputs whose per-channel mean is far larger than their spread (mean 1e4,
std 1, float32) are where ``E[x**2] - E[x]**2`` and float32 accumulators
lose the variance. For each case the script prints and saves (to
``docs/_data/accuracy.csv``, which the accuracy page includes) the largest
error of the training-forward output relative to the output's scale, and
draws ``docs/figures/accuracy.png``.

Run from the repository root: ``python docs/scripts/accuracy.py``.
"""
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import numba_bn as nbn  # noqa: E402
from _stamp import DATA, save, stamp  # noqa: E402

SHAPE = (32, 64, 56, 56)  # the benchmark's large shape: 100352 values a channel
CASES = [(1e4, 1.0), (1e3, 1.0), (1e2, 1.0), (0.0, 1.0)]


def reference(x):
    """Training-forward output in float64, two-pass statistics."""
    x = x.astype(np.float64)
    axes = (0, 2, 3)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5)


def make_input(mean, std, layout, rng):
    n, c, h, w = SHAPE
    nhwc = rng.normal(mean, std, (n, h, w, c)).astype(np.float32)
    x = nhwc.transpose(0, 3, 1, 2)
    return x if layout == "channels_last" else np.ascontiguousarray(x)


def errors(x):
    """Max |y - y_ref| / max |y_ref| for numba_bn and torch, same input."""
    ref = reference(x)
    scale = np.abs(ref).max()
    ours = nbn.BatchNorm2d(SHAPE[1])(x)
    fmt = (torch.channels_last if not x.flags.c_contiguous
           else torch.contiguous_format)
    xt = torch.from_numpy(np.ascontiguousarray(x)).contiguous(
        memory_format=fmt)
    with torch.no_grad():
        theirs = torch.nn.BatchNorm2d(SHAPE[1])(xt).numpy()
    return (np.abs(ours - ref).max() / scale,
            np.abs(theirs - ref).max() / scale)


def main():
    rng = np.random.default_rng(0)
    rows = []
    for mean, std in CASES:
        for layout in ("nchw", "channels_last"):
            ours, theirs = errors(make_input(mean, std, layout, rng))
            rows.append({"mean": f"{mean:g}", "std": f"{std:g}",
                         "layout": layout, "numba_bn": f"{ours:.1e}",
                         "torch": f"{theirs:.1e}"})
            print(rows[-1])
    os.makedirs(DATA, exist_ok=True)
    path = os.path.join(DATA, "accuracy.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("wrote", os.path.normpath(path))

    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = [f"mean {r['mean']}\n{r['layout']}" for r in rows]
    where = np.arange(len(rows))
    ax.bar(where - 0.2, [float(r["numba_bn"]) for r in rows], 0.4,
           label="numba_bn")
    ax.bar(where + 0.2, [float(r["torch"]) for r in rows], 0.4,
           label=f"PyTorch {torch.__version__} (CPU)")
    ax.set_yscale("log")
    ax.set_xticks(where, labels, fontsize=7)
    ax.set_ylabel("max error / max |y|")
    ax.axhline(1e-6, color="0.5", lw=0.8, ls="--")
    ax.set_title(f"Training forward, float32 {SHAPE}, std 1, against float64")
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    stamp(fig, "accuracy.py", f", torch {torch.__version__}")
    save(fig, "accuracy")
    plt.close(fig)


if __name__ == "__main__":
    main()
