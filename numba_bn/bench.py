"""``python -m numba_bn.bench``: numba_bn against PyTorch, JAX and NumPy, side by side.

In one process, for training forward, eval forward and backward over the
shapes, dtypes and layouts below, it checks every result against PyTorch's
(when torch is importable) and then times the contenders interleaved
(A B C A B C ...), reporting medians: the time, the ratios to PyTorch and
to JAX/XLA (``jax.jit``, when JAX is installed: the ``bench`` extra), the
share of the memory-bandwidth floor (the tensor-sized passes an operation
must make, at the bandwidth of a copy timed right before) and page faults
per call (allocations over glibc's 32 MiB mmap threshold fault on every call;
``--out`` reuses output arrays). ``--quick`` is a short run for CI.

The speed targets are those of the project's issue tracker; the command
reports them and exits non-zero only when a result is wrong.
"""
import argparse
import json
import platform
import resource
import sys
import time

import numba
import numpy as np
from numba import njit, prange

import numba_bn as nbn
from numba_bn._dispatch import backend_named

SHAPES = [(32, 64, 56, 56), (256, 64, 14, 14), (32, 512, 7, 7),
          (8, 16, 32, 32), (1024, 256)]
QUICK_SHAPES = [(8, 16, 32, 32), (1024, 256)]
SMALL_CALL_SHAPES = [(8, 16, 32, 32), (1024, 256)]
OPERATIONS = ("train", "eval", "backward")
# Tensor-sized memory passes each operation needs at the least: training
# forward reads x twice and writes y; eval reads x and writes y; backward
# reads x and dy twice and writes dx.
PASSES = {"train": 3, "eval": 2, "backward": 5}
TARGET_RATIO = {("train", "nchw"): 0.5, ("train", "channels_last"): 0.9,
                ("eval", "nchw"): 0.9, ("eval", "channels_last"): 0.9,
                ("backward", "nchw"): 0.8, ("backward", "channels_last"): 0.8}
TARGET_FLOOR_SHARE = 0.85   # for tensors over FLOOR_MIN_BYTES
FLOOR_MIN_BYTES = 8e6
EPS = 1e-5


def target_ratio(op, shape, layout):
    """The issue's ceiling on numba_bn's time over PyTorch's for one case.

    The 0.5x training-forward target of NCHW data stands against PyTorch's
    scalar statistics loop over planes. An ``(N, C)`` input has no planes:
    its channel axis is innermost, and PyTorch runs its vectorized
    channels-last kernels on it ("NC11 is also channels last",
    ``aten/src/ATen/native/cpu/batch_norm_kernel.cpp``), so it takes the
    channels-last targets.
    """
    return TARGET_RATIO[(op, "channels_last" if len(shape) == 2 else layout)]


