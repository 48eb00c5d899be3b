"""Every GPU kernel compiled to PTX for compute capability 9.0 (H100), no GPU needed.

The simulator runs kernels as Python and never types them; this catches the
typing and lowering errors it cannot (float16 conversions, None-pruned
branches, device-function calls). Needs NVVM from PyPI (the ``test`` extra's
``numba-cuda[cu13]``); skipped under the simulator, which has no compiler.
"""
import types

import numba
import pytest
from numba import types as nt

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
pytestmark = pytest.mark.skipif(SIMULATOR, reason="the simulator compiles nothing")

CC = (9, 0)


@pytest.fixture(autouse=True)
def without_a_device(monkeypatch):
    """Compile device functions for CC without asking a driver.

    numba-cuda compiles a called ``@cuda.jit(device=True)`` function for the
    current device's compute capability, which needs a GPU; pin it to CC.
    """
    import numba.cuda.api
    import numba.cuda.dispatcher
    fake = types.SimpleNamespace(compute_capability=CC)
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device", lambda: fake)
    monkeypatch.setattr(numba.cuda.api, "get_current_device", lambda: fake)


def arr(dtype, ndim, layout="A"):
    return nt.Array(dtype, ndim, layout)


F64 = nt.float64
VEC = arr(F64, 1)
PARTIALS = arr(F64, 2)
DATA_DTYPES = [nt.float16, nt.float32, nt.float64]
PARAM_DTYPES = {nt.float16: [nt.float16, nt.float32], nt.float32: [nt.float32],
                nt.float64: [nt.float64]}


def compile_kernel(kernel, signature):
    from numba import cuda
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=CC)
    assert ".entry" in ptx and f".target sm_{CC[0]}{CC[1]}" in ptx
    return ptx


@pytest.mark.parametrize("dtype", DATA_DTYPES)
def test_element_and_reduction_kernels(dtype):
    from numba_bn import cuda as backend
    x4 = arr(dtype, 4)
    # forward (shift: a strided view of x) and backward (the float64 mean)
    compile_kernel(backend._channel_partials,
                   (x4, x4, arr(dtype, 1), nt.boolean, PARTIALS, PARTIALS))
    compile_kernel(backend._channel_partials,
                   (x4, x4, VEC, nt.boolean, PARTIALS, PARTIALS))
    compile_kernel(backend._affine_pass,
                   (x4, VEC, VEC, VEC, x4, VEC, nt.boolean, x4, nt.boolean))


@pytest.mark.parametrize("dtype", DATA_DTYPES)
@pytest.mark.parametrize("optional", ["all", "none"])
def test_per_channel_kernels(dtype, optional):
    from numba_bn import cuda as backend
    for param in PARAM_DTYPES[dtype]:
        p = arr(param, 1) if optional == "all" else nt.none
        counter = arr(nt.int64, 1) if optional == "all" else nt.none
        compile_kernel(backend._finish_batch_stats,
                       (arr(dtype, 1), PARTIALS, PARTIALS, nt.int64, p, p, F64, p, p, counter,
                        F64, nt.boolean, VEC, VEC, VEC, VEC))
        running = arr(param, 1)
        compile_kernel(backend._finish_running_stats,
                       (running, running, p, p, F64, VEC, VEC, VEC, VEC))
        compile_kernel(backend._finish_backward,
                       (PARTIALS, PARTIALS, nt.int64, VEC, p, nt.boolean, p, p,
                        VEC, VEC, VEC))
    compile_kernel(backend._count_batch, (arr(nt.int64, 1),))
    # SyncBatchNorm: per-channel totals of the partial sums, the merge of
    # the ranks' messages, and the parameter gradients of local sums.
    compile_kernel(backend._merge_partials, (PARTIALS, PARTIALS, VEC, VEC))
    compile_kernel(backend._merge_ranks,
                   (PARTIALS, nt.boolean, PARTIALS, VEC, VEC))
    for param in PARAM_DTYPES[dtype]:
        compile_kernel(backend._finish_backward,
                       (PARTIALS, PARTIALS, nt.int64, VEC, nt.none,
                        nt.boolean, arr(param, 1), arr(param, 1), VEC, VEC,
                        VEC))
