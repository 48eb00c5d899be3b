"""SyncBatchNorm against a single-process batch norm on the concatenated batch.

Runs under ``mpiexec -n 2`` and ``mpiexec -n 3`` (and in the plain
single-process run, with one rank). Every rank builds the same whole batch
from a shared seed, keeps its own shard, and checks its slice of ``y`` and
``dx``, the running statistics and its own parameter gradients against
PyTorch's BatchNorm and the float64 reference on the whole batch. Tests run
in the same order on every rank, so their collectives match up.
"""
import sys

import numpy as np
import pytest
import torch

import numba_bn as nbn

from .. import reference as ref
from ..conftest import TOLERANCE

MPI = pytest.importorskip("mpi4py.MPI")
WORLD = MPI.COMM_WORLD

TORCH_MODULES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
                 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
# (per-sample shape, channels-last) of the inputs: (N, C), (N, C, L),
# NCHW, NHWC memory seen as NCHW, and (N, C, D, H, W).
LAYOUTS = {"1d": ((3,), False), "1d_length": ((3, 5), False),
           "2d": ((3, 4, 5), False), "2d_channels_last": ((3, 4, 5), True),
           "3d": ((2, 3, 2, 3), False)}


def shard_sizes(pattern, ranks):
    """Samples per rank: equal, unequal, or with rank 0 empty."""
    if pattern == "equal":
        return [4] * ranks
    if pattern == "unequal":
        return [2 * r + 1 for r in range(ranks)]
    return [0] + [3] * (ranks - 1)


def whole_batch(sizes, sample_shape, channels_last, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = (sum(sizes),) + sample_shape
    x = rng.normal(2.0, 3.0, shape)
    if channels_last:  # NHWC memory, seen as NCHW
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    return x.astype(dtype), rng.normal(0.0, 1.0, shape).astype(dtype)


def shard(a, sizes, rank):
    start = sum(sizes[:rank])
    return a[start:start + sizes[rank]]


def torch_steps(x, dy, momentum, steps, weight, bias):
    """PyTorch's BatchNorm on the whole batch: y, dx, dweight, dbias of the
    last step, and the running statistics after ``steps`` steps."""
    module = TORCH_MODULES[x.ndim](x.shape[1], momentum=momentum,
                                   dtype=torch.from_numpy(x).dtype)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        module.bias.copy_(torch.from_numpy(bias))
    for _ in range(steps):
        xt = torch.from_numpy(x.copy()).requires_grad_()
        module.zero_grad()
        y = module(xt)
        y.backward(torch.from_numpy(dy))
    return (y.detach().numpy(), xt.grad.numpy(), module.weight.grad.numpy(),
            module.running_mean.numpy(), module.running_var.numpy())


def close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float64),
                               np.asarray(expected, np.float64),
                               rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", ["equal", "unequal", "one_empty"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_batch_norm_on_the_concatenated_batch(layout, pattern, dtype,
                                                      momentum):
    sizes = shard_sizes(pattern, WORLD.size)
    if sum(sizes) < 2:
        pytest.skip("one rank with an empty shard holds no batch")
    sample_shape, channels_last = LAYOUTS[layout]
    c = sample_shape[0]
    x, dy = whole_batch(sizes, sample_shape, channels_last, dtype, seed=7)
    rng = np.random.default_rng(8)
    weight, bias = (rng.normal(1, 0.3, c).astype(dtype),
                    rng.normal(0, 1, c).astype(dtype))
    bn = nbn.SyncBatchNorm(c, momentum=momentum, dtype=dtype)
    bn.load_state_dict({"weight": weight, "bias": bias}, strict=False)
    x_mine, dy_mine = shard(x, sizes, WORLD.rank), shard(dy, sizes, WORLD.rank)
    for _ in range(2):
        y = bn(x_mine)
    dx = bn.backward(dy_mine)

    y_t, dx_t, _, mean_t, var_t = torch_steps(x, dy, momentum, 2, weight, bias)
    assert y.shape == x_mine.shape and y.dtype == dtype
    assert y.strides == x_mine.strides or x_mine.size == 0
    close(y, shard(y_t, sizes, WORLD.rank), dtype, scale=5)
    close(dx, shard(dx_t, sizes, WORLD.rank), dtype, scale=5)
    close(bn.running_mean, mean_t, dtype, scale=3)
    close(bn.running_var, var_t, dtype, scale=10)
    assert int(bn.num_batches_tracked) == 2
    # The parameter gradients are this rank's own sums (float64 oracle).
    mean, var = ref.batch_stats(x)
    xhat = ref.forward(x_mine, mean, var)
    axes = (0,) + tuple(range(2, x.ndim))
    close(bn.grad_bias, dy_mine.astype(np.float64).sum(axis=axes), dtype,
          scale=x.size)
    close(bn.grad_weight, (dy_mine * xhat).sum(axis=axes), dtype, scale=x.size)
    # Every rank holds bit-identical running statistics.
    gathered = WORLD.allgather((bn.running_mean.copy(), bn.running_var.copy()))
    for other_mean, other_var in gathered:
        np.testing.assert_array_equal(other_mean, bn.running_mean)
        np.testing.assert_array_equal(other_var, bn.running_var)


