"""Every public call on the GPU with every flag, against the float64 reference,
and its kernel launches counted.

A training forward is two launches (statistics, normalization), an eval
forward one, a backward two (one when the statistics were constant, no
parameter gradient is asked for and no ReLU was fused). SyncBatchNorm adds its exchange: one
launch writes the message, one merges the ranks' messages. The conftest's
``launches_the_hardware_accepts`` checks each launch's arguments against
numba-cuda's hardware launcher. The counts and the Numba device-array
views built per call are printed at the end of the test log.
"""
import numba
import numpy as np
import pytest
from numba import cuda

import numba_bn as nbn
from numba_bn import cuda as backend

from .. import launch_rules
from .. import reference as ref
from ..conftest import TOLERANCE
from .arrays import host, to_device

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
pytestmark = [pytest.mark.skipif(not SIMULATOR and not cuda.is_available(),
                                 reason="no GPU: run under NUMBA_ENABLE_CUDASIM=1"),
              pytest.mark.usefixtures("tiny_launches")]

# (public call, launches, device-array views built), for the test log.
REPORT = []


@pytest.fixture
def counted(monkeypatch):
    """A context manager counting the launches and views of one call
    (under the simulator; on a GPU ``launches`` is None)."""
    views = []
    original = backend._view

    def view(*args):
        result = original(*args)
        if result is not args[0]:
            views.append(result)
        return result

    monkeypatch.setattr(backend, "_view", view)

    class Counter:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            views.clear()
            self.launches = None
            if SIMULATOR:
                self._recording = launch_rules.recording()
                self.launches = self._recording.__enter__()
            return self

        def __exit__(self, *exc):
            if SIMULATOR:
                self._recording.__exit__(*exc)
                REPORT.append((self.name, len(self.launches), len(views)))

        def made(self, count):
            """Whether the call made ``count`` launches (always on a GPU)."""
            return self.launches is None or len(self.launches) == count

    return Counter



def close(actual, expected, dtype=np.float32, scale=1.0):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(host(actual), np.float64), expected,
                               rtol=tol, atol=tol * scale)


AFFINE = {"none": dict(affine=False), "weight": dict(bias=False),
          "both": {}}
STATES = {"tracking": {}, "frozen": dict(freeze=True),
          "batch only": dict(track_running_stats=False)}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("affine", list(AFFINE))
