"""GPU kernels against the float64 reference.

Runs under Numba's CUDA simulator in a pytest process of its own
(``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/gpu``), or on a real GPU.
Launch settings are shrunk (``tiny_launches``) so that a few elements
already span several blocks, a ragged last block and grid-stride loops.
"""
import argparse

import numba
import numpy as np
import pytest
from numba import cuda

import numba_bn as nbn
from numba_bn import bench
from numba_bn._dispatch import backend_named

from .. import reference as ref
from ..conftest import TOLERANCE
from .arrays import host, to_device

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
pytestmark = [pytest.mark.skipif(not SIMULATOR and not cuda.is_available(),
                                 reason="no GPU: run under NUMBA_ENABLE_CUDASIM=1"),
              pytest.mark.usefixtures("tiny_launches")]

MODULES = {2: nbn.BatchNorm1d, 3: nbn.BatchNorm1d, 4: nbn.BatchNorm2d,
           5: nbn.BatchNorm3d}
SHAPES = [(5, 3), (2, 3, 5), (3, 2, 2, 3), (2, 2, 2, 1, 3)]



def close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(host(actual), np.float64), expected,
                               rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, param_dtype", [(np.float32, np.float32),
                                                (np.float64, np.float64),
                                                (np.float16, np.float32)])
def test_training_and_eval_steps_match_reference(shape, dtype, param_dtype, rng):
    c = shape[1]
    bn = MODULES[len(shape)](c, momentum=None, device="cuda", dtype=param_dtype)
    w, b = rng.normal(1, 0.5, c), rng.normal(0, 1, c)
    bn.load_state_dict({"weight": w, "bias": b}, strict=False)
    running_mean, running_var = np.zeros(c), np.ones(c)
    for step in range(3):
        training = step < 2
        bn.train(training)
        x = rng.normal(10 * step, 2, shape).astype(dtype)
        dy = rng.normal(0, 1, shape).astype(dtype)
        y = bn(to_device(x))
        dx = bn.backward(to_device(dy))
        if training:
            mean, var = ref.batch_stats(x)
            dx_ref, dw_ref, db_ref = ref.backward_batch_stats(dy, x, w)
            running_mean, running_var = ref.running_update(
                running_mean, running_var, x, 1.0 / (step + 1))
        else:
            mean, var = running_mean, running_var
            dx_ref, dw_ref, db_ref = ref.backward_running_stats(dy, x, mean, var, w)
        assert host(y).dtype == dtype
        y_ref = ref.forward(x, mean, var, w, b)
        close(y, y_ref, dtype, scale=np.abs(y_ref).max())
        close(dx, dx_ref, dtype, scale=np.abs(dx_ref).max() + 1)
        n = x.size // c
        close(bn.grad_weight, dw_ref, param_dtype, scale=n)
        close(bn.grad_bias, db_ref, param_dtype, scale=n)
        close(bn.running_mean, running_mean, param_dtype, scale=10)
        close(bn.running_var, running_var, param_dtype, scale=10)
        assert int(host(bn.num_batches_tracked)) == min(step + 1, 2)


