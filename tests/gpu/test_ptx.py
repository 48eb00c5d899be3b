"""Every GPU kernel compiled to PTX for compute capability 9.0 (H100), no GPU needed.

The simulator runs kernels as Python and never types them; this catches the
typing and lowering errors it cannot (float16 conversions, None-pruned
branches, device-function calls). Needs NVVM from PyPI (the ``test`` extra's
``numba-cuda[cu13]``); skipped under the simulator, which has no compiler.
"""
import re
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
VEC = arr(F64, 1, "C")
MATRIX = arr(F64, 2, "C")
DATA_DTYPES = [nt.float16, nt.float32, nt.float64]
PARAM_DTYPES = {nt.float16: [nt.float16, nt.float32], nt.float32: [nt.float32],
                nt.float64: [nt.float64]}
# Inputs as the launch code types them: 'C' for contiguous NCHW views,
# 'A' for channels-last and other strides.
LAYOUTS = ["C", "A"]
MAX_REGISTERS = 64
REPORT = {}  # kernel and signature -> (registers, stack, spill stores, spill loads)


def compile_kernel(kernel, signature):
    """PTX for CC, with the kernel's own launch bounds."""
    from numba import cuda
    ptx, _ = cuda.compile_ptx(
        kernel.py_func, signature, cc=CC,
        launch_bounds=kernel.targetoptions.get("launch_bounds"))
    assert ".entry" in ptx and f".target sm_{CC[0]}{CC[1]}" in ptx
    return ptx


def ptxas_report(ptx):
    """Registers, stack frame and spills as ptxas reports them (nvJitLink
    from PyPI with ``-Xptxas=-v``)."""
    from cuda.bindings import nvjitlink
    handle = nvjitlink.create(2, [f"-arch=sm_{CC[0]}{CC[1]}", "-Xptxas=-v"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data),
                           "kernel")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
    finally:
        nvjitlink.destroy(handle)
    log = log.decode()
    registers = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads", log)
    assert registers and frame, log
    return (int(registers.group(1)),) + tuple(int(v) for v in frame.groups())


def sixty_four_bit_divisions(ptx):
    return [line.strip() for line in ptx.splitlines()
            if re.search(r"\b(div|rem)\.[su]64\b", line)]


def signatures(dtype, param, layout):
    """The argument types ``cuda._launch_statistics`` and
    ``cuda._launch_normalize`` pass (placeholders share them)."""
    x4 = arr(dtype, 4, layout)
    p = arr(param, 1, "C")
    # y4 and g4 (the ReLU's output and dy through it) are x4 when absent.
    statistics = (x4, x4, x4, x4, nt.boolean, nt.boolean, nt.boolean, VEC, nt.int64,
                  arr(F64, 3, "C"), arr(nt.int32, 1, "C"), nt.boolean,
                  nt.int64, p, p, F64, p, p, arr(nt.int64, 1, "C"), F64,
                  nt.boolean, VEC, VEC, MATRIX, p, p, nt.boolean, MATRIX,
                  nt.int64)
    normalize = (x4, x4, nt.boolean, x4, nt.boolean, nt.boolean, nt.int64,
                 MATRIX, p, p, p, p, F64, VEC, VEC)
    return statistics, normalize


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DATA_DTYPES)
def test_streaming_kernels_fit_the_budget(dtype, layout):
    """Both kernels compile for sm_90 in every dtype with at most 64
    registers a thread, no stack frame or spills, and no 64-bit integer
    division (one costs dozens of instructions)."""
    from numba_bn import cuda as backend
    for param in PARAM_DTYPES[dtype]:
        for kernel, signature in zip((backend._statistics, backend._normalize),
                                     signatures(dtype, param, layout)):
            ptx = compile_kernel(kernel, signature)
            assert sixty_four_bit_divisions(ptx) == []
            resources = ptxas_report(ptx)
            REPORT[(kernel.py_func.__name__, str(dtype), str(param),
                    layout)] = resources
            registers, frame, spill_stores, spill_loads = resources
            assert registers <= MAX_REGISTERS
            assert frame == spill_stores == spill_loads == 0


def test_rank_merge_kernel():
    from numba_bn import cuda as backend
    ptx = compile_kernel(backend._merge_ranks,
                         (MATRIX, nt.boolean, MATRIX, arr(F64, 3, "C"), VEC))
    resources = ptxas_report(ptx)
    REPORT[("_merge_ranks", "float64", "float64", "C")] = resources
    assert resources[0] <= MAX_REGISTERS and resources[2:] == (0, 0)


def test_the_checks_can_fail():
    """A kernel with a 64-bit division and more live values than 64
    registers hold is caught by both checks."""
    from numba import cuda

    @cuda.jit
    def heavy(a, n):
        i = cuda.grid(1)
        values = cuda.local.array(96, nt.float64)
        for j in range(96):
            values[j] = a[(i * j) // n]
        total = 0.0
        for j in range(96):
            total += values[j] * values[95 - j]
        a[i] = total

    ptx, _ = cuda.compile_ptx(heavy.py_func, (VEC, nt.int64), cc=CC)
    assert sixty_four_bit_divisions(ptx)
    registers, frame, _, _ = ptxas_report(ptx)
    assert registers > MAX_REGISTERS or frame > 0


def report_lines():
    """The table printed at the end of the test log (``conftest``)."""
    if not REPORT:
        return []
    lines = ["kernel        data     params   layout  registers  stack  spills"]
    for (kernel, dtype, param, layout), (registers, frame, stores, loads) \
            in sorted(REPORT.items()):
        lines.append(f"{kernel:<13} {dtype:<8} {param:<8} {layout:<7} "
                     f"{registers:>9}  {frame:>5}  {stores + loads:>6}")
    return lines