def test_module_flags(affine, state, training, rng, counted):
    c = 3
    bn = nbn.BatchNorm2d(c, momentum=None if affine == "both" else 0.3,
                         device="cuda", **AFFINE[affine], **STATES[state])
    w, b = rng.normal(1, 0.5, c), rng.normal(0, 1, c)
    rm, rv = rng.normal(0, 1, c), rng.uniform(0.5, 2, c)
    bn.load_state_dict({"weight": w, "bias": b, "running_mean": rm,
                        "running_var": rv}, strict=False)
    w = w if bn.weight is not None else None
    b = b if bn.bias is not None else None
    bn.train(training)
    x = rng.normal(2, 3, (3, c, 2, 3)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    name = f"BatchNorm2d({affine}, {state}, {'train' if training else 'eval'})"
    with counted(name + " forward") as fwd:
        y = bn(to_device(x))
    with counted(name + " backward") as bwd:
        dx = bn.backward(to_device(dy))
    batch = state == "batch only" or (training and state == "tracking")
    grads = bn.weight is not None and state != "frozen"
    assert fwd.made(2 if batch else 1)
    assert bwd.made(2 if batch or grads else 1)
    if batch:
        mean, var = ref.batch_stats(x)
        dx_ref, dw_ref, db_ref = ref.backward_batch_stats(dy, x, w)
    else:
        mean, var = rm, rv
        dx_ref, dw_ref, db_ref = ref.backward_running_stats(dy, x, rm, rv, w)
    close(y, ref.forward(x, mean, var, w, b), scale=5)
    close(dx, dx_ref, scale=5)
    if grads:
        close(bn.grad_weight, dw_ref, scale=x.size)
        if b is not None:
            close(bn.grad_bias, db_ref, scale=x.size)
    assert (bn.grad_bias is None) == (not grads or b is None)
    if state == "tracking":
        expected = (ref.running_update(rm, rv, x, 1.0 if affine == "both"
                                       else 0.3) if training else (rm, rv))
        close(bn.running_mean, expected[0], scale=5)
        close(bn.running_var, expected[1], scale=5)
        assert int(host(bn.num_batches_tracked)) == int(training)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_functional_calls(dtype, layout, rng, counted):
    c = 3
    x = rng.normal(5, 2, (3, c, 2, 2)).astype(dtype)
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = rng.normal(size=x.shape).astype(dtype)
    param = np.float32 if dtype == np.float16 else dtype
    w, b = rng.normal(1, 0.5, c), rng.normal(0, 1, c)
    gpu = backend.from_host
    dx_gpu, x_gpu = gpu(dy), gpu(x)
    rm, rv = gpu(np.zeros(c, param)), gpu(np.ones(c, param))
    mean, var = ref.batch_stats(x)
    tag = f"({np.dtype(dtype).name}, {layout})"
    with counted(f"batch_norm training {tag}") as call:
        y = nbn.batch_norm(x_gpu, rm, rv, gpu(w.astype(param)),
                           gpu(b.astype(param)), training=True, momentum=0.5)
    assert call.made(2)
    close(y, ref.forward(x, mean, var, w, b), dtype, scale=5)
    rm_ref, rv_ref = ref.running_update(np.zeros(c), np.ones(c), x, 0.5)
    close(rm, rm_ref, param, scale=5)
    close(rv, rv_ref, param, scale=5)
    with counted(f"batch_norm eval {tag}") as call:
        y = nbn.batch_norm(x_gpu, rm, rv, training=False)
    assert call.made(1)
    close(y, ref.forward(x, rm_ref, rv_ref), dtype, scale=5)
    with counted(f"batch_norm training, no buffers {tag}") as call:
        y = nbn.batch_norm(x_gpu, None, None, training=True)
    assert call.made(2)
    close(y, ref.forward(x, mean, var), dtype, scale=5)
    with counted(f"batch_norm_forward_training {tag}") as call:
        y, save_mean, save_invstd = nbn.batch_norm_forward_training(
            x_gpu, None, None)
    assert call.made(2)
    close(save_mean, mean, np.float64, scale=5)
    with counted(f"batch_norm_backward, weight None {tag}") as call:
        dx, dw, db = nbn.batch_norm_backward(dx_gpu, x_gpu, None, save_mean,
                                             save_invstd)
    assert call.made(2) and dw is None and db is None
    close(dx, ref.backward_batch_stats(dy, x)[0], dtype, scale=5)
    assert y.strides == x.strides and dx.strides == x.strides


def fused_reference(x, residual, dy, w, b, stats, batch):
    """relu(bn(x) + residual): y, dx, dweight, dbias and d_residual in float64."""
    y = ref.forward(x, *stats, w, b) + (0 if residual is None else residual)
    y = np.maximum(y, 0)
    g = dy * (y > 0)
    grads = (ref.backward_batch_stats(g, x, w) if batch
             else ref.backward_running_stats(g, x, *stats, w))
    return y, grads, g


@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "relu+residual"])
@pytest.mark.parametrize("state", ["train", "eval", "frozen", "frozen, no affine"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_module_flags(layout, state, with_residual, rng, counted):
    """The fused ReLU and residual take no launch of their own: the same
    counts as the plain module, except a backward through the ReLU with
    constant statistics and no parameter gradient, which takes 2."""
    c = 3
    bn = nbn.BatchNorm2d(c, device="cuda", activation="relu",
                         freeze=state.startswith("frozen"),
                         affine=state != "frozen, no affine")
    w, b = rng.normal(1, 0.5, c), rng.normal(0, 1, c)
    rm, rv = rng.normal(0, 1, c), rng.uniform(0.5, 2, c)
    bn.load_state_dict({"weight": w, "bias": b, "running_mean": rm,
                        "running_var": rv}, strict=False)
    w, b = (w, b) if bn.weight is not None else (None, None)
    bn.train(state != "eval")
    x = rng.normal(0.5, 2, (3, c, 2, 3)).astype(np.float32)
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    residual = rng.normal(size=x.shape).astype(np.float32) if with_residual else None
    dy = rng.normal(size=x.shape).astype(np.float32)
    name = f"BatchNorm2d(relu, {state}, {layout}{', residual' if with_residual else ''})"
    with counted(name + " forward") as fwd:
        y = bn(to_device(x), residual=None if residual is None else to_device(residual))
    with counted(name + " backward") as bwd:
        grads = bn.backward(to_device(dy))
    batch = state == "train"
    assert fwd.made(2 if batch else 1) and bwd.made(2)
    dx, d_residual = grads if with_residual else (grads, None)
    stats = ref.batch_stats(x) if batch else (rm, rv)
    y_ref, (dx_ref, dw_ref, db_ref), g = fused_reference(x, residual, dy, w, b, stats, batch)
    close(y, y_ref, scale=5)
    close(dx, dx_ref, scale=5)
    if with_residual:
        np.testing.assert_array_equal(host(d_residual), g.astype(np.float32))
    if state in ("train", "eval"):
        close(bn.grad_weight, dw_ref, scale=x.size)
        close(bn.grad_bias, db_ref, scale=x.size)
    assert host(y).strides == x.strides


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_fused_functional_pair_and_out_as_the_residual(dtype, rng, counted):
    c = 2
    x = rng.normal(1, 2, (3, c, 2, 3)).astype(dtype)
    residual = rng.normal(size=x.shape).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    param = np.float32 if dtype == np.float16 else dtype
    w, b = rng.normal(1, 0.5, c).astype(param), rng.normal(0, 1, c).astype(param)
    gpu = backend.from_host
    x_gpu, r_gpu = gpu(x), gpu(residual)
    tag = np.dtype(dtype).name
    with counted(f"batch_norm_forward_training, relu, out=residual ({tag})") as call:
        y, mean, invstd = nbn.batch_norm_forward_training(
            x_gpu, gpu(w), gpu(b), activation="relu", residual=r_gpu, out=r_gpu)
    assert call.made(2) and y is r_gpu
    y_ref, (dx_ref, dw_ref, db_ref), g = fused_reference(
        x, residual.astype(np.float64), dy.astype(np.float64), w, b,
        ref.batch_stats(x), True)
    close(y, y_ref, dtype, scale=5)
    with counted(f"batch_norm_backward, relu, residual ({tag})") as call:
        dx, dw, db, d_residual = nbn.batch_norm_backward(
            gpu(dy), x_gpu, gpu(w), mean, invstd, activation="relu", y=y,
            residual=True)
    assert call.made(2)
    # The ReLU's mask comes from the stored y, as in PyTorch.
    g = dy.astype(np.float64) * (host(y) > 0)
    dx_ref, dw_ref, db_ref = ref.backward_batch_stats(g, x, w)
    close(dx, dx_ref, dtype, scale=5)
    close(dw, dw_ref, param, scale=x.size)
    close(db, db_ref, param, scale=x.size)
    np.testing.assert_array_equal(host(d_residual), g.astype(dtype))


def test_fused_sync_batch_norm(rng, counted):
    mpi = pytest.importorskip("mpi4py.MPI")
    x = rng.normal(0.5, 2, (3, 2, 2, 2))
    residual, dy = rng.normal(size=x.shape), rng.normal(size=x.shape)
    bn = nbn.SyncBatchNorm(2, comm=mpi.COMM_SELF, device="cuda",
                           dtype="float64", activation="relu")
    with counted("SyncBatchNorm relu+residual forward (1 rank)") as fwd:
        y = bn(to_device(x), residual=to_device(residual))
    with counted("SyncBatchNorm relu+residual backward (1 rank)") as bwd:
        dx, d_residual = bn.backward(to_device(dy))
    assert fwd.made(4) and bwd.made(4)
    y_ref, (dx_ref, _, _), g = fused_reference(x, residual, dy, None, None,
                                               ref.batch_stats(x), True)
    close(y, y_ref, np.float64, scale=5)
    close(dx, dx_ref, np.float64, scale=5)
    np.testing.assert_array_equal(host(d_residual), g)


def test_sync_batch_norm_launches(rng, counted):
    mpi = pytest.importorskip("mpi4py.MPI")
    x = rng.normal(3, 2, (3, 2, 2, 2))
    dy = rng.normal(size=x.shape)
    bn = nbn.SyncBatchNorm(2, comm=mpi.COMM_SELF, device="cuda",
                           dtype="float64")
    with counted("SyncBatchNorm training forward (1 rank)") as fwd:
        y = bn(to_device(x))
    with counted("SyncBatchNorm backward (1 rank)") as bwd:
        dx = bn.backward(to_device(dy))
    # message, merge, then the forward's or backward's two
    assert fwd.made(4) and bwd.made(4)
    mean, var = ref.batch_stats(x)
    close(y, ref.forward(x, mean, var), np.float64, scale=5)
    close(dx, ref.backward_batch_stats(dy, x)[0], np.float64, scale=5)


def test_strides_that_need_copies_add_copy_launches(rng, counted):
    """A 5-d input sliced in every spatial axis has no (N, C, R, S) view:
    each input and the output are copied, a depth slice per launch."""
    full = rng.normal(size=(2, 2, 4, 4, 4))
    d = to_device(full)[:, :, ::2, ::2, ::2]
    with counted("BatchNorm3d training forward, input sliced in D, H, W") as call:
        y = nbn.BatchNorm3d(2, dtype="float64", device="cuda")(d)
    assert call.made(2 + 2)  # 2 depth slices copied, then 2
    x = full[:, :, ::2, ::2, ::2]
    mean, var = ref.batch_stats(x)
    close(y, ref.forward(x, mean, var), np.float64, scale=3)


@pytest.mark.skipif(not SIMULATOR, reason="checks recorded simulator launches")
def test_kernel_arguments_are_never_none(rng):
    """The rule itself: a launch with None is refused, one with the
    placeholders is not (the checker process runs numba-cuda's own code)."""
    placeholder = backend._placeholder(np.float32)
    refused = launch_rules.refusals([
        ("k", [launch_rules.describe(None)]),
        ("k", [launch_rules.describe(placeholder), launch_rules.describe(1.5),
               launch_rules.describe(True), launch_rules.describe(3)]),
    ])
    assert len(refused) == 1 and "none" in refused[0]


def report_lines():
    """The table printed at the end of the test log (``conftest``)."""
    if not REPORT:
        return []
    width = max(len(name) for name, _, _ in REPORT)
    lines = [f"{'public call (simulator, tiny shapes)':<{width}}  launches  views"]
    for name, launches, views in REPORT:
        lines.append(f"{name:<{width}}  {launches:>8}  {views:>5}")
    return lines

