"""SyncBatchNorm on GPU arrays, against PyTorch on the concatenated batch.

Both ways the per-channel messages can travel are run: device buffers
handed to the MPI (``NUMBA_BN_CUDA_AWARE_MPI=1``, what a CUDA-aware MPI
gets) and staging through host memory (``=0``). Runs on a real GPU, or
under ``NUMBA_ENABLE_CUDASIM=1 mpiexec -n 2``, where device memory is host
memory, so the device-buffer path runs with any MPI.
"""
import numba
import numpy as np
import pytest
from numba import cuda

import numba_bn as nbn
from numba_bn import cuda as backend

from .test_sync import close, shard, shard_sizes, torch_steps, whole_batch
from ..gpu.arrays import host, to_device

MPI = pytest.importorskip("mpi4py.MPI")
WORLD = MPI.COMM_WORLD

pytestmark = [
    pytest.mark.skipif(not numba.config.ENABLE_CUDASIM and not cuda.is_available(),
                       reason="no GPU: run under NUMBA_ENABLE_CUDASIM=1"),
    pytest.mark.usefixtures("tiny_launches")]


@pytest.fixture(params=["0", "1"], ids=["staged", "device_buffers"])
def device_buffers(request, monkeypatch):
    """Whether the MPI gets device buffers; records the buffers it got."""
    monkeypatch.setenv("NUMBA_BN_CUDA_AWARE_MPI", request.param)
    handed = []
    message_buffer = backend.message_buffer

    def recording(a):
        handed.append(a)
        return message_buffer(a)

    monkeypatch.setattr(backend, "message_buffer", recording)
    return request.param == "1", handed



@pytest.mark.parametrize("pattern", ["unequal", "one_empty"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_batch_norm_on_the_concatenated_batch(pattern, dtype,
                                                      device_buffers):
    gpu_buffers, handed = device_buffers
    sizes = shard_sizes(pattern, WORLD.size)
    if sum(sizes) < 2:
        pytest.skip("one rank with an empty shard holds no batch")
    x, dy = whole_batch(sizes, (3, 2, 3), False, dtype, seed=11)
    rng = np.random.default_rng(12)
    weight, bias = rng.normal(1, 0.3, 3), rng.normal(0, 1, 3)
    bn = nbn.SyncBatchNorm(3, momentum=None, device="cuda", dtype=dtype)
    bn.load_state_dict({"weight": weight, "bias": bias}, strict=False)
    x_mine, dy_mine = shard(x, sizes, WORLD.rank), shard(dy, sizes, WORLD.rank)
    for _ in range(2):
        y = bn(to_device(x_mine))
    dx = bn.backward(to_device(dy_mine))

    y_t, dx_t, dw_t, mean_t, var_t = torch_steps(
        x, dy, None, 2, weight.astype(dtype), bias.astype(dtype))
    close(host(y), shard(y_t, sizes, WORLD.rank), dtype, scale=5)
    close(host(dx), shard(dx_t, sizes, WORLD.rank), dtype, scale=5)
    close(host(bn.running_mean), mean_t, dtype, scale=3)
    close(host(bn.running_var), var_t, dtype, scale=10)
    # Parameter gradients: this rank's own sums; summed over the ranks they
    # are the whole batch's.
    total_dw = WORLD.allreduce(host(bn.grad_weight).astype(np.float64))
    close(total_dw, dw_t, dtype, scale=x.size)
    assert host(bn.grad_bias).dtype == dtype
    close(host(bn.grad_bias), dy_mine.astype(np.float64).sum(axis=(0, 2, 3)),
          dtype, scale=x.size)
    # Device buffers reach the MPI only when it is CUDA-aware: two forwards
    # and a backward, one buffer each.
    assert len(handed) == (3 if gpu_buffers else 0)


@pytest.mark.skipif(WORLD.size == 1, reason="needs two ranks")
def test_an_input_on_the_wrong_device_raises_everywhere(device_buffers):
    bn = nbn.SyncBatchNorm(2, device="cuda", dtype="float64")
    x = np.arange(8.0).reshape(4, 2)
    if WORLD.rank == 0:
        with pytest.raises(ValueError, match="input is on cpu"):
            bn(x)
    else:
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[0\]"):
            bn(to_device(x))
    assert int(host(bn.num_batches_tracked)) == 0
    bn(to_device(x))  # the ranks are still in step
    assert int(host(bn.num_batches_tracked)) == 1