@njit(parallel=True, cache=True)
def _copy(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = src[i]


class CopyProbe:
    """Memory bandwidth from a parallel copy (read + write) of ``nbytes``,
    twice the 32 MiB L3 of the machines this was written on, so that it
    measures memory, not the cache.

    The bandwidth of these shared machines swings by 2x within seconds
    (copies of 43 and 77 GB/s a second apart), so the bench measures it
    right before each case rather than once per run. Not within the
    case's rounds: a 64 MiB copy between the contenders' samples changed
    their ratios (an eval of (256, 64, 14, 14) float32 went from 0.8-1.0x
    PyTorch's time to 1.15-1.2x).
    """

    def __init__(self, nbytes=64 << 20):
        self.src = np.ones(nbytes // 4, np.float32)
        self.dst = np.empty_like(self.src)
        _copy(self.src, self.dst)

    def bandwidth(self, repeats=5):
        """Bytes per second, the median of ``repeats`` copies."""
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _copy(self.src, self.dst)
            times.append(time.perf_counter() - start)
        return 2 * self.src.nbytes / float(np.median(times))


def layout_input(shape, dtype, layout, rng):
    """Standard-normal input; channels-last is ``nhwc.transpose(0, 3, 1, 2)``."""
    if layout == "channels_last":
        n, c, h, w = shape
        nhwc = rng.standard_normal((n, h, w, c), dtype=np.float64).astype(dtype)
        return nhwc.transpose(0, 3, 1, 2)
    return rng.standard_normal(shape, dtype=np.float64).astype(dtype)


class Case:
    """One operation on one input, with a callable per contender."""

    def __init__(self, op, shape, dtype, layout, use_out, torch, jax=None):
        rng = np.random.default_rng(0)
        c = shape[1]
        self.op, self.shape, self.dtype, self.layout = op, shape, dtype, layout
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        x = layout_input(shape, dtype, layout, rng)
        dy = layout_input(shape, dtype, layout, rng)
        w = rng.uniform(0.5, 1.5, c).astype(dtype)
        b = rng.normal(0, 0.1, c).astype(dtype)
        rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
        out = np.empty_like(x) if use_out else None
        _, save_mean, save_invstd = nbn.batch_norm_forward_training(x, w, b, EPS)
        self.contenders = {}
        if op == "backward":
            self.contenders["numba_bn"] = lambda: nbn.batch_norm_backward(
                dy, x, w, save_mean, save_invstd, out=out)[0]
            self.contenders["numpy"] = lambda: numpy_backward(dy, x, w)
        else:
            training = op == "train"
            self.contenders["numba_bn"] = lambda: nbn.batch_norm(
                x, rm, rv, w, b, training=training, eps=EPS, out=out)
            self.contenders["numpy"] = lambda: numpy_forward(
                x, rm, rv, w, b, training)
        if torch is not None:
            self.contenders["torch"] = torch_contender(
                torch, op, x, dy, w, b, rm.copy(), rv.copy(), layout)
        if jax is not None:
            self.contenders["jax"] = jax_contender(
                jax, op, x, dy, w, b, rm, rv, save_mean, save_invstd)

    def check(self):
        """Compare numba_bn's result with PyTorch's (or NumPy's); return the error."""
        return relative_error(
            self.contenders["numba_bn"](),
            self.contenders.get("torch", self.contenders["numpy"])())


def relative_error(ours, reference):
    """The largest difference from ``reference``, relative to its largest
    magnitude."""
    ours = np.asarray(ours, np.float64)
    reference = np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max()
                 / max(np.abs(reference).max(), 1e-30))


def numpy_forward(x, rm, rv, w, b, training):
    """Plain NumPy batch norm, the way one writes it without a library."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    else:
        mean, var = rm, rv
    return ((x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + EPS)
            * w.reshape(shape) + b.reshape(shape))


def numpy_backward(dy, x, w):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    invstd = (1 / np.sqrt(var + EPS)).reshape(shape)
    xhat = (x - mean.reshape(shape)) * invstd
    g = dy * w.reshape(shape)
    return invstd * (g - g.mean(axis=axes, keepdims=True)
                     - xhat * (g * xhat).mean(axis=axes, keepdims=True))


def torch_contender(torch, op, x, dy, w, b, rm, rv, layout):
    """PyTorch's CPU kernels on the same data and memory format."""
    fmt = (torch.channels_last if layout == "channels_last" and x.ndim == 4
           else torch.contiguous_format)
    # Copies, in every layout: with arrays shared (NCHW ones were), what
    # one contender left in the cache served the next, and the ratios of
    # some shapes moved by 1.5x either way.
    xt = torch.from_numpy(x.copy(order="C")).contiguous(memory_format=fmt)
    dyt = torch.from_numpy(dy.copy(order="C")).contiguous(memory_format=fmt)
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    rmt, rvt = torch.from_numpy(rm), torch.from_numpy(rv)
    if op == "backward":
        _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            xt, wt, bt, None, None, True, 0.1, EPS)

        def run():
            return torch.ops.aten.native_batch_norm_backward(
                dyt, xt, wt, None, None, save_mean, save_invstd, True, EPS,
                [True, True, True])[0].numpy()
        return run

    def run():
        with torch.no_grad():
            return torch.nn.functional.batch_norm(
                xt, rmt, rvt, wt, bt, training=op == "train", eps=EPS).numpy()
    return run


def load_jax():
    """JAX, with float64 enabled, when installed (the ``bench`` extra)."""
    try:
        import jax
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)
    return jax


def jax_contender(jax, op, x, dy, w, b, rm, rv, save_mean, save_invstd):
    """The same computation, ``jax.jit``-compiled by XLA for the CPU.

    JAX arrays have no strides: channels-last data is given to it as NHWC,
    its natural layout, with the channel axis last. Each call waits for the
    result (``block_until_ready``).
    """
    jnp = jax.numpy
    channels_last = x.ndim > 2 and x.strides[1] < x.strides[-1]
    order = (0,) + tuple(range(2, x.ndim)) + (1,) if channels_last else None
    channel_axis = x.ndim - 1 if channels_last else 1
    axes = tuple(a for a in range(x.ndim) if a != channel_axis)
    shape = tuple(-1 if a == channel_axis else 1 for a in range(x.ndim))

    def device(a):
        return jax.device_put(np.ascontiguousarray(
            a.transpose(order) if order else a))

    def per_channel(v, dtype):
        return jnp.asarray(v.astype(dtype)).reshape(shape)

    xj, dyj = device(x), device(dy)
    wj, bj = per_channel(w, x.dtype), per_channel(b, x.dtype)
    if op == "backward":
        mean = per_channel(save_mean, x.dtype)
        invstd = per_channel(save_invstd, x.dtype)

        @jax.jit
        def backward(dy, x):
            xhat = (x - mean) * invstd
            g = dy * wj
            return invstd * (g - g.mean(axis=axes, keepdims=True)
                             - xhat * (g * xhat).mean(axis=axes, keepdims=True))
        return lambda: backward(dyj, xj).block_until_ready()
    training = op == "train"
    rmj, rvj = per_channel(rm, x.dtype), per_channel(rv, x.dtype)

    @jax.jit
    def forward(x):
        if training:
            mean = x.mean(axis=axes, keepdims=True)
            var = x.var(axis=axes, keepdims=True)
        else:
            mean, var = rmj, rvj
        return (x - mean) * jax.lax.rsqrt(var + EPS) * wj + bj
    return lambda: forward(xj).block_until_ready()