def test_gpu_equals_cpu_module(rng):
    x = rng.normal(3, 2, (4, 3, 2, 2))
    dy = rng.normal(size=x.shape)
    cpu = nbn.BatchNorm2d(3, momentum=0.3, dtype="float64")
    gpu = nbn.BatchNorm2d(3, momentum=0.3, dtype="float64", device="cuda")
    np.testing.assert_allclose(host(gpu(to_device(x))), cpu(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(gpu.backward(to_device(dy))), cpu.backward(dy),
                               rtol=1e-11, atol=1e-12)
    for key, value in cpu.state_dict().items():
        np.testing.assert_allclose(gpu.state_dict()[key], value, rtol=1e-12)


def test_channels_last_and_strided_views(rng):
    nhwc = rng.normal(1, 2, (2, 3, 2, 3)).astype(np.float32)   # N, H, W, C
    x = nhwc.transpose(0, 3, 1, 2)
    d = backend_named("cuda").from_host(x)  # in x's memory order
    assert d.strides == x.strides  # channels-last memory seen as NCHW
    y, mean, invstd = nbn.batch_norm_forward_training(d, None, None)
    assert y.strides == x.strides
    m_ref, v_ref = ref.batch_stats(x)
    close(y, ref.forward(x, m_ref, v_ref), np.float32, scale=3)
    close(mean, m_ref, np.float32, scale=3)
    dy = rng.normal(size=x.shape).astype(np.float32)
    dx, _, _ = nbn.batch_norm_backward(to_device(dy), d, None, mean, invstd)
    close(dx, ref.backward_batch_stats(dy, x)[0], np.float32, scale=3)


def test_3d_input_sliced_in_every_spatial_axis_is_copied_on_device(rng):
    full = rng.normal(size=(2, 2, 4, 4, 4))
    x = full[:, :, ::2, ::2, ::2]
    d = to_device(full)[:, :, ::2, ::2, ::2]
    y = nbn.BatchNorm3d(2, dtype="float64", device="cuda")(d)
    mean, var = ref.batch_stats(x)
    close(y, ref.forward(x, mean, var), np.float64, scale=3)


def test_functional_batch_norm_updates_device_buffers(rng):
    x = rng.normal(2, 1, (6, 3))
    rm, rv = to_device(np.zeros(3)), to_device(np.ones(3))
    y = nbn.batch_norm(to_device(x), rm, rv, training=True, momentum=0.5)
    mean, var = ref.batch_stats(x)
    close(y, ref.forward(x, mean, var), np.float64, scale=3)
    rm_ref, rv_ref = ref.running_update(np.zeros(3), np.ones(3), x, 0.5)
    close(rm, rm_ref, np.float64)
    close(rv, rv_ref, np.float64)
    y_eval = nbn.batch_norm(to_device(x), rm, rv, training=False)
    close(y_eval, ref.forward(x, rm_ref, rv_ref), np.float64, scale=3)


def test_frozen_module_on_gpu(rng):
    bn = nbn.BatchNorm1d(2, freeze=True, device="cuda", dtype="float64")
    state = {"weight": [2.0, 3.0], "bias": [1.0, -1.0], "running_mean": [1.0, 2.0],
             "running_var": [4.0, 9.0], "num_batches_tracked": np.array(5)}
    bn.load_state_dict(state)
    x = rng.normal(size=(1, 2))  # one value per channel is fine when frozen
    dy = rng.normal(size=(1, 2))
    y = bn(to_device(x))
    close(y, ref.forward(x, state["running_mean"], state["running_var"],
                         state["weight"], state["bias"]), np.float64, scale=3)
    dx_ref = ref.backward_running_stats(dy, x, state["running_mean"],
                                        state["running_var"], state["weight"])[0]
    close(bn.backward(to_device(dy)), dx_ref, np.float64, scale=3)
    assert bn.grad_weight is None and bn.grad_bias is None
    for key, value in state.items():
        np.testing.assert_array_equal(bn.state_dict()[key], value)


def test_device_mismatch_names_to_and_changes_nothing(rng):
    x = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    on_cpu = nbn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"\.to\('cuda'\)"):
        on_cpu(to_device(x))
    on_gpu = nbn.BatchNorm2d(3, device="cuda")
    with pytest.raises(ValueError, match=r"\.to\('cpu'\)"):
        on_gpu(x)
    assert int(host(on_gpu.num_batches_tracked)) == 0
    with pytest.raises(ValueError, match=r"\.to\('cuda'\)"):
        nbn.batch_norm(to_device(x), np.zeros(3, np.float32),
                       np.ones(3, np.float32))


