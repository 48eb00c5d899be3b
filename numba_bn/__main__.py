"""``python -m numba_bn``: a short training demo, checked against float64 NumPy.

A few training steps of ``BatchNorm2d`` (forward and backward) on synthetic
data, then eval, on the CPU and, when one is usable, the GPU. Prints what it
did, the largest relative difference from a float64 NumPy batch norm and the
time per step; exits with status 1 if a check fails.
"""
import argparse
import sys
import time

import numba
import numpy as np

import numba_bn as nbn
from numba_bn._dispatch import backend_named

TOLERANCE = 1e-5  # float32 output against float64


def float64_batch_norm(x, dy, weight, bias, eps):
    """Training-mode y and dx in float64, the plain textbook way."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    axes = (0, 2, 3)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    w = weight.reshape(1, -1, 1, 1).astype(np.float64)
    y = xhat * w + bias.reshape(1, -1, 1, 1)
    g = dy * w
    dx = (g - g.mean(axis=axes, keepdims=True)
          - xhat * (g * xhat).mean(axis=axes, keepdims=True)) / np.sqrt(var + eps)
    return y, dx


def relative_error(actual, expected):
    return float(np.abs(np.asarray(actual, np.float64) - expected).max()
                 / max(np.abs(expected).max(), 1e-30))


def gpu_usable():
    """A real GPU (the simulator would take minutes over these shapes)."""
    if numba.config.ENABLE_CUDASIM:
        return False
    try:
        from numba import cuda
        return cuda.is_available()
    except Exception:  # numba-cuda missing, or no driver
        return False


def run(device, shape, steps, seed):
    """Train ``steps`` steps and evaluate once on ``device``; return the worst error."""
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    bn = nbn.BatchNorm2d(c, device=device)
    bn.load_state_dict({"weight": rng.uniform(0.5, 1.5, c),
                        "bias": rng.normal(0, 0.1, c)}, strict=False)
    weight, bias = bn.state_dict()["weight"], bn.state_dict()["bias"]
    backend = backend_named(device)  # CuPy arrays on the GPU when installed
    to_device, to_host = backend.from_host, backend.to_host
    worst, times = 0.0, []
    for step in range(steps):
        # per-channel means far from 0, as after a ReLU/conv stack
        x = rng.normal(rng.uniform(-5, 50, (1, c, 1, 1)), 2.0, shape).astype(np.float32)
        dy = rng.normal(0, 1, shape).astype(np.float32)
        xd, dyd = to_device(x), to_device(dy)
        start = time.perf_counter()
        y = bn(xd)
        dx = bn.backward(dyd)
        y, dx = to_host(y), to_host(dx)  # the copy waits for the GPU
        times.append(time.perf_counter() - start)
        y_ref, dx_ref = float64_batch_norm(x, dy, weight, bias, bn.eps)
        errors = relative_error(y, y_ref), relative_error(dx, dx_ref)
        worst = max(worst, *errors)
        print(f"  [{device}] train step {step + 1}: y error {errors[0]:.2e}, "
              f"dx error {errors[1]:.2e}, "
              f"running_mean[0] {float(bn.state_dict()['running_mean'][0]):.4f}")
    bn.eval()
    x = rng.normal(20, 2, shape).astype(np.float32)
    y = to_host(bn(to_device(x)))
    state = bn.state_dict()
    y_ref = ((x - state["running_mean"].reshape(1, -1, 1, 1))
             / np.sqrt(state["running_var"].reshape(1, -1, 1, 1).astype(np.float64) + bn.eps)
             * weight.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1))
    eval_error = relative_error(y, y_ref)
    worst = max(worst, eval_error)
    print(f"  [{device}] eval: y error {eval_error:.2e} "
          f"(num_batches_tracked = {int(state['num_batches_tracked'])})")
    steady = times[1:] or times  # the first step may compile kernels
    print(f"  [{device}] {1e3 * float(np.median(steady)):.2f} ms per training step "
          f"(forward + backward, {shape}, float32, median of {len(steady)})")
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m numba_bn", description=__doc__)
    parser.add_argument("--shape", type=int, nargs=4, default=[16, 32, 28, 28],
                        metavar=("N", "C", "H", "W"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if gpu_usable() else [])
    print(f"numba_bn {nbn.__version__}: BatchNorm2d, {args.steps} training steps "
          f"then eval, on {', '.join(devices)}"
          + ("" if "cuda" in devices else " (no usable GPU)"))
    failed = False
    for device in devices:
        worst = run(device, tuple(args.shape), args.steps, args.seed)
        ok = worst <= TOLERANCE
        failed |= not ok
        print(f"  [{device}] largest relative difference from float64: {worst:.2e} "
              f"({'ok' if ok else 'FAILED'}, tolerance {TOLERANCE:.0e})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