def time_interleaved(contenders, rounds, min_sample=2e-3):
    """Median seconds per call of each contender, timed A B C A B C ...

    Each sample repeats a call enough times to last ``min_sample`` seconds
    (the same count for every contender). Also returns numba_bn's minor page
    faults per call.
    """
    # The count comes from calls repeated for a quarter of a sample, not
    # from one: a first call after other work (waking the thread pool,
    # inputs evicted) took up to 6x as long as the next ones, and cut
    # small cases' samples to a sixth of ``min_sample``.
    warm_calls = 0
    start = time.perf_counter()
    while time.perf_counter() - start < min_sample / 4:
        contenders["numba_bn"]()
        warm_calls += 1
    single = (time.perf_counter() - start) / warm_calls
    inner = max(1, int(min_sample / max(single, 1e-9)))
    samples = {name: [] for name in contenders}
    faults = calls = 0
    for _ in range(rounds):
        for name, fn in contenders.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
            if name == "numba_bn":
                faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                calls += inner
    return ({name: float(np.median(s)) for name, s in samples.items()},
            faults / calls)


def compiled_here():
    """Names of the CPU kernels this process compiled instead of loading
    them from Numba's cache.

    Parallel code that Numba has just compiled can run several times
    slower than the same code loaded from the cache (numba issue #10617;
    4x measured here on channels-last float32 passes), so timings taken in
    a process that compiled are not representative.
    """
    from numba_bn import cpu
    kernels = [value for value in vars(cpu).values()
               if isinstance(value, numba.core.registry.CPUDispatcher)]
    return sorted(kernel.__name__ for kernel in kernels
                  if kernel.stats.cache_misses)


def small_calls(torch, rounds):
    """Module call (validation, dispatch, launch) against PyTorch's module."""
    results = []
    for shape in SMALL_CALL_SHAPES:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        ours = (nbn.BatchNorm2d if len(shape) == 4 else nbn.BatchNorm1d)(shape[1])
        contenders = {"numba_bn": lambda: ours(x)}
        if torch is not None:
            theirs = (torch.nn.BatchNorm2d if len(shape) == 4
                      else torch.nn.BatchNorm1d)(shape[1])
            xt = torch.from_numpy(x)

            def run_torch():
                with torch.no_grad():
                    return theirs(xt)
            contenders["torch"] = run_torch
        times, _ = time_interleaved(contenders, rounds)
        results.append({"shape": list(shape), **{k: v for k, v in times.items()}})
    return results


# Fused batch norm + (residual add) + ReLU against the same steps taken
# separately. Tensors 4x the L3 and more, so that every step streams from
# memory: (64, 64, 112, 112) float32 is 205 MB.
FUSED_SHAPES = [(64, 64, 112, 112)]
QUICK_FUSED_SHAPES = [(8, 16, 32, 32)]
# Tensor-sized passes (fused, separate steps): the training forward reads x
# twice and writes y, the residual adds a read, each separate step reads and
# writes the whole tensor again; the backward through the ReLU reads x, dy
# and y and writes dy through the ReLU, then reads x and it and writes dx.
FUSED_PASSES = {"train+relu": (3, 5), "train+add+relu": (4, 8),
                "eval+relu": (2, 4), "backward+relu+add": (7, 8)}
FUSED_TARGET_RATIO = {"train+relu": 0.7, "train+add+relu": 0.7,
                      "eval+relu": 0.6, "backward+relu+add": 0.95}


class FusedCase:
    """One fused operation, against PyTorch's best eager practice (the
    batch norm, then in-place ``add_`` and ``relu_``), against numba_bn
    followed by in-place NumPy steps, and against ``torch.compile`` of the
    PyTorch steps (forward only) when asked for."""

    def __init__(self, op, shape, dtype, use_out, torch, compile_torch=False):
        rng = np.random.default_rng(0)
        c = shape[1]
        self.op, self.shape, self.dtype = op, shape, dtype
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        x = layout_input(shape, dtype, "nchw", rng)
        residual = layout_input(shape, dtype, "nchw", rng)
        dy = layout_input(shape, dtype, "nchw", rng)
        w = rng.uniform(0.5, 1.5, c).astype(dtype)
        b = rng.normal(0, 0.1, c).astype(dtype)
        rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
        out = np.empty_like(x) if use_out else None
        training = op.startswith("train")
        added = residual if "add" in op else None
        self.contenders = {}
        if op.startswith("backward"):
            y, mean, invstd = nbn.batch_norm_forward_training(
                x, w, b, EPS, activation="relu", residual=residual)
            self.contenders["numba_bn"] = lambda: nbn.batch_norm_backward(
                dy, x, w, mean, invstd, activation="relu", y=y,
                residual=True, out=out)[0]

            def steps():
                g = np.where(y > 0, dy, 0)
                return nbn.batch_norm_backward(g, x, w, mean, invstd,
                                               out=out)[0]
        else:
            self.contenders["numba_bn"] = lambda: nbn.batch_norm(
                x, rm, rv, w, b, training=training, eps=EPS, out=out,
                activation="relu", residual=added)

            def steps():
                y = nbn.batch_norm(x, rm, rv, w, b, training=training,
                                   eps=EPS, out=out)
                if added is not None:
                    np.add(y, added, out=y)
                return np.maximum(y, 0, out=y)
        self.contenders["numba_bn+numpy"] = steps
        if torch is not None:
            self.contenders.update(torch_fused_contenders(
                torch, op, x, residual, dy, w, b, rm.copy(), rv.copy(),
                compile_torch))

    def check(self):
        """numba_bn's result against PyTorch's steps (or its own NumPy
        steps); the relative error."""
        return relative_error(
            self.contenders["numba_bn"](),
            self.contenders.get("torch", self.contenders["numba_bn+numpy"])())