def test_to_moves_everything_and_back(rng):
    bn = nbn.BatchNorm2d(3)
    x = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    bn(x)
    bn.backward(np.ones_like(x))
    before = bn.state_dict()
    assert bn.to("cuda") is bn and bn.device == "cuda"
    assert not isinstance(bn.weight, np.ndarray)
    assert not isinstance(bn.grad_weight, np.ndarray)
    for key, value in before.items():
        np.testing.assert_array_equal(bn.state_dict()[key], value)
    with pytest.raises(RuntimeError, match="before any forward"):
        bn.backward(to_device(np.ones_like(x)))  # the saved input stayed on the CPU
    bn.to("cpu")
    assert isinstance(bn.weight, np.ndarray) and isinstance(bn.num_batches_tracked, np.ndarray)
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.running_var, 1)


def test_empty_batch_and_resets_on_gpu():
    bn = nbn.BatchNorm2d(2, device="cuda")
    y = bn(to_device(np.zeros((0, 2, 3, 3), np.float32)))
    assert y.shape == (0, 2, 3, 3)
    assert int(host(bn.num_batches_tracked)) == 0
    bn.load_state_dict({"weight": [3, 3], "bias": [1, 1], "running_mean": [1, 1],
                        "running_var": [2, 2], "num_batches_tracked": np.array(4)})
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.state_dict()["running_var"], 1)
    assert int(bn.state_dict()["num_batches_tracked"]) == 0
    np.testing.assert_array_equal(bn.state_dict()["weight"], 3)


@pytest.mark.parametrize("sliced", [False, True])
def test_out_on_gpu(sliced, rng):
    full = rng.normal(size=(2, 2, 4, 2, 4))
    x = full[:, :, ::2, :, ::2] if sliced else full
    d = to_device(full)
    d = d[:, :, ::2, :, ::2] if sliced else d
    out_full = to_device(np.zeros(full.shape))
    out = out_full[:, :, ::2, :, ::2] if sliced else out_full
    bn = nbn.BatchNorm3d(2, dtype="float64", device="cuda")
    assert bn(d, out=out) is out
    mean, var = ref.batch_stats(x)
    expected = ref.forward(x, mean, var)
    got = host(out_full)
    np.testing.assert_allclose(got[:, :, ::2, :, ::2] if sliced else got, expected,
                               rtol=1e-10, atol=1e-10)
    if sliced:  # the elements between the slices were left alone
        np.testing.assert_array_equal(got[:, :, 1::2], 0)


def test_sync_batch_norm_reduces_on_the_device(rng):
    """SyncBatchNorm's GPU path (device partial sums, host staging) on one
    rank equals the reference batch norm; the MPI tests cover many ranks."""
    mpi = pytest.importorskip("mpi4py.MPI")
    shape = (3, 2, 2, 3)
    x, dy = rng.normal(5, 2, shape), rng.normal(0, 1, shape)
    bn = nbn.SyncBatchNorm(2, comm=mpi.COMM_SELF, device="cuda",
                           dtype="float64")
    y = bn(to_device(x))
    dx = bn.backward(to_device(dy))
    mean, var = ref.batch_stats(x)
    dx_ref, dw_ref, db_ref = ref.backward_batch_stats(dy, x)
    running_mean, running_var = ref.running_update(np.zeros(2), np.ones(2), x,
                                                   0.1)
    close(y, ref.forward(x, mean, var), np.float64, scale=5)
    close(dx, dx_ref, np.float64, scale=5)
    close(bn.grad_weight, dw_ref, np.float64, scale=x.size)
    close(bn.grad_bias, db_ref, np.float64, scale=x.size)
    close(bn.running_mean, running_mean, np.float64, scale=10)
    close(bn.running_var, running_var, np.float64, scale=10)


class Foreign:
    """Only ``__cuda_array_interface__``, as other libraries' arrays."""

    def __init__(self, owner):
        self.owner = owner  # keeps the memory alive
        self.__cuda_array_interface__ = owner.__cuda_array_interface__


