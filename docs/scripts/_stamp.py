"""The caption every generated figure carries: date, machine, versions."""
import datetime
import os
import platform

import numba
import numpy as np

import numba_bn

FIGURES = os.path.join(os.path.dirname(__file__), os.pardir, "figures")
DATA = os.path.join(os.path.dirname(__file__), os.pardir, "_data")


def stamp(fig, script, extra=""):
    """Write the provenance line at the bottom of ``fig``."""
    text = (f"{datetime.date.today()} · docs/scripts/{script} · "
            f"numba_bn {numba_bn.__version__}, numba {numba.__version__}, "
            f"numpy {np.__version__}{extra} · {platform.machine()}, "
            f"{os.cpu_count()} cores")
    fig.text(0.01, 0.005, text, fontsize=6, color="0.4", ha="left",
             va="bottom")


def save(fig, name):
    """Save ``fig`` as ``docs/figures/<name>.png``."""
    os.makedirs(FIGURES, exist_ok=True)
    path = os.path.join(FIGURES, f"{name}.png")
    fig.savefig(path, dpi=110)
    print("wrote", os.path.normpath(path))
