"""Figures of the guide pages: the per-channel slice of an (N, C, H, W)
tensor, and running statistics converging over training steps.

Run from the repository root: ``python docs/scripts/make_figures.py``.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import numba_bn as nbn  # noqa: E402
from numba_bn import megengine  # noqa: E402
from _stamp import save, stamp  # noqa: E402


def channel_slice(n_samples=3, n_channels=5, size=4):
    """The planes of an (N, C, H, W) tensor as a grid, one row per sample;
    channel 2's planes, in every sample, share one mean and one variance."""
    fig, ax = plt.subplots(figsize=(8, 4.4))
    step = size + 1.5
    for n in range(n_samples):
        for c in range(n_channels):
            x0, y0 = c * step, (n_samples - 1 - n) * step
            chosen = c == 2
            ax.add_patch(Rectangle((x0, y0), size, size,
                                   facecolor="tab:orange" if chosen
                                   else "tab:blue",
                                   alpha=0.75 if chosen else 0.15,
                                   edgecolor="0.3", linewidth=0.6))
            for k in range(1, size):  # the H x W values of the plane
                ax.plot([x0 + k, x0 + k], [y0, y0 + size], color="0.5",
                        lw=0.3)
                ax.plot([x0, x0 + size], [y0 + k, y0 + k], color="0.5",
                        lw=0.3)
        ax.text(-0.6, (n_samples - 1 - n) * step + size / 2, f"n = {n}",
                ha="right", va="center")
    for c in range(n_channels):
        ax.text(c * step + size / 2, n_samples * step - 0.9, f"c = {c}",
                ha="center")
    ax.add_patch(Rectangle((2 * step - 0.5, -0.5), size + 1,
                           n_samples * step - 0.5, fill=False,
                           edgecolor="tab:orange", linewidth=2))
    ax.text(2 * step + size / 2, -1.6,
            "channel 2: one mean and variance over N·H·W = "
            f"{n_samples * size * size} values;\none γ, β, running mean, "
            "running variance", ha="center", va="top", color="tab:orange")
    ax.set_xlim(-3, n_channels * step)
    ax.set_ylim(-4.2, n_samples * step + 0.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"BatchNorm2d({n_channels}) on (N, C, H, W) = "
                 f"({n_samples}, {n_channels}, {size}, {size}): each square "
                 "is one H × W plane")
    stamp(fig, "make_figures.py")
    save(fig, "channel_slice")
    plt.close(fig)


def running_statistics(steps=60, batch=16):
    """Running mean and variance of one channel over training steps, for
    PyTorch's momentum 0.1 (= MegEngine's 0.9) and momentum=None, against
    the true mean 3 and variance 4 of the data."""
    rng = np.random.default_rng(0)
    modules = {"momentum=0.1": nbn.BatchNorm1d(1, momentum=0.1),
               "momentum=None (cumulative)": nbn.BatchNorm1d(1, momentum=None),
               "megengine momentum=0.9": megengine.BatchNorm1d(1)}
    history = {name: ([], []) for name in modules}
    for _ in range(steps):
        x = rng.normal(3.0, 2.0, (batch, 1)).astype(np.float32)
        for name, bn in modules.items():
            bn(x)
            history[name][0].append(float(bn.running_mean[0]))
            history[name][1].append(float(bn.running_var[0]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    styles = {"momentum=0.1": "-", "momentum=None (cumulative)": "--",
              "megengine momentum=0.9": ":"}
    for (name, (means, variances)) in history.items():
        axes[0].plot(means, styles[name], label=name)
        axes[1].plot(variances, styles[name], label=name)
    axes[0].axhline(3.0, color="0.5", lw=0.8)
    axes[1].axhline(4.0, color="0.5", lw=0.8)
    axes[0].set_title("running_mean (true mean 3)")
    axes[1].set_title("running_var, unbiased (true variance 4)")
    for ax in axes:
        ax.set_xlabel("training step (batch of 16)")
    axes[0].legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    stamp(fig, "make_figures.py")
    save(fig, "running_statistics")
    plt.close(fig)


if __name__ == "__main__":
    channel_slice()
    running_statistics()