@pytest.mark.skipif(SIMULATOR, reason="the simulator reads no foreign CUDA arrays")
def test_foreign_cuda_arrays_as_input_and_out(rng):
    # Any __cuda_array_interface__ object, as PyTorch's tensors, serves as
    # input and as out= (whose dtype need not be NumPy's).
    nhwc = rng.normal(1, 2, (2, 2, 3, 3)).astype(np.float32)
    x = nhwc.transpose(0, 3, 1, 2)
    gpu = backend_named("cuda")
    out = Foreign(gpu.from_host(np.full_like(x, np.nan)))
    nbn.BatchNorm2d(3, device="cuda")(Foreign(gpu.from_host(x)), out=out)
    mean, var = ref.batch_stats(x)
    close(out.owner, ref.forward(x, mean, var), np.float32, scale=3)


def test_gpu_bench_checks_and_times_every_case(capsys):
    # The GPU bench has run on no GPU yet: here it runs on tiny shapes
    # (Numba device arrays, no PyTorch CUDA), checking each result against
    # the float64 reference; a wrong one would make it return 1. Quick:
    # float32 only (CI's run of scripts/gpu_check.sh takes float16 too).
    args = argparse.Namespace(quick=True, rounds=1)
    shapes = {"float32": (2, 3, 2, 3), "float16": (3, 3, 2, 2)}
    assert bench.gpu_main(args, None, shapes) == 0
    lines = capsys.readouterr().out.splitlines()
    # layouts x (3 operations + 2 fused ones)
    assert len(lines) == 2 + 2 * (3 + 2)
    assert sum("relu" in line for line in lines) == 2 * 2
    assert all("WRONG" not in line for line in lines)


def test_out_overlapping_an_input_is_refused_on_the_gpu(rng):
    x = to_device(rng.normal(size=(4, 3, 2, 2)).astype(np.float32))
    bn = nbn.BatchNorm2d(3, device="cuda")
    with pytest.raises(ValueError, match="overlap"):
        bn(x, out=x)
    assert int(host(bn.num_batches_tracked)) == 0  # nothing changed
    y = bn(x)
    with pytest.raises(ValueError, match="overlap"):
        bn.backward(y, out=y)


def test_launch_stream_follows_the_producer(monkeypatch):
    """Arrays that name a producer stream (foreign ``__cuda_array_interface__``
    views) run the kernels on it; other arrays make it wait through an
    event, never the host. (On hardware the streams are real; the
    simulator has no external streams, so stand-ins are used here.)"""
    from numba_bn import cuda as backend
    producer, other = object(), object()
    monkeypatch.setattr(backend, "_stream_key", id)
    calls = []

    class Event:
        def record(self, stream):
            calls.append(("record", stream))

        def wait(self, stream):
            calls.append(("wait", stream))

    monkeypatch.setattr(backend.cuda, "event", lambda timing: Event())
    named = type("View", (), {"stream": producer})()
    assert backend._stream_for(named) is producer
    plain = type("View", (), {"stream": 0})()
    assert backend._stream_for(plain) is not producer  # Numba's default
    backend._after_producers(producer, [named, plain, None])
    assert calls == []
    backend._after_producers(other, [named])
    assert calls == [("record", producer), ("wait", other)]


@pytest.mark.parametrize("affine", [True, False])
def test_eval_backward_reads_no_x_on_the_gpu(affine, rng):
    x = rng.normal(size=(3, 2, 2, 3))
    x[0, 0, 1, 1], x[2, 1, 0, 2] = np.nan, np.inf
    dy = rng.normal(size=x.shape)
    bn = nbn.BatchNorm2d(2, affine=affine, dtype="float64", device="cuda").eval()
    bn(to_device(x))
    dx = host(bn.backward(to_device(dy)))
    np.testing.assert_allclose(dx, dy / np.sqrt(1 + 1e-5), rtol=1e-12)
    if affine:
        assert not np.isfinite(host(bn.grad_weight)).any()  # as PyTorch's