def torch_fused_contenders(torch, op, x, residual, dy, w, b, rm, rv,
                           compile_torch):
    """PyTorch's separate steps (and ``torch.compile`` of them)."""
    F = torch.nn.functional
    xt, rt, dyt = (torch.from_numpy(a.copy()) for a in (x, residual, dy))
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    rmt, rvt = torch.from_numpy(rm), torch.from_numpy(rv)
    if op.startswith("backward"):
        yt, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            xt, wt, bt, None, None, True, 0.1, EPS)
        yt = yt.add_(rt).relu_()

        def run():
            g = torch.ops.aten.threshold_backward(dyt, yt, 0)
            return torch.ops.aten.native_batch_norm_backward(
                g, xt, wt, None, None, save_mean, save_invstd, True, EPS,
                [True, True, True])[0].numpy()
        return {"torch": run}
    training = op.startswith("train")
    added = "add" in op

    def steps(xt, rt):
        y = F.batch_norm(xt, rmt, rvt, wt, bt, training=training, eps=EPS)
        if added:
            y.add_(rt)
        return y.relu_()

    def run():
        with torch.no_grad():
            return steps(xt, rt).numpy()
    contenders = {"torch": run}
    if compile_torch:
        compiled = torch.compile(steps)

        def run_compiled():
            with torch.no_grad():
                return compiled(xt, rt).numpy()
        run_compiled()  # compiles, outside the timing
        contenders["torch.compile"] = run_compiled
    return contenders


def print_header(title, header):
    """A table's title (when there is one), column header and rule."""
    if title:
        print(title)
    print(header)
    print("-" * len(header))


def fused_main(torch, shapes, rounds, probe, use_out, compile_torch):
    """The fused cases: printed, and returned as JSON-ready dicts with the
    list of missed targets."""
    print_header("\nfused batch norm + ReLU (+ residual add), float32 NCHW; "
                 "floor: the fused byte count's share of the copy bandwidth",
                 f"{'op':19}{'shape':19}{'numba_bn':>9}{'torch':>9}"
                 f"{'compile':>9}{'nb+numpy':>9}{'ratio':>7}{'GB/s':>6}"
                 f"{'floor':>7}  target")
    results, missed, wrong = [], [], []
    for shape in shapes:
        for op in FUSED_PASSES:
            case = FusedCase(op, shape, np.float32, use_out, torch,
                             compile_torch)
            error = case.check()
            bandwidth = probe.bandwidth()
            times, _ = time_interleaved(case.contenders, rounds)
            ours, theirs = times["numba_bn"], times.get("torch")
            ratio = ours / theirs if theirs else None
            floor = FUSED_PASSES[op][0] * case.nbytes / bandwidth / ours
            verdict = []
            if ratio is not None:
                target = FUSED_TARGET_RATIO[op]
                verdict.append(f"<={target:.2f}x "
                               + ("ok" if ratio <= target else "MISS"))
            if case.nbytes > FLOOR_MIN_BYTES:
                verdict.append(f"floor>={TARGET_FLOOR_SHARE:.0%} "
                               + ("ok" if floor >= TARGET_FLOOR_SHARE else "MISS"))
            if error > 1e-4:
                verdict.append(f"WRONG (error {error:.1e})")
                wrong.append(op)
            if any("MISS" in v for v in verdict):
                missed.append(f"{op} {shape}")
            print(f"{op:19}{str(shape).replace(' ', ''):19}{fmt_ms(ours):>9}"
                  f"{fmt_ms(theirs):>9}{fmt_ms(times.get('torch.compile')):>9}"
                  f"{fmt_ms(times['numba_bn+numpy']):>9}"
                  f"{'-' if ratio is None else f'{ratio:.2f}':>7}"
                  f"{bandwidth / 1e9:6.0f}{floor:7.0%}  {', '.join(verdict)}")
            results.append({"op": op, "shape": list(shape), "dtype": "float32",
                            "layout": "nchw", "out": use_out, "seconds": times,
                            "ratio_to_torch": ratio,
                            "copy_bandwidth_bytes_per_s": bandwidth,
                            "floor_share": floor,
                            "passes_fused_and_separate": FUSED_PASSES[op],
                            "max_rel_error_vs_reference": error})
    return results, missed, wrong