@pytest.mark.parametrize("layout", ["1d", "2d", "2d_channels_last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_relu_and_residual_match_torch_on_the_concatenated_batch(layout, dtype):
    """relu(bn(x) + residual) over all ranks: y, dx, d_residual against
    PyTorch's separate steps on the whole batch."""
    sizes = [r + 2 for r in range(WORLD.size)]  # unequal, each at least 2
    sample_shape, channels_last = LAYOUTS[layout]
    c = sample_shape[0]
    x, dy = whole_batch(sizes, sample_shape, channels_last, dtype, seed=9)
    residual = np.random.default_rng(10).normal(size=x.shape).astype(dtype)
    bn = nbn.SyncBatchNorm(c, dtype=dtype, activation="relu")
    y = bn(shard(x, sizes, WORLD.rank), residual=shard(residual, sizes, WORLD.rank))
    dx, d_residual = bn.backward(shard(dy, sizes, WORLD.rank))

    module = TORCH_MODULES[x.ndim](c, dtype=torch.from_numpy(x).dtype)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    rt = torch.from_numpy(residual).requires_grad_()
    y_t = torch.relu(module(xt) + rt)
    y_t.backward(torch.from_numpy(dy))
    close(y, shard(y_t.detach().numpy(), sizes, WORLD.rank), dtype, scale=5)
    close(dx, shard(xt.grad.numpy(), sizes, WORLD.rank), dtype, scale=5)
    np.testing.assert_array_equal(d_residual, shard(rt.grad.numpy(), sizes, WORLD.rank))
    close(bn.running_var, module.running_var.detach().numpy(), dtype, scale=10)
    mine = shard(rt.grad.numpy(), sizes, WORLD.rank).astype(np.float64)
    close(bn.grad_bias, mine.sum(axis=(0,) + tuple(range(2, x.ndim))), dtype,
          scale=x.size)


def test_hard_input_statistics_do_not_cancel():
    """Mean 1e4, std 1 in float32, split unevenly: float32 rounding only."""
    sizes = shard_sizes("unequal", WORLD.size)
    x, _ = whole_batch(sizes, (3, 16, 16), False, np.float64, seed=3)
    x = (x / 3.0 + 1e4).astype(np.float32)
    bn = nbn.SyncBatchNorm(3)
    y = bn(shard(x, sizes, WORLD.rank))
    mean, var = ref.batch_stats(x)
    expected = shard(ref.forward(x, mean, var), sizes, WORLD.rank)
    assert np.abs(y - expected).max() <= 1e-6 * np.abs(expected).max()


def train_step_matches_reference(bn, sizes, seed, rank):
    """One float64 training step of ``bn`` on this rank's shard of a
    2-channel batch, against the reference on the whole batch."""
    x, dy = whole_batch(sizes, (2, 3), False, np.float64, seed=seed)
    y = bn(shard(x, sizes, rank))
    dx = bn.backward(shard(dy, sizes, rank))
    mean, var = ref.batch_stats(x)
    dx_ref, _, _ = ref.backward_batch_stats(dy, x)
    close(y, shard(ref.forward(x, mean, var), sizes, rank), np.float64)
    close(dx, shard(dx_ref, sizes, rank), np.float64)


def test_sub_communicators_share_statistics_within_themselves():
    color = WORLD.rank % 2
    comm = WORLD.Split(color, WORLD.rank)
    try:
        # Each group its own batch: another seed per color.
        train_step_matches_reference(
            nbn.SyncBatchNorm(2, comm=comm, dtype="float64"),
            [2 + r for r in range(comm.size)], 20 + color, comm.rank)
    finally:
        comm.Free()


def test_without_affine_parameters_there_are_no_parameter_gradients():
    bn = nbn.SyncBatchNorm(2, affine=False, dtype="float64")
    train_step_matches_reference(bn, shard_sizes("unequal", WORLD.size), 30,
                                 WORLD.rank)
    assert bn.grad_weight is None and bn.grad_bias is None


def test_whole_batch_of_one_value_per_channel_raises_on_every_rank():
    sizes = [1] + [0] * (WORLD.size - 1)
    bn = nbn.SyncBatchNorm(2)
    x = np.ones((sizes[WORLD.rank], 2), np.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(x)
    assert int(bn.num_batches_tracked) == 0


def test_every_rank_empty_changes_nothing():
    bn = nbn.SyncBatchNorm(2)
    y = bn(np.empty((0, 2), np.float32))
    assert y.shape == (0, 2) and int(bn.num_batches_tracked) == 0
    dx = bn.backward(np.empty((0, 2), np.float32))
    assert dx.shape == (0, 2)


@pytest.mark.skipif(WORLD.size == 1, reason="needs two ranks")
def test_channel_counts_that_differ_raise_on_every_rank():
    c = 3 if WORLD.rank == 0 else 4
    bn = nbn.SyncBatchNorm(c)
    with pytest.raises(ValueError, match="num_features differs"):
        bn(np.ones((2, c), np.float32))
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.skipif(WORLD.size == 1, reason="needs two ranks")
def test_a_bad_input_on_one_rank_raises_everywhere_without_deadlock():
    bn = nbn.SyncBatchNorm(2)
    x = np.arange(8.0, dtype=np.float32).reshape(4, 2)
    if WORLD.rank == 0:
        with pytest.raises(TypeError):
            bn(x.astype(np.int64))
    else:
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[0\]"):
            bn(x)
    assert int(bn.num_batches_tracked) == 0
    bn(x)  # the ranks are still in step
    if WORLD.rank == 0:
        with pytest.raises(ValueError):
            bn.backward(np.ones((3, 2), np.float32))
    else:
        with pytest.raises(RuntimeError):
            bn.backward(np.ones((4, 2), np.float32))
    assert int(bn.num_batches_tracked) == 1


def test_an_input_changed_in_place_on_one_rank_raises_everywhere():
    # Shards of different means: each shard's own sums about the whole
    # batch's mean are far from 0, and only a change may move them.
    bn = nbn.SyncBatchNorm(3)
    rng = np.random.default_rng(WORLD.rank)
    x = (rng.normal(size=(5, 3, 4)) + 100.0 * WORLD.rank).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    last = WORLD.size - 1
    for index in [(0, 0, 0), (2, 1, 3)]:
        bn(x)
        if WORLD.rank == last:
            x[index] += 0.5
            with pytest.raises(RuntimeError, match="changed in place before backward"):
                bn.backward(dy)
            x[index] -= 0.5
        else:
            with pytest.raises(RuntimeError, match=rf"rank\(s\) \[{last}\]"):
                bn.backward(dy)
        assert bn.grad_weight is None
    bn(x)
    bn.backward(dy)  # the ranks are still in step; unchanged input passes
    assert bn.grad_weight is not None


class _NoCommunication:
    """A communicator that fails the test if anything is sent."""

    size, rank = 1, 0

    def allgather(self, _):
        raise AssertionError("eval and frozen modules must not communicate")


def test_eval_and_frozen_modules_do_not_communicate():
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    for bn in (nbn.SyncBatchNorm(3, comm=_NoCommunication()).eval(),
               nbn.SyncBatchNorm(3, comm=_NoCommunication(), freeze=True)):
        y = bn(x)
        dx = bn.backward(np.ones_like(x))
        close(y, x / np.sqrt(1 + 1e-5), np.float32)
        close(dx, np.ones_like(x) / np.sqrt(1 + 1e-5), np.float32)


def test_convert_sync_batchnorm_shares_parameters_and_buffers():
    bn = nbn.megengine.BatchNorm2d(3, momentum=0.75)
    bn.eval()
    sync = nbn.convert_sync_batchnorm(bn)
    assert isinstance(sync, nbn.SyncBatchNorm) and sync.comm is WORLD
    assert sync.momentum == pytest.approx(0.25) and not sync.training
    for key in ("weight", "bias", "running_mean", "running_var",
                "num_batches_tracked"):
        assert getattr(sync, key) is getattr(bn, key)
    with pytest.raises(TypeError, match="numba_bn batch norm"):
        nbn.convert_sync_batchnorm(torch.nn.BatchNorm2d(3))


def test_missing_mpi4py_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"numba_bn\[mpi\]"):
        nbn.SyncBatchNorm(3)
