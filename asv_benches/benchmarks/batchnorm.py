"""numba_bn benchmarks for airspeed velocity (asv).

asv reruns ``setup`` before every timed call, so inputs are built once per
process and kept in a module-level cache. GPU cases raise
``NotImplementedError`` in ``setup`` where no GPU is usable (asv shows n/a),
and every GPU timing synchronizes the device before it ends.
"""
import os
import sys
import tempfile

import numpy as np

import numba_bn as nbn

OPERATIONS = ["train", "eval", "backward"]
SHAPES = ["32x64x56x56", "256x64x14x14", "32x512x7x7", "8x16x32x32", "1024x256"]
DTYPES = ["float32", "float64"]
LAYOUTS = ["nchw", "channels_last"]
DEVICES = ["cpu", "cuda"]
EPS = 1e-5

_INPUTS = {}


def gpu_usable():
    """A real GPU with numba-cuda (the simulator would take hours here)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        from numba import cuda
        return cuda.is_available()
    except Exception:
        return False


def parse_shape(shape):
    return tuple(int(n) for n in shape.split("x"))


def host_inputs(shape, dtype, layout):
    """``x``, ``dy``, weight, bias: standard normal, cached per process."""
    key = (shape, dtype, layout)
    if key not in _INPUTS:
        dims = parse_shape(shape)
        if layout == "channels_last" and len(dims) != 4:
            raise NotImplementedError("channels-last needs (N, C, H, W)")
        rng = np.random.default_rng(0)
        order = (0, 2, 3, 1) if layout == "channels_last" else tuple(range(len(dims)))
        stored = tuple(dims[i] for i in order)
        back = tuple(np.argsort(order))
        x = rng.standard_normal(stored, dtype=dtype).transpose(back)
        dy = rng.standard_normal(stored, dtype=dtype).transpose(back)
        c = dims[1]
        _INPUTS[key] = (x, dy, rng.uniform(0.5, 1.5, c).astype(dtype),
                        rng.normal(0, 0.1, c).astype(dtype))
    return _INPUTS[key]


def prepare(op, shape, dtype, layout, device):
    """A callable that runs ``op`` once (synchronized on the GPU)."""
    if device == "cuda" and not gpu_usable():
        raise NotImplementedError("no usable GPU")
    x, dy, w, b = host_inputs(shape, dtype, layout)
    bn = (nbn.BatchNorm1d if x.ndim == 2 else nbn.BatchNorm2d)(x.shape[1], dtype=dtype)
    bn.load_state_dict({"weight": w, "bias": b}, strict=False)
    sync = lambda: None  # noqa: E731
    if device == "cuda":
        from numba import cuda

        from numba_bn._dispatch import backend_named
        gpu = backend_named("cuda")
        x, dy = gpu.from_host(x), gpu.from_host(dy)
        bn.to("cuda")
        sync = cuda.synchronize
    bn.train(op != "eval")
    if op == "backward":
        bn(x)

        def run():
            bn.backward(dy)
            sync()
    else:
        def run():
            bn(x)
            sync()
    run()  # compile (or load from the cache) outside the timing
    return run


class TimeBatchNorm:
    """Training forward, eval forward and backward of the module."""
    params = [OPERATIONS, SHAPES, DTYPES, LAYOUTS, DEVICES]
    param_names = ["op", "shape", "dtype", "layout", "device"]
    timeout = 300

    def setup(self, op, shape, dtype, layout, device):
        self.run = prepare(op, shape, dtype, layout, device)

    def time_batchnorm(self, op, shape, dtype, layout, device):
        self.run()


class TimeFused:
    """The fused ReLU and residual add: a ResNet block's batch norm, module
    forward (training and eval) and backward, float32 NCHW (CPU; the GPU
    where one is usable). 64x64x112x112 streams every pass from memory."""
    params = [["train+relu", "train+add+relu", "eval+relu", "backward+relu+add"],
              ["64x64x112x112", "8x16x32x32"], DEVICES]
    param_names = ["op", "shape", "device"]
    timeout = 300

    def setup(self, op, shape, device):
        if device == "cuda" and not gpu_usable():
            raise NotImplementedError("no usable GPU")
        x, dy, w, b = host_inputs(shape, "float32", "nchw")
        residual = dy.copy() if "add" in op or op.startswith("backward") else None
        bn = nbn.BatchNorm2d(x.shape[1], activation="relu")
        bn.load_state_dict({"weight": w, "bias": b}, strict=False)
        sync = lambda: None  # noqa: E731
        if device == "cuda":
            from numba import cuda

            from numba_bn._dispatch import backend_named
            gpu = backend_named("cuda")
            x, dy = gpu.from_host(x), gpu.from_host(dy)
            residual = None if residual is None else gpu.from_host(residual)
            bn.to("cuda")
            sync = cuda.synchronize
        bn.train(op != "eval+relu")
        if op.startswith("backward"):
            bn(x, residual=residual)

            def run():
                bn.backward(dy)
                sync()
        else:
            def run():
                bn(x, residual=residual)
                sync()
        run()  # compile (or load from the cache) outside the timing
        self.run = run

    def time_fused(self, op, shape, device):
        self.run()


class TimeMixedLayouts:
    """Calls whose arrays mix NCHW (n) and channels-last (c) memory, in the
    order x, dy, out (backward) or x, out (training forward), against which
    the matched layouts of ``TimeBatchNorm`` are the reference (CPU)."""
    params = [["backward:ncn", "backward:nnc", "backward:cnn", "backward:ccn",
               "train:nc", "train:cn"], ["32x64x56x56", "32x512x7x7"], DTYPES]
    param_names = ["op:layouts", "shape", "dtype"]
    timeout = 300

    def setup(self, case, shape, dtype):
        op, layouts = case.split(":")
        names = {"n": "nchw", "c": "channels_last"}
        x, _, w, b = host_inputs(shape, dtype, names[layouts[0]])
        arrays = [x] + [host_inputs(shape, dtype, names[code])[1]
                        for code in layouts[1:-1]]
        out = np.empty_like(host_inputs(shape, dtype, names[layouts[-1]])[0])
        if op == "backward":
            _, mean, invstd = nbn.batch_norm_forward_training(x, w, b, EPS)
            self.run = lambda: nbn.batch_norm_backward(
                arrays[1], x, w, mean, invstd, out=out)
        else:
            self.run = lambda: nbn.batch_norm_forward_training(
                x, w, b, EPS, out=out)
        self.run()  # compile (or load from the cache) outside the timing

    def time_mixed_layouts(self, case, shape, dtype):
        self.run()


class PeakmemBatchNorm:
    """Peak resident memory of a forward and of a backward (inputs included)."""
    params = [["train", "backward"], ["32x64x56x56", "1024x256"], ["cpu", "cuda"]]
    param_names = ["op", "shape", "device"]

    def setup(self, op, shape, device):
        self.run = prepare(op, shape, "float32", "nchw", device)

    def peakmem_batchnorm(self, op, shape, device):
        self.run()


class TrackAccuracy:
    """Largest relative error of a float32 training forward on mean 1e4, std 1."""
    params = [LAYOUTS]
    param_names = ["layout"]

    def track_hard_input_error(self, layout):
        rng = np.random.default_rng(0)
        nhwc = 1e4 + rng.standard_normal((16, 12, 12, 8))
        x = nhwc.transpose(0, 3, 1, 2) if layout == "channels_last" else \
            np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
        x = x.astype(np.float32)
        y = nbn.BatchNorm2d(8)(x)
        x64 = x.astype(np.float64)
        mean = x64.mean(axis=(0, 2, 3), keepdims=True)
        expected = (x64 - mean) / np.sqrt(x64.var(axis=(0, 2, 3), keepdims=True) + EPS)
        return float(np.abs(y - expected).max() / np.abs(expected).max())

    track_hard_input_error.unit = "relative error"


_COLD_START = """
import numpy as np
import numba_bn as nbn
bn = nbn.BatchNorm2d(8)
x = np.random.default_rng(0).standard_normal((4, 8, 6, 6), dtype=np.float32)
y = bn(x)
dx = bn.backward(np.ones_like(x))
assert np.isfinite(dx).all() and abs(float(y.mean())) < 1e-5
"""


class ColdStart:
    """A fresh interpreter: import, one BatchNorm2d float32 forward and backward."""
    timeout = 120

    def setup_cache(self):
        # A cache directory of our own, warmed once: the "cached" timing
        # never pays a compilation left over from another run.
        import subprocess
        cache_dir = tempfile.mkdtemp(prefix="numba_bn_asv_cache_")
        subprocess.run([sys.executable, "-c", _COLD_START], check=True,
                       env={**os.environ, "NUMBA_CACHE_DIR": cache_dir})
        return cache_dir

    def timeraw_cold_start_cached(self, cache_dir):
        return _COLD_START, f"import os; os.environ['NUMBA_CACHE_DIR'] = {cache_dir!r}"

    def timeraw_cold_start_uncached(self, cache_dir):
        # A new empty cache directory for every run: everything compiles.
        return _COLD_START, ("import os, tempfile; os.environ['NUMBA_CACHE_DIR'] = "
                             "tempfile.mkdtemp(prefix='numba_bn_asv_empty_')")