# Neighbouring layers that prefer different memory layouts: the arrays of
# one call in different layouts, against the same call with all of them in
# the layout of x (issue 29: within 1.25x).
MIXED_SHAPES = [(32, 64, 56, 56), (32, 512, 7, 7)]
QUICK_MIXED_SHAPES = [(8, 16, 32, 32)]
MIXED_TARGET_RATIO = 1.25
MIXED_LAYOUTS = {  # op: layouts of (x, dy, out) or (x, out), n: NCHW, c: channels-last
    "backward": ["ncn", "ncc", "nnc", "cnn", "cnc", "ccn"],
    "train": ["nc", "cn"],
}


def mixed_contenders(op, shape, dtype, layouts):
    """numba_bn on arrays in ``layouts``, and on the same arrays all in
    ``x``'s layout ("matched")."""
    rng = np.random.default_rng(0)
    names = {"n": "nchw", "c": "channels_last"}
    arrays = [layout_input(shape, dtype, names[code], rng) for code in layouts]
    same = [layout_input(shape, dtype, names[layouts[0]], rng)
            for _ in layouts]
    for a, b in zip(arrays, same):
        b[...] = a
    c = shape[1]
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.normal(0, 0.1, c).astype(dtype)
    if op == "backward":
        _, mean, invstd = nbn.batch_norm_forward_training(arrays[0], w, b, EPS)

        def call(x, dy, out):
            return nbn.batch_norm_backward(dy, x, w, mean, invstd, out=out)[0]
    else:
        def call(x, out):
            return nbn.batch_norm_forward_training(x, w, b, EPS, out=out)[0]
    return {"numba_bn": lambda: call(*arrays), "matched": lambda: call(*same)}


def mixed_main(shapes, dtypes, rounds):
    """The mixed-layout cases: printed, and returned as JSON-ready dicts
    with the list of missed targets."""
    print_header("\nmixed memory layouts (n: NCHW, c: channels-last, in the "
                 "order x, dy, out or x, out) against all arrays in x's "
                 "layout",
                 f"{'op':9}{'shape':19}{'dtype':8}{'layouts':8}{'mixed':>9}"
                 f"{'matched':>9}{'ratio':>7}  target")
    results, missed, wrong = [], [], []
    for shape in shapes:
        for dtype in dtypes:
            for op, combos in MIXED_LAYOUTS.items():
                for layouts in combos:
                    contenders = mixed_contenders(op, shape, dtype, layouts)
                    # Other kernels may sum in another order: rounding only.
                    error = relative_error(contenders["numba_bn"](),
                                           contenders["matched"]())
                    if error > (1e-4 if dtype == np.float32 else 1e-9):
                        wrong.append(f"{op} {shape} {layouts}")
                    times, _ = time_interleaved(contenders, rounds)
                    ratio = times["numba_bn"] / times["matched"]
                    ok = ratio <= MIXED_TARGET_RATIO
                    if not ok:
                        missed.append(f"{op} {shape} {np.dtype(dtype).name} "
                                      f"{layouts}")
                    print(f"{op:9}{str(shape).replace(' ', ''):19}"
                          f"{np.dtype(dtype).name:8}{layouts:8}"
                          f"{fmt_ms(times['numba_bn']):>9}"
                          f"{fmt_ms(times['matched']):>9}{ratio:7.2f}  "
                          f"<={MIXED_TARGET_RATIO}x {'ok' if ok else 'MISS'}")
                    results.append({"op": op, "shape": list(shape),
                                    "dtype": np.dtype(dtype).name,
                                    "layouts": layouts, "seconds": times,
                                    "ratio_to_matched": ratio,
                                    "max_rel_error_vs_matched": error})
    return results, missed, wrong


GPU_SHAPES = {"float32": (64, 256, 64, 64), "float16": (128, 256, 64, 64)}
"""256 MiB per tensor, so the 50 MB L2 of an H100 does not flatter."""
SIMULATOR_SHAPES = {"float32": (2, 3, 2, 3), "float16": (3, 3, 2, 2)}
"""Under ``NUMBA_ENABLE_CUDASIM=1`` (CI runs the GPU bench there)."""


# The GPU bench's fused cases, with dy standing in as the residual.
GPU_FUSED_OPERATIONS = ("train+add+relu", "backward+relu+add")


def torch_cuda_contender(torch, module, op, x, dy):
    """PyTorch's CUDA batch norm on the same tensors (None without PyTorch);
    the fused operations as its separate steps, ``relu(bn(x) + dy)``."""
    if module is None:
        return None
    steps = ((lambda x: torch.relu(module(x) + dy)) if op in GPU_FUSED_OPERATIONS
             else module)
    xg = x.detach().clone().requires_grad_(op.startswith("backward"))
    if op.startswith("backward"):
        y = steps(xg)  # the graph is built once; each call runs backward only

        def run():
            xg.grad = None
            y.backward(dy, retain_graph=True)
            return xg.grad
        return run

    def run():
        with torch.no_grad():
            return steps(xg)
    return run


def gpu_input_maker(torch):
    """``to_device(host, layout)`` for the GPU bench: PyTorch CUDA tensors
    where PyTorch sees a GPU, else the GPU backend's arrays (CuPy's or
    Numba's); memory order kept."""
    if torch is not None:
        def to_device(host, layout):
            fmt = (torch.channels_last if layout == "channels_last"
                   else torch.contiguous_format)
            return (torch.from_numpy(np.ascontiguousarray(host)).cuda()
                    .contiguous(memory_format=fmt))
        return to_device
    return lambda host, layout: backend_named("cuda").from_host(host)


def gpu_reference(op, x, dy, running_mean, running_var, y=None):
    """The NumPy result of ``op`` on float64 host copies ``x``, ``dy`` of
    the inputs (weight 1, bias 0: the modules' initial parameters); the
    fused operations add ``dy`` as the residual, and their backward takes
    the ReLU's mask from the forward's output ``y``."""
    c = x.shape[1]
    if op == "backward+relu+add":
        return numpy_backward(dy * (y > 0), x, np.ones(c))
    if op == "backward":
        return numpy_backward(dy, x, np.ones(c))
    y = numpy_forward(x, running_mean, running_var, np.ones(c), np.zeros(c),
                      op.startswith("train"))
    return np.maximum(y + dy, 0) if op == "train+add+relu" else y


def gpu_main(args, torch, shapes=GPU_SHAPES):
    """The GPU comparison: numba_bn against PyTorch's CUDA batch norm (cuDNN).

    Inputs are PyTorch CUDA tensors (numba_bn reads them zero-copy through
    ``__cuda_array_interface__``), or without PyTorch CuPy or Numba device
    arrays (``gpu_input_maker``). Before timing, each operation writes
    into an output poisoned with NaN, which is compared with the float64
    NumPy result (norm-wise relative error, the ``error`` column) and with
    PyTorch's. Each sample runs the operation ``inner`` times and
    synchronizes the device. ``shapes``: dtype name to input shape.
    """
    from numba import cuda
    if torch is not None and not torch.cuda.is_available():
        torch = None
    to_device = gpu_input_maker(torch)
    backend = backend_named("cuda")
    rounds = args.rounds or (3 if args.quick else 9)
    device = cuda.get_current_device()
    name = getattr(device, "name", b"CUDA simulator")
    nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize
                 for dtype, shape in shapes.items())
    src = cuda.device_array(nbytes // 4, np.float32)
    dst = cuda.device_array(nbytes // 4, np.float32)

    def timed(fn, inner=10):
        fn()
        cuda.synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        cuda.synchronize()
        return (time.perf_counter() - start) / inner

    bandwidth = 2 * nbytes / float(np.median([timed(lambda: dst.copy_to_device(src))
                                             for _ in range(5)]))
    print(f"numba_bn {nbn.__version__} on "
          f"{name.decode() if isinstance(name, bytes) else name}; "
          f"device-to-device copy of {nbytes >> 20} MiB {bandwidth / 1e12:.2f} TB/s"
          + (f"; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
             if torch else "; PyTorch (CUDA) not available"))
    print(f"{'op':18}{'shape':20}{'dtype':8}{'layout':14}{'numba_bn':>9}{'torch':>9}"
          f"{'ratio':>7}{'roofline':>9}{'error':>9}")
    wrong = 0
    for dtype, shape in shapes.items():
        if args.quick and dtype == "float16":
            continue
        # Errors of a float16 output's rounding (2**-11), and far less.
        tolerance = 2e-3 if dtype == "float16" else 1e-5
        for layout in ["nchw", "channels_last"]:
            x_host = layout_input(shape, np.dtype(dtype), layout, np.random.default_rng(0))
            dy_host = layout_input(shape, np.dtype(dtype), layout, np.random.default_rng(1))
            poison_host = np.full_like(x_host, np.nan)
            x64, dy64 = x_host.astype(np.float64), dy_host.astype(np.float64)
            x, dy = to_device(x_host, layout), to_device(dy_host, layout)
            c = shape[1]
            # float16 data meets float32 parameters (mixed precision), as in PyTorch AMP.
            plain = nbn.BatchNorm2d(c, device="cuda", dtype="float32")
            fused = nbn.BatchNorm2d(c, device="cuda", dtype="float32",
                                    activation="relu")
            theirs = torch.nn.BatchNorm2d(c).cuda() if torch is not None else None
            for op in OPERATIONS + GPU_FUSED_OPERATIONS:
                ours = fused if op in GPU_FUSED_OPERATIONS else plain
                residual = dy if op in GPU_FUSED_OPERATIONS else None
                ours.train(op != "eval")
                if theirs is not None:
                    theirs.train(op != "eval")
                y = None
                if op.startswith("backward"):
                    y = np.asarray(backend.to_host(ours(x, residual=residual)),
                                   np.float64)

                    def run_ours(out=None):
                        grads = ours.backward(dy, out=out)
                        return grads if residual is None else grads[0]
                else:
                    def run_ours(out=None):
                        return ours(x, residual=residual, out=out)
                expected = gpu_reference(op, x64, dy64,
                                         backend.to_host(ours.running_mean),
                                         backend.to_host(ours.running_var), y)
                mine = np.asarray(backend.to_host(
                    run_ours(to_device(poison_host, layout))), np.float64)
                error = (np.linalg.norm(np.nan_to_num(mine - expected, nan=np.inf))
                         / np.linalg.norm(expected))
                verdict = "" if error <= tolerance else "  WRONG"
                run_torch = torch_cuda_contender(torch, theirs, op, x, dy)
                times = {"numba_bn": []}
                if run_torch is not None:
                    times["torch"] = []
                    # PyTorch's float32 sums land further off the reference.
                    peer = run_torch().float().cpu().numpy().astype(np.float64)
                    if not (np.linalg.norm(mine - peer) / np.linalg.norm(peer)
                            <= (1e-2 if dtype == "float16" else 1e-3)):
                        verdict += "  differs from torch"
                wrong += bool(verdict)
                for _ in range(rounds):
                    times["numba_bn"].append(timed(run_ours))
                    if run_torch is not None:
                        times["torch"].append(timed(run_torch))
                med = {k: float(np.median(v)) for k, v in times.items()}
                ratio = med["numba_bn"] / med["torch"] if "torch" in med else None
                passes = (FUSED_PASSES[op][0] if op in GPU_FUSED_OPERATIONS
                          else PASSES[op])
                share = passes * x_host.nbytes / bandwidth / med["numba_bn"]
                print(f"{op:18}{str(shape).replace(' ', ''):20}{dtype:8}{layout:14}"
                      f"{fmt_ms(med['numba_bn']):>9}{fmt_ms(med.get('torch')):>9}"
                      f"{'-' if ratio is None else f'{ratio:.2f}':>7}{share:9.0%}"
                      f"{error:9.1e}{verdict}")
    return 1 if wrong else 0


def fmt_ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:8.3f}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m numba_bn.bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="two small shapes, float32, few rounds (for CI)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per case (default 15, quick 3)")
    parser.add_argument("--out", action="store_true",
                        help="numba_bn writes into preallocated out= arrays")
    parser.add_argument("--no-torch", action="store_true",
                        help="leave PyTorch out even when it is installed")
    parser.add_argument("--no-jax", action="store_true",
                        help="leave JAX out even when it is installed")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results as JSON (for docs/plots)")
    parser.add_argument("--cases", choices=["all", "plain", "fused", "mixed"],
                        default="all",
                        help="plain: batch norm alone; fused: with the ReLU "
                             "and residual add; mixed: arrays of one call "
                             "in different memory layouts (default: all)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave torch.compile out of the fused cases "
                             "(always out with --quick)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: 256 MiB tensors against PyTorch's CUDA "
                             "batch norm and the device copy roofline")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(numba.get_num_threads())
        except ImportError:
            torch = None
    if args.device == "cuda":
        from numba import cuda
        if numba.config.ENABLE_CUDASIM:
            # The simulator runs every thread as Python: tiny shapes and
            # launches, one round, only to check that each case runs right.
            from . import config
            config.threads_per_block, config.channel_lanes = 4, 2
            args.rounds = 1
            return gpu_main(args, None, SIMULATOR_SHAPES)
        if not cuda.is_available():
            print("no usable GPU (Numba finds none)", file=sys.stderr)
            return 2
        return gpu_main(args, torch)

    jax = None if args.no_jax else load_jax()
    probe = CopyProbe()
    print(f"numba_bn {nbn.__version__}, numba {numba.__version__}, numpy "
          f"{np.__version__}" + (f", torch {torch.__version__}" if torch else
                                 ", torch not installed")
          + (f", jax {jax.__version__}" if jax else ", jax not installed")
          + f"; {numba.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"floor: at the bandwidth of a {probe.src.nbytes >> 20} MiB parallel copy "
          "(read + write, GB/s column) timed before each case")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.cases in ("fused", "mixed"):
        shapes = []
    if shapes:
        print_header(
            None, f"{'op':9}{'shape':19}{'dtype':8}{'layout':14}{'numba_bn':>9}"
            f"{'torch':>9}{'jax':>9}{'numpy':>9}{'ratio':>7}{'vs jax':>7}"
            f"{'GB/s':>6}{'floor':>7}{'faults':>8}  target")
    dtypes = [np.float32] if args.quick else [np.float32, np.float64]
    results, wrong, missed = [], [], []
    for shape in shapes:
        layouts = ["nchw", "channels_last"] if len(shape) == 4 else ["nchw"]
        for dtype in dtypes:
            for layout in layouts:
                for op in OPERATIONS:
                    case = Case(op, shape, dtype, layout, args.out, torch, jax)
                    error = case.check()
                    tolerance = 1e-4 if dtype == np.float32 else 1e-9
                    bandwidth = probe.bandwidth()
                    times, faults = time_interleaved(case.contenders, rounds)
                    ours, theirs = times["numba_bn"], times.get("torch")
                    ratio = ours / theirs if theirs else None
                    ratio_jax = ours / times["jax"] if "jax" in times else None
                    floor = PASSES[op] * case.nbytes / bandwidth / ours
                    target = target_ratio(op, shape, layout)
                    verdict = []
                    if ratio is not None:
                        verdict.append(f"<={target:.1f}x " + ("ok" if ratio <= target else "MISS"))
                    if case.nbytes > FLOOR_MIN_BYTES:
                        verdict.append(f"floor>={TARGET_FLOOR_SHARE:.0%} "
                                       + ("ok" if floor >= TARGET_FLOOR_SHARE else "MISS"))
                    if error > tolerance:
                        verdict.append(f"WRONG (error {error:.1e})")
                        wrong.append(case)
                    if any("MISS" in v for v in verdict):
                        missed.append(f"{op} {shape} {np.dtype(dtype).name} {layout}")
                    print(f"{op:9}{str(shape).replace(' ', ''):19}{np.dtype(dtype).name:8}"
                          f"{layout:14}{fmt_ms(ours):>9}{fmt_ms(theirs):>9}"
                          f"{fmt_ms(times.get('jax')):>9}"
                          f"{fmt_ms(times['numpy']):>9}"
                          f"{'-' if ratio is None else f'{ratio:.2f}':>7}"
                          f"{'-' if ratio_jax is None else f'{ratio_jax:.2f}':>7}"
                          f"{bandwidth / 1e9:6.0f}{floor:7.0%}{faults:8.1f}"
                          f"  {', '.join(verdict)}")
                    results.append({"op": op, "shape": list(shape),
                                    "dtype": np.dtype(dtype).name, "layout": layout,
                                    "seconds": times, "ratio_to_torch": ratio,
                                    "ratio_to_jax": ratio_jax,
                                    "copy_bandwidth_bytes_per_s": bandwidth,
                                    "floor_share": floor, "faults_per_call": faults,
                                    "max_rel_error_vs_reference": error})
    fused, mixed = [], []
    if args.cases in ("all", "fused"):
        fused, fused_missed, fused_wrong = fused_main(
            torch, QUICK_FUSED_SHAPES if args.quick else FUSED_SHAPES, rounds,
            probe, args.out,
            torch is not None and not (args.quick or args.no_compile))
        missed += fused_missed
        wrong += fused_wrong
    if args.cases in ("all", "mixed"):
        mixed, mixed_missed, mixed_wrong = mixed_main(
            QUICK_MIXED_SHAPES if args.quick else MIXED_SHAPES, dtypes, rounds)
        missed += mixed_missed
        wrong += mixed_wrong
    calls = small_calls(torch, rounds)
    print("\nmodule call (validation, dispatch, launch), float32, training mode:")
    for entry in calls:
        theirs = entry.get("torch")
        ratio = "" if theirs is None else f", ratio {entry['numba_bn'] / theirs:.2f}"
        print(f"  {tuple(entry['shape'])}: numba_bn {entry['numba_bn'] * 1e6:.1f} us"
              + ("" if theirs is None else f", torch {theirs * 1e6:.1f} us") + ratio)
    bandwidths = [r["copy_bandwidth_bytes_per_s"] for r in results + fused]
    bandwidth = float(np.median(bandwidths)) if bandwidths else None
    if bandwidths:
        print(f"\ncopy bandwidth over the cases: median {bandwidth / 1e9:.1f} "
              f"GB/s, {min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f}")
    total = len(results) + len(fused) + len(mixed)
    print(f"{total - len(missed)} of {total} cases meet their targets"
          + (f"; missed: {'; '.join(missed)}" if missed else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth_bytes_per_s": bandwidth,
                       "threads": numba.get_num_threads(),
                       "versions": {"numba_bn": nbn.__version__, "numba": numba.__version__,
                                    "numpy": np.__version__,
                                    "torch": getattr(torch, "__version__", None),
                                    "jax": getattr(jax, "__version__", None)},
                       "machine": platform.processor() or platform.machine(),
                       "date": time.strftime("%Y-%m-%d"),
                       "cases": results, "fused_cases": fused,
                       "mixed_layout_cases": mixed,
                       "module_calls": calls}, f, indent=1)
    compiled = compiled_here()
    if compiled:
        print(f"\nwarning: this process compiled {', '.join(compiled)} instead "
              "of loading them from Numba's cache; freshly compiled parallel "
              "code can run slower: run the command again for representative "
              "times")
    if wrong:
        print(f"{len(wrong)} results differ from the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
