"""GPU backend: Numba CUDA kernels on device arrays, and their launch code.

Twin of ``cpu.py``: the public functions below have the same names and
signatures there, and the per-channel formulas are the same source
(``_channel.py``). Inputs arrive validated (``functional.py``); the kernels
see the canonical ``(N, C, R, S)`` view of ``_layout.py``, zero-copy.

Two kernels do all the work, each for both memory orders:

- ``_statistics``: per-channel float64 sums (shifted moments forward,
  gradient sums backward). Each block writes one partial row; the last
  block of a channel to finish (an atomic ticket after
  ``cuda.threadfence()``) merges the rows and runs the per-channel formulas
  (statistics, running averages, coefficients, gradients).
- ``_normalize``: ``out = (x - mean) * scale + offset [+ gain * dy]``.

So a training forward is two launches, an eval forward one, a backward two
(one without parameter gradients in eval). Each thread keeps one channel
and walks that channel's positions ``(n, r, s)``: along NCHW planes a
block's threads take consecutive positions of one channel, each thread
``_UNROLL`` neighbours at a time; channels-last (and ``(N, C)``) threads of
a warp take consecutive channels of one position, so loads coalesce either
way. Positions advance by a step split once into ``(n, r, s)`` digits: two
carries per element, no integer division (a 64-bit one costs dozens of
instructions).

Kernel arguments are never ``None``: numba-cuda's launcher refuses it
(only the simulator accepts it). Absent optional arrays are empty
placeholders of the same type (``_channel`` tells them apart).

Streams: a CuPy input runs on CuPy's current stream; any other
``__cuda_array_interface__`` input runs on the stream its producer names
(``stream``, version 3), so its data is written before the kernels read
it without a host wait; Numba device arrays run on Numba's default stream.
Outputs are ready on that stream. Nothing is read back to the host in
forward or backward (SyncBatchNorm reads one ``(ranks, 2)`` header).
"""
import functools
import importlib
import importlib.util

import numba
import numpy as np
from numba import cuda

from . import _channel, config
from ._layout import canonical_geometry, is_channels_last, output_allocation

DEVICE = "cuda"

_SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if _SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import (
        FakeCUDAArray as _DeviceArray,
    )
else:
    from numba.cuda.cudadrv import driver as _driver
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _DeviceArray

# CuPy, looked up once (never under the simulator, which has no device
# memory for it): its arrays and memory pool serve when installed.
_CUPY = (None if _SIMULATOR or importlib.util.find_spec("cupy") is None
         else importlib.import_module("cupy"))

# The grid's y dimension (channel slots) has this limit; slots beyond it
# are strided over.
_MAX_GRID_Y = 65535
# Positions a thread loads before it uses them: independent loads in flight
# hide the memory latency (one a thread leaves a streaming kernel under HBM
# bandwidth). Two keep both kernels within 64 registers a thread (four took
# 72 and 80), so that at least half of the warps an SM holds fit.
_UNROLL = 2
# At most 256 threads a block (``config.threads_per_block``), and registers
# for 4 such blocks an SM: 64 a thread, half the warps an SM can hold, enough
# to keep loads in flight. ptxas then fits the statistics kernel's float16
# finishers in 64 registers without spilling (68 unbounded).
_LAUNCH_BOUNDS = (256, 4)
# The simulator's jit takes no launch bounds.
_STREAMING = {} if _SIMULATOR else {"launch_bounds": _LAUNCH_BOUNDS}
# Position arithmetic is 32-bit: a channel holds at most this many values.
_MAX_POSITIONS = 2**32 - 1

# What ``_statistics`` finishes with its sums.
_FORWARD, _BACKWARD, _MESSAGE = 0, 1, 2
# Where ``_normalize`` takes each channel's coefficients from.
_COMPUTED, _RUNNING, _SAVED = 0, 1, 2


def require_gpu():
    """Raise numba_bn's ``RuntimeError`` unless a usable GPU is there."""
    if not _SIMULATOR and not _gpu_usable():
        raise RuntimeError(
            "device='cuda' needs an NVIDIA GPU with a working driver, and "
            "numba-cuda: pip install 'numba_bn[cuda12]' (CUDA 12) or "
            "'numba_bn[cuda13]' (CUDA 13)")


@functools.lru_cache(maxsize=1)
def _gpu_usable():
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install: no usable GPU either
        return False


# --------------------------------------------------------------------------
# device functions

@cuda.jit(device=True)
def _divmod32(a, b):
    """``(a // b, a % b)`` for ``0 <= a < 2**32``: one 32-bit division."""
    q = numba.int64(numba.uint32(a) // numba.uint32(b))
    return q, a - q * b


@cuda.jit(device=True)
def _digits(p, rows, cols):
    """``(n, r, s)`` of a channel's ``p``-th position, ``s`` fastest."""
    q, s = _divmod32(p, cols)
    n, r = _divmod32(q, rows)
    return n, r, s


@cuda.jit(device=True)
def _digits32(p, rows, cols):
    """``_digits`` as 32-bit integers."""
    n, r, s = _digits(p, rows, cols)
    return numba.uint32(n), numba.uint32(r), numba.uint32(s)


@cuda.jit(device=True)
def _advance(n, r, s, step_n, step_r, step_s, rows, cols):
    """Position ``(n, r, s)`` moved on by a step given as digits."""
    s += step_s
    if s >= cols:
        s -= cols
        r += 1
    r += step_r
    if r >= rows:
        r -= rows
        n += 1
    return n + step_n, r, s


@cuda.jit(device=True)
def _thread_walk(channels_last):
    """How this thread walks its channel's positions.

    Returns ``(first, inner, outer)``: it takes ``_UNROLL`` positions
    ``first + j * inner`` at a time, then moves on by ``outer``. NCHW
    threads of a block take neighbouring positions of one channel;
    channels-last threads of a row ``threadIdx.y`` take one position, of
    neighbouring channels.
    """
    rows_of_block = cuda.blockDim.y
    if channels_last:
        first = cuda.blockIdx.x * rows_of_block + cuda.threadIdx.y
        inner = cuda.gridDim.x * rows_of_block
        return first, inner, inner * _UNROLL
    threads = cuda.blockDim.x * rows_of_block
    t = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    return ((cuda.blockIdx.x * threads + t) * _UNROLL, 1,
            cuda.gridDim.x * threads * _UNROLL)


@cuda.jit(device=True)
def _slot():
    """This block's slot: a channel (NCHW) or a tile of ``blockDim.x``
    channels (channels-last). The grid's y and z axes count slots, so
    that each block has one (y alone stops at 65535)."""
    return cuda.blockIdx.z * cuda.gridDim.y + cuda.blockIdx.y


@cuda.jit(device=True)
def _slot_channel(channels_last, slot):
    """This thread's channel in a slot (a channel, or a tile of
    ``blockDim.x`` channels-last channels)."""
    if channels_last:
        return slot * cuda.blockDim.x + cuda.threadIdx.x
    return slot


@cuda.jit(device=True)
def _slot_count(channels_last, n_channels):
    if channels_last:
        return _divmod32(n_channels + cuda.blockDim.x - 1, cuda.blockDim.x)[0]
    return n_channels


@cuda.jit(device=True)
def _thread_sums(x4, dy4, y4, g4, masked, c, k, moments, first, inner,
                 outer):
    """This thread's sums of ``_channel.partial_terms`` over its positions.

    ``masked``: ``dy`` goes through the ReLU whose output is ``y4`` first
    (``_channel.masked_gradient``), and is written to ``g4`` as it is read.
    """
    if masked:
        return _masked_sums(x4, dy4, y4, g4, c, k, first, inner, outer)
    rows, cols = x4.shape[2], x4.shape[3]
    count = x4.shape[0] * rows * cols
    n, r, s = _digits(first, rows, cols)
    in_n, in_r, in_s = _digits(inner, rows, cols)
    out_n, out_r, out_s = _digits(outer, rows, cols)
    s1 = 0.0
    s2 = 0.0
    p = first
    while p < count:
        pn, pr, ps = n, r, s
        for j in range(_UNROLL):
            if p + j * inner < count:
                u, uv = _channel.partial_terms(x4[pn, c, pr, ps],
                                               dy4[pn, c, pr, ps], k, moments)
                s1 += u
                s2 += uv
            pn, pr, ps = _advance(pn, pr, ps, in_n, in_r, in_s, rows, cols)
        n, r, s = _advance(n, r, s, out_n, out_r, out_s, rows, cols)
        p += outer
    return s1, s2


@cuda.jit(device=True)
def _masked_sums(x4, dy4, y4, g4, c, k, first, inner, outer):
    """``_thread_sums`` of a backward through the ReLU whose output is
    ``y4``: ``dy`` there (``_channel.masked_gradient``) is summed and
    written to ``g4``.

    The same positions as the unrolled walk, one at a time and counted in
    32 bits: with two more arrays, an unrolled group in 64-bit counters
    spilled (ptxas).
    """
    u32 = numba.uint32
    rows, cols = u32(x4.shape[2]), u32(x4.shape[3])
    count = u32(x4.shape[0] * x4.shape[2] * x4.shape[3])
    n, r, s = _digits32(first, rows, cols)
    in_n, in_r, in_s = _digits32(inner, rows, cols)
    # From a group's last position to the next group's first.
    jump = u32(outer - (_UNROLL - 1) * inner)
    jump_n, jump_r, jump_s = _digits32(jump, rows, cols)
    step = u32(inner)
    s1 = 0.0
    s2 = 0.0
    p = u32(first)
    j = u32(0)
    while p < count:
        d = _channel.masked_gradient(dy4[n, c, r, s], y4[n, c, r, s], True)
        g4[n, c, r, s] = d
        u, uv = _channel.partial_terms(x4[n, c, r, s], d, k, False)
        s1 += u
        s2 += uv
        if j == _UNROLL - 1:
            n, r, s = _advance(n, r, s, jump_n, jump_r, jump_s, rows, cols)
            p = u32(p + jump)
            j = u32(0)
        else:
            n, r, s = _advance(n, r, s, in_n, in_r, in_s, rows, cols)
            p = u32(p + step)
            j = u32(j + 1)
        n, r, s = u32(n), u32(r), u32(s)
    return s1, s2


@cuda.jit(device=True)
def _block_sums(shared, a, b, channels_last):
    """Sum ``a`` and ``b`` over the threads of the block that share a
    channel (a column ``threadIdx.x`` channels-last, else all of them);
    every thread gets its channel's totals. No warp shuffles, so the
    simulator runs it too."""
    lanes = cuda.blockDim.x
    threads = lanes * cuda.blockDim.y
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    t = ty * lanes + tx
    shared[t] = a
    shared[threads + t] = b
    cuda.syncthreads()
    step = cuda.blockDim.y >> 1
    while step > 0:
        if ty < step:
            shared[t] += shared[t + step * lanes]
            shared[threads + t] += shared[threads + t + step * lanes]
        cuda.syncthreads()
        step >>= 1
    if not channels_last:
        step = lanes >> 1
        while step > 0:
            if t < step:
                shared[t] += shared[t + step]
                shared[threads + t] += shared[threads + t + step]
            cuda.syncthreads()
            step >>= 1
        tx = 0
    a = shared[tx]
    b = shared[threads + tx]
    cuda.syncthreads()  # shared is rewritten by the next call
    return a, b


@cuda.jit(device=True)
def _arrived_last(counters, index, arrivals, flag):
    """Whether this block is the last of ``arrivals`` to reach ticket
    ``counters[index]``; that one resets it to 0 for the next launch.

    The fence makes each block's global writes before the call visible to
    the last one.
    """
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0 and cuda.threadIdx.y == 0:
        last = cuda.atomic.add(counters, index, 1) == arrivals - 1
        if last:
            counters[index] = 0
        flag[0] = last
    cuda.syncthreads()
    last = flag[0] != 0
    cuda.syncthreads()  # flag is rewritten by the next call
    return last


@cuda.jit(device=True)
def _finish_channel(finish, c, k, moments, count, partials, weight, bias,
                    eps, running_mean, running_var, num_batches_tracked,
                    momentum, cumulative, save_mean, save_invstd,
                    coefficients, grad_weight, grad_bias, batch_stats,
                    message, rank):
    """Channel ``c``'s formulas, once its totals are in ``partials[:, 0]``.

    ``coefficients`` rows: mean, scale, offset, gain of ``_normalize``
    (the forward's gain, 1, adds the residual).
    """
    n_channels = partials.shape[2]
    totals, totals_prod = partials[0, 0:1], partials[1, 0:1]
    if finish == _FORWARD:
        coefficients[0, c] = k  # the shift the sums are about
        _channel.finish_batch_stats(
            range(c, c + 1), coefficients[0], totals, totals_prod, count,
            weight, bias, eps, running_mean, running_var,
            num_batches_tracked, momentum, cumulative, save_mean,
            save_invstd, coefficients[1], coefficients[2])
        coefficients[0, c] = save_mean[c]
        coefficients[3, c] = 1.0  # the residual's gain, when there is one
    elif finish == _BACKWARD:
        coefficients[0, c] = k
        _channel.finish_backward(
            range(c, c + 1), totals, totals_prod, count, save_invstd,
            weight, batch_stats, grad_weight, grad_bias, coefficients[1],
            coefficients[2], coefficients[3])
        if message.shape[0] > 0:
            # SyncBatchNorm: parameter gradients of this rank's own sums.
            _channel.parameter_gradients(
                c, message[rank, 2 + c], message[rank, 2 + n_channels + c],
                np.float64(save_invstd[c]), grad_weight, grad_bias)
    else:  # _MESSAGE: [ok, count, (shift), sum_a, sum_b]
        first = 2
        if moments:
            message[rank, 2 + c] = k
            first += n_channels
        message[rank, first + c] = partials[0, 0, c]
        message[rank, first + n_channels + c] = partials[1, 0, c]
        if c == 0:
            message[rank, 0] = 1.0
            message[rank, 1] = count


@cuda.jit(device=True)
def _coefficients(c, source, coefficients, mean, spread, weight, bias, eps,
                  save_mean, save_invstd, first):
    """``(mean, scale, offset, gain)`` of channel ``c`` for ``_normalize``.

    ``_COMPUTED``: from ``coefficients``. ``_RUNNING`` (eval forward): from
    the running statistics ``mean`` and ``spread`` (the variance), gain 1
    for a residual; the channel's first thread also saves them for the
    backward. ``_SAVED``
    (backward with constant statistics, the kernel reading ``dy`` as its
    ``x``): ``dx = gain * dy`` with ``spread`` the forward's invstd, so
    that ``x`` is not read (NaN or inf there must not reach ``dx``).
    """
    if source == _COMPUTED:
        return (coefficients[0, c], coefficients[1, c], coefficients[2, c],
                coefficients[3, c])
    if source == _RUNNING:
        m = np.float64(mean[c])
        invstd = _channel.running_invstd(spread, c, eps)
        if first == 0:
            save_mean[c] = m
            save_invstd[c] = invstd
        scale, offset = _channel.affine_coefficients(c, invstd, weight, bias)
        return m, scale, offset, 1.0
    gain, _ = _channel.affine_coefficients(c, np.float64(spread[c]), weight,
                                           bias)
    return 0.0, gain, 0.0, 0.0


@cuda.jit(device=True)
def _affine_walk(x4, dy4, with_dy, out4, relu, c, mean, scale, offset, gain,
                 first, inner, outer):
    """``_channel.affine_element`` over this thread's positions of ``c``.

    Each group's loads come before its stores: the compiler cannot know
    that ``out4`` overlaps no input, so it would not move a load above a
    store itself.
    """
    rows, cols = x4.shape[2], x4.shape[3]
    count = x4.shape[0] * rows * cols
    n, r, s = _digits(first, rows, cols)
    in_n, in_r, in_s = _digits(inner, rows, cols)
    out_n, out_r, out_s = _digits(outer, rows, cols)
    values = cuda.local.array(_UNROLL, numba.float64)
    p = first
    while p < count:
        pn, pr, ps = n, r, s
        for j in range(_UNROLL):
            if p + j * inner < count:
                values[j] = _channel.affine_element(
                    x4[pn, c, pr, ps], dy4[pn, c, pr, ps], mean, scale,
                    offset, gain, with_dy, relu)
            pn, pr, ps = _advance(pn, pr, ps, in_n, in_r, in_s, rows, cols)
        pn, pr, ps = n, r, s
        for j in range(_UNROLL):
            if p + j * inner < count:
                out4[pn, c, pr, ps] = values[j]
            pn, pr, ps = _advance(pn, pr, ps, in_n, in_r, in_s, rows, cols)
        n, r, s = _advance(n, r, s, out_n, out_r, out_s, rows, cols)
        p += outer


# --------------------------------------------------------------------------
# kernels

@cuda.jit(cache=True, **_STREAMING)
def _statistics(x4, dy4, y4, g4, masked, moments, walk, center, count,
                partials, counters, channels_last, finish, weight, bias, eps, running_mean,
                running_var, num_batches_tracked, momentum, cumulative,
                save_mean, save_invstd, coefficients, grad_weight, grad_bias,
                batch_stats, message, rank):
    """Per-channel sums of ``x4`` (and ``dy4``), finished in the same launch.

    With ``walk``, block ``(b, slot)`` sums ``_channel.partial_terms`` over
    its share of each channel's positions about ``k`` (``x4[0, c, 0, 0]``
    with ``moments``, else ``center[c]``) into ``partials[:, b, c]``
    (``masked``: ``dy`` through the ReLU, written to ``g4``); the
    last block of the slot merges the rows into ``partials[:, 0, c]``.
    Without ``walk`` (SyncBatchNorm, one block per slot) the merged totals
    are already there, about ``center``. Then ``_finish_channel(finish)``
    runs per channel, and in a training forward the last slot to finish
    counts the batch.
    """
    shared = cuda.shared.array(0, numba.float64)
    flag = cuda.shared.array(1, numba.int32)
    n_channels = x4.shape[1]
    n_slots = _slot_count(channels_last, n_channels)
    first, inner, outer = _thread_walk(channels_last)
    t = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    # The threads that hold their channel's totals and write them.
    if channels_last:
        owner = cuda.threadIdx.y == 0
        row_first, row_step = cuda.threadIdx.y, cuda.blockDim.y
    else:
        owner = t == 0
        row_first, row_step = t, cuda.blockDim.x * cuda.blockDim.y
    slot = _slot()
    if slot >= n_slots:
        return
    c = _slot_channel(channels_last, slot)
    active = c < n_channels
    k = 0.0
    if active:
        if moments and walk:
            k = np.float64(x4[0, c, 0, 0])
        else:
            k = np.float64(center[c])
    if walk:
        s1 = 0.0
        s2 = 0.0
        if active:
            s1, s2 = _thread_sums(x4, dy4, y4, g4, masked, c, k, moments,
                                  first, inner, outer)
        s1, s2 = _block_sums(shared, s1, s2, channels_last)
        if active and owner:
            partials[0, cuda.blockIdx.x, c] = s1
            partials[1, cuda.blockIdx.x, c] = s2
        if not _arrived_last(counters, slot, cuda.gridDim.x, flag):
            return
        s1 = 0.0
        s2 = 0.0
        if active:
            # A count known before the loop: its trip count then needs no
            # 64-bit division.
            rows_each = _divmod32(cuda.gridDim.x + row_step - 1, row_step)[0]
            for j in range(rows_each):
                p = row_first + j * row_step
                if p < cuda.gridDim.x:
                    s1 += partials[0, p, c]
                    s2 += partials[1, p, c]
        s1, s2 = _block_sums(shared, s1, s2, channels_last)
        if active and owner:
            partials[0, 0, c] = s1
            partials[1, 0, c] = s2
    if active and owner:
        _finish_channel(finish, c, k, moments, count, partials, weight, bias,
                        eps, running_mean, running_var, num_batches_tracked,
                        momentum, cumulative, save_mean, save_invstd,
                        coefficients, grad_weight, grad_bias, batch_stats,
                        message, rank)
    # The batch counts once every channel has read the old count.
    if (num_batches_tracked.shape[0] > 0
            and _arrived_last(counters, n_slots, n_slots, flag) and t == 0):
        num_batches_tracked[0] += 1


@cuda.jit(cache=True, **_STREAMING)
def _normalize(x4, dy4, with_dy, out4, relu, channels_last, source,
               coefficients, mean, spread, weight, bias, eps, save_mean,
               save_invstd):
    """``out = (x - mean) * scale + offset``, plus ``gain * dy`` ``with_dy``,
    then the ReLU with ``relu``, with each channel's coefficients from
    ``source`` (``_coefficients``)."""
    c = _slot_channel(channels_last, _slot())
    if c < x4.shape[1]:
        first, inner, outer = _thread_walk(channels_last)
        m, scale, offset, gain = _coefficients(
            c, source, coefficients, mean, spread, weight, bias, eps,
            save_mean, save_invstd, first)
        _affine_walk(x4, dy4, with_dy, out4, relu, c, m, scale, offset,
                     gain, first, inner, outer)


@cuda.jit(cache=True)
def _merge_ranks(gathered, moments, header, partials, center):
    """Whole-batch totals from every rank's message (``_channel.merge_ranks``)
    into ``partials[:, 0]``, as ``_statistics`` reads them without ``walk``:
    with ``moments`` the sums about the mean (0 and ``m2``) and the mean
    into ``center``."""
    i = cuda.grid(1)
    if i < gathered.shape[0]:
        header[i, 0] = gathered[i, 0]
        header[i, 1] = gathered[i, 1]
    if i < partials.shape[2]:
        _channel.merge_ranks(range(i, i + 1), gathered, moments, partials,
                             center)


# --------------------------------------------------------------------------
# arrays, views and streams

def as_device_array(x):
    """``x`` with NumPy-style ``dtype``/``shape``/``strides``, zero-copy.

    CuPy, Numba and simulator arrays pass through; any other
    ``__cuda_array_interface__`` object becomes a Numba device array view
    that remembers the producer's ``stream`` (kernels then run on it, so
    no host synchronization is needed).
    """
    if isinstance(x, _DeviceArray) or (_CUPY is not None
                                       and isinstance(x, _CUPY.ndarray)):
        return x
    return cuda.from_cuda_array_interface(x.__cuda_array_interface__,
                                          owner=x, sync=False)


# Views of CuPy arrays by address and geometry. A view holds no reference
# to the memory's owner, so a kept one never keeps memory alive; it is only
# used while the array it was made for is alive, and a later array at the
# same address with the same geometry is served by the same view.
_VIEWS = {}
_VIEWS_KEPT = 4096


def _address(a):
    """Device address of ``a``'s first element (None under the simulator)."""
    if _SIMULATOR:
        return None
    if isinstance(a, _DeviceArray):
        return a.device_ctypes_pointer.value or 0
    return a.data.ptr


def _view(a, shape=None, strides=None):
    """``a`` as a Numba device array for a kernel argument, optionally with
    new ``shape``/``strides`` from its first element; 0-d arrays become 1-d.

    Memoized for CuPy arrays and reshaped views (``_VIEWS``): making a Numba
    device array costs several microseconds on the host.
    """
    if shape is None:
        if isinstance(a, _DeviceArray) and a.ndim:
            return a
        shape, strides = a.shape or (1,), a.strides or (a.dtype.itemsize,)
    if _SIMULATOR:
        return _DeviceArray(np.lib.stride_tricks.as_strided(
            a._ary, shape, strides))
    key = (_address(a), shape, strides, a.dtype.char)
    view = _VIEWS.get(key)
    if view is None:
        if isinstance(a, _DeviceArray):
            gpu_data = a.gpu_data
        else:
            extent = max(a.nbytes, a.dtype.itemsize)
            gpu_data = _driver.MemoryPointer(
                cuda.current_context(), _driver.binding.CUdeviceptr(key[0]),
                size=extent)
        view = _DeviceArray(shape, strides, a.dtype, gpu_data=gpu_data)
        if len(_VIEWS) >= _VIEWS_KEPT:
            _VIEWS.clear()
        _VIEWS[key] = view
    return view


@functools.lru_cache(maxsize=None)
def _placeholder(dtype, ndim=1):
    """An empty array of ``dtype``: an absent optional kernel argument."""
    return cuda.device_array((0,) * ndim, np.dtype(dtype))


def _optional(a, dtype, ndim=1):
    """A kernel view of ``a``, or the placeholder of ``dtype`` for None."""
    return _placeholder(dtype, ndim) if a is None else _view(a)


_EXTERNAL_STREAMS = {}


def _stream_for(a):
    """The stream the kernels reading ``a`` run on (see the module docstring)."""
    if _CUPY is not None and isinstance(a, _CUPY.ndarray):
        ptr = _CUPY.cuda.get_current_stream().ptr
        stream = _EXTERNAL_STREAMS.get(ptr)
        if stream is None:
            stream = (cuda.default_stream() if ptr == 0
                      else cuda.external_stream(ptr))
            _EXTERNAL_STREAMS[ptr] = stream
        return stream
    stream = getattr(a, "stream", 0)
    return stream if stream else cuda.default_stream()


def _stream_key(stream):
    return 0 if _SIMULATOR else int(stream)


def _after_producers(stream, arrays):
    """Make ``stream`` wait for the producer streams other arrays name.

    The ``__cuda_array_interface__`` protocol asks the consumer to wait for
    the stream it names; an event keeps the host from waiting.
    """
    for a in arrays:
        producer = getattr(a, "stream", 0)
        if producer and _stream_key(producer) != _stream_key(stream):
            event = cuda.event(timing=False)
            event.record(stream=producer)
            event.wait(stream=stream)


# Ticket counters of ``_statistics``, one array per stream: every launch
# leaves them at 0, so they are zeroed once, not per launch.
_COUNTERS = {}


def _counters(stream, size):
    """At least ``size`` ticket counters for launches on ``stream``."""
    key = _stream_key(stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.shape[0] < size:
        # Zeroed from the host once per stream (and size): CuPy copies on
        # its current stream, which need not be the launches', so that copy
        # is waited for. The dict keeps the memory alive.
        zeros = np.zeros(max(size, 64), np.int32)
        if _CUPY is not None:
            counters = _CUPY.asarray(zeros)
            _CUPY.cuda.get_current_stream().synchronize()
        else:
            counters = cuda.to_device(zeros, stream=stream)
        _COUNTERS[key] = counters
    return _view(counters)


def empty(shape, dtype):
    """An uninitialized array of this device (CuPy's when CuPy is installed)."""
    if _CUPY is not None:
        return _CUPY.empty(shape, dtype)
    return cuda.device_array(shape, dtype)


def empty_like(x, dtype=None):
    """Uninitialized array of ``x``'s shape and memory order (channels-last stays).

    Parameters
    ----------
    x : device array
        Input of shape ``(N, C, *spatial)``.
    dtype : numpy.dtype, optional
        Defaults to ``x.dtype``.
    """
    base_shape, axes = output_allocation(x.shape, x.strides)
    return _transposed(empty(base_shape, dtype or x.dtype), axes)


def _transposed(base, axes):
    """``base.transpose(axes)`` for any device array (Numba's transposes 2-d
    arrays only)."""
    if not isinstance(base, _DeviceArray):  # CuPy's
        return base.transpose(axes)
    if _SIMULATOR:
        return _DeviceArray(base._ary.transpose(axes))
    return _DeviceArray(tuple(base.shape[i] for i in axes),
                        tuple(base.strides[i] for i in axes), base.dtype,
                        gpu_data=base.gpu_data)


def from_host(a):
    """``a`` copied to the GPU in its memory order, as ``empty_like``
    allocates it (channels-last stays channels-last); a CuPy array when
    CuPy is installed."""
    a = np.asarray(a)
    axes = (output_allocation(a.shape, a.strides)[1] if a.ndim > 2
            else tuple(range(a.ndim)))
    # The values in the device memory's order, copied over in one piece.
    stored = np.asarray(a.transpose(tuple(np.argsort(axes))), order="C")
    base = (_CUPY.asarray(stored) if _CUPY is not None
            else cuda.to_device(stored))
    return base if axes == tuple(range(a.ndim)) else _transposed(base, axes)


def to_host(a):
    """``a`` copied to a NumPy array."""
    if _CUPY is not None and isinstance(a, _CUPY.ndarray):
        return _CUPY.asnumpy(a)
    return a.copy_to_host()


def copy_from_host(target, values):
    """Overwrite device array ``target`` in place with host ``values`` of its shape."""
    values = np.ascontiguousarray(values, dtype=target.dtype)
    if _CUPY is not None and isinstance(target, _CUPY.ndarray):
        target.set(values)
    else:
        target.copy_to_device(values)


def may_share_memory(a, b):
    """Whether device arrays ``a`` and ``b`` may overlap: their address
    ranges meet (a bound, as ``numpy.may_share_memory``)."""
    if _SIMULATOR:
        return np.may_share_memory(_view(a)._ary, _view(b)._ary)

    def extent(x):
        low = high = _address(x)
        for size, stride in zip(x.shape, x.strides):
            if size == 0:
                return None
            if stride > 0:
                high += (size - 1) * stride
            else:
                low += (size - 1) * stride
        return low, high + x.dtype.itemsize

    ea, eb = extent(a), extent(b)
    return (ea is not None and eb is not None and ea[0] < eb[1]
            and eb[0] < ea[1])


def message_buffer(a):
    """``a`` as an MPI buffer (SyncBatchNorm), once the kernels writing it are done.

    A CUDA-aware MPI reads and writes device memory through
    ``__cuda_array_interface__`` but knows nothing of streams, so the
    stream is synchronized first. The simulator's device arrays are host
    memory without that interface: their NumPy array stands in.
    """
    _stream_for(a).synchronize()
    if _SIMULATOR:
        return a._ary
    return a


# --------------------------------------------------------------------------
# launching

@functools.lru_cache(maxsize=1024)
def _grid(shape4, channels_last, threads, lanes, budget):
    """The grid of a launch over the ``(N, C, R, S)`` view, and its slots.

    A slot is a channel (NCHW) or a tile of ``lanes`` channels
    (channels-last), counted by the grid's y and z axes (``_slot``); the x
    axis splits each slot's positions over at most ``budget // slots``
    blocks (at least one).
    """
    n_samples, n_channels, rows, cols = shape4
    count = n_samples * rows * cols
    if count > _MAX_POSITIONS:
        raise ValueError(
            f"the GPU kernels take at most {_MAX_POSITIONS} values per "
            f"channel, got {count}")
    if channels_last:
        slots = -(-n_channels // lanes)
        per_block = threads // lanes * _UNROLL
    else:
        slots = n_channels
        per_block = threads * _UNROLL
    grid_y = min(slots, _MAX_GRID_Y)
    blocks = max(1, min(-(-count // per_block), budget // slots))
    return (blocks, grid_y, -(-slots // grid_y)), slots


def _block():
    """Block shape ``(lanes, threads // lanes)``, from ``config`` at launch."""
    threads, lanes = config.threads_per_block, config.channel_lanes
    return (lanes, threads // lanes)


def _launch_statistics(stream, x4, dy4, moments, center, count, finish,
                       param_dtype, weight=None, bias=None, eps=0.0,
                       running_mean=None, running_var=None,
                       num_batches_tracked=None, momentum=0.0,
                       cumulative=False, save_mean=None, save_invstd=None,
                       coefficients=None, grad_weight=None, grad_bias=None,
                       batch_stats=False, message=None, rank=0,
                       partials=None, y4=None, g4=None):
    """One ``_statistics`` launch; ``partials`` given: already merged;
    ``y4`` given: ``dy4`` through the ReLU, written to ``g4``."""
    channels_last = is_channels_last(x4.shape, x4.strides)
    lanes, rows_of_block = _block()
    threads = lanes * rows_of_block
    grid, slots = _grid(x4.shape, channels_last, threads, lanes,
                        config.reduction_blocks)
    walk = partials is None
    if walk:
        partials = _view(empty((2, grid[0], x4.shape[1]), np.float64))
    else:
        grid = (1,) + grid[1:]
    f64 = np.float64
    kernel = _statistics[grid, (lanes, rows_of_block), stream,
                         2 * threads * 8]
    # Absent, y4 and g4 are x4 itself, never read or written: the same
    # argument types as x4's then share a compiled kernel.
    masked = y4 is not None
    kernel(x4, dy4, y4 if masked else x4, g4 if masked else x4, masked,
           moments, walk, _optional(center, f64), count, partials,
           _counters(stream, slots + 1), channels_last, finish,
           _optional(weight, param_dtype), _optional(bias, param_dtype),
           float(eps), _optional(running_mean, param_dtype),
           _optional(running_var, param_dtype),
           _optional(num_batches_tracked, np.int64), float(momentum),
           bool(cumulative), _optional(save_mean, f64),
           _optional(save_invstd, f64), _optional(coefficients, f64),
           _optional(grad_weight, param_dtype),
           _optional(grad_bias, param_dtype), bool(batch_stats),
           _optional(message, f64, ndim=2), int(rank))


def _launch_normalize(stream, x4, dy4, with_dy, out4, source, param_dtype,
                      coefficients=None, mean=None, spread=None, weight=None,
                      bias=None, eps=0.0, save_mean=None, save_invstd=None,
                      relu=False):
    channels_last = is_channels_last(x4.shape, x4.strides)
    lanes, rows_of_block = _block()
    grid, _ = _grid(x4.shape, channels_last, lanes * rows_of_block, lanes,
                    config.element_blocks)
    f64 = np.float64
    # The saved statistics are float64, the running ones the parameters'.
    statistics_dtype = f64 if source == _SAVED else param_dtype
    _normalize[grid, (lanes, rows_of_block), stream](
        x4, dy4, with_dy, out4, bool(relu), channels_last, source,
        _optional(coefficients, f64), _optional(mean, statistics_dtype),
        _optional(spread, statistics_dtype), _optional(weight, param_dtype),
        _optional(bias, param_dtype), float(eps), _optional(save_mean, f64),
        _optional(save_invstd, f64))


def _param_dtype(x, *vectors):
    """dtype of the given per-channel vectors (placeholders take it too, so
    that a call with and one without them share a compiled kernel)."""
    for v in vectors:
        if v is not None:
            return np.dtype(v.dtype)
    return np.dtype(x.dtype)


def _copy(src, dst, stream):
    """``dst[...] = src`` for 5-d arrays whose spatial axes need not merge.

    One depth slice at a time through the identity normalization (each
    ``(N, C, H, W)`` slice has a canonical view), so no extra kernel exists.
    Only inputs whose strides merge into no ``(N, C, R, S)`` view take it.
    """
    n_channels = src.shape[1]
    identity = _view(from_host(np.array([[0.0], [1.0], [0.0], [0.0]])
                               * np.ones(n_channels)))
    for d in range(src.shape[2]):
        src_d, dst_d = src[:, :, d], dst[:, :, d]
        shape4, (src4, dst4) = canonical_geometry(
            src_d.shape, (src_d.strides, dst_d.strides))
        src4 = _view(src_d, shape4, src4)
        _launch_normalize(stream, src4, src4, False,
                          _view(dst_d, shape4, dst4), _COMPUTED,
                          src.dtype, coefficients=identity)


def _views(inputs, outs, stream):
    """The arrays the kernels write, and their views of all arrays.

    Parameters
    ----------
    inputs : list of device arrays
        Inputs of one shape and dtype.
    outs : list of (device array or None)
        The caller's outputs, None for a new one like ``inputs[0]``.
    stream : numba stream

    Returns
    -------
    targets : list of device arrays
        Each of ``outs`` (or a new array like ``inputs[0]``), or a
        contiguous stand-in when the spatial axes do not merge (see
        :func:`_deliver`).
    list of device arrays
        ``(N, C, R, S)`` views of the inputs, then of the targets, with one
        common ``(R, S)`` split; inputs are copied (on the device) only
        where their spatial axes do not merge into two.
    """
    targets = [empty_like(inputs[0]) if out is None else out for out in outs]
    arrays = inputs + targets
    geometry = canonical_geometry(targets[0].shape,
                                  tuple(a.strides for a in arrays))
    if geometry is None:
        contiguous = []
        for a in inputs:
            contiguous.append(empty(a.shape, a.dtype))
            _copy(_view(a), _view(contiguous[-1]), stream)
        targets = [empty(t.shape, t.dtype) for t in targets]
        arrays = contiguous + targets
        geometry = canonical_geometry(targets[0].shape,
                                      tuple(a.strides for a in arrays))
    shape4, strides4 = geometry
    return targets, [_view(a, shape4, st) for a, st in zip(arrays, strides4)]


def _deliver(target, out, stream):
    """``out`` when given (filled from a stand-in ``target``), else ``target``."""
    if out is None or target is out:
        return target
    _copy(_view(target), _view(out), stream)
    return out


def _vectors(n_channels, rows):
    """``rows`` new float64 ``(C,)`` arrays."""
    return [empty(n_channels, np.float64) for _ in range(rows)]


# --------------------------------------------------------------------------
# operations

def _forward_views(x, out, residual, stream):
    """The output and the views ``(x4, residual4 or x4, out4)`` of a forward."""
    _after_producers(stream, [out, residual])
    inputs = [x] if residual is None else [x, residual]
    (y,), views = _views(inputs, [out], stream)
    return y, (views[0], views[-2], views[-1])


def forward_batch_stats(x, weight, bias, eps, running_mean, running_var,
                        num_batches_tracked, momentum, cumulative, out=None,
                        moments=None, residual=None, relu=False):
    """Normalize ``x`` with its batch statistics; update the running ones.

    Same parameters and returns as :func:`numba_bn.cpu.forward_batch_stats`,
    with device arrays. Two launches (statistics, normalization); three
    with ``moments`` (their merge comes first). The residual and the ReLU
    join the normalization's launch.
    """
    stream = _stream_for(x)
    y, (x4, r4, y4) = _forward_views(x, out, residual, stream)
    n_channels = x4.shape[1]
    save_mean, save_invstd = _vectors(n_channels, 2)
    coefficients = empty((4, n_channels), np.float64)
    if moments is None:
        count, shift, partials = x4.shape[0] * x4.shape[2] * x4.shape[3], \
            None, None
    else:
        count, shift, partials = moments
        partials = _view(partials)
    _launch_statistics(
        stream, x4, x4, True, shift, count, _FORWARD,
        _param_dtype(x, weight, bias, running_mean), weight=weight,
        bias=bias, eps=eps, running_mean=running_mean,
        running_var=running_var, num_batches_tracked=num_batches_tracked,
        momentum=momentum, cumulative=cumulative, save_mean=save_mean,
        save_invstd=save_invstd, coefficients=coefficients,
        partials=partials)
    _launch_normalize(stream, x4, r4, residual is not None, y4, _COMPUTED,
                      x.dtype, coefficients=coefficients, relu=relu)
    return _deliver(y, out, stream), save_mean, save_invstd


def forward_running_stats(x, weight, bias, eps, running_mean, running_var,
                          out=None, residual=None, relu=False):
    """Normalize ``x`` with the running statistics (eval mode, frozen).

    Same parameters and returns as :func:`numba_bn.cpu.forward_running_stats`,
    with device arrays. One launch.
    """
    stream = _stream_for(x)
    y, (x4, r4, y4) = _forward_views(x, out, residual, stream)
    save_mean, save_invstd = _vectors(x4.shape[1], 2)
    _launch_normalize(stream, x4, r4, residual is not None, y4, _RUNNING,
                      _param_dtype(x, running_mean), mean=running_mean,
                      spread=running_var, weight=weight, bias=bias, eps=eps,
                      save_mean=save_mean, save_invstd=save_invstd,
                      relu=relu)
    return _deliver(y, out, stream), save_mean, save_invstd


def backward(dy, x, weight, save_mean, save_invstd, batch_stats, grad_dtype,
             out=None, sums=None, x_check=None, y=None):
    """Gradients of a forward that normalized with ``save_mean``/``save_invstd``.

    Same parameters and returns as :func:`numba_bn.cpu.backward`, with
    device arrays. Two launches (gradient sums, ``dx``), or one when the
    statistics were constant and no parameter gradient is asked for and
    there is no ``y``. With ``y`` the first launch writes ``dy`` through
    the ReLU, which the second reads.
    ``x_check`` is not checked here: raising would take a device-to-host
    read, a wait for the GPU, in every backward.
    """
    stream = _stream_for(x)
    _after_producers(stream, [dy, out, y])
    masked = y is not None
    if masked:
        (grad_output, dx), (x4, dy4, y4, g4, dx4) = _views(
            [x, dy, y], [None, out], stream)
    else:
        (dx,), (x4, dy4, dx4) = _views([x, dy], [out], stream)
        grad_output, y4, g4 = dy, None, None
    n_channels = x4.shape[1]
    param_dtype = _param_dtype(x, weight)
    grad_weight = grad_bias = None
    if grad_dtype is not None:
        grad_weight, grad_bias = (empty(n_channels, grad_dtype)
                                  for _ in range(2))
        param_dtype = np.dtype(grad_dtype)
    coefficients = empty((4, n_channels), np.float64)
    count = x4.shape[0] * x4.shape[2] * x4.shape[3]
    if sums is None and not batch_stats:
        # Constant statistics: dx = gain * dy, which reads no x; the
        # parameter gradients, when asked for, do, and so does the ReLU's
        # gradient (a second output kept the element pass in 64 registers
        # only with spills).
        if grad_dtype is not None or masked:
            _launch_statistics(
                stream, x4, dy4, False, save_mean, count, _BACKWARD,
                param_dtype,
                weight=weight, save_invstd=save_invstd,
                coefficients=coefficients, grad_weight=grad_weight,
                grad_bias=grad_bias, y4=y4, g4=g4)
        if masked:
            dy4 = g4
        _launch_normalize(stream, dy4, dy4, False, dx4, _SAVED, param_dtype,
                          spread=save_invstd, weight=weight)
    else:
        partials = message = None
        rank = 0
        if sums is not None:
            count, partials, message, rank = sums
            partials = _view(partials)
        _launch_statistics(
            stream, x4, dy4, False, save_mean, count, _BACKWARD,
            param_dtype, weight=weight, save_invstd=save_invstd,
            coefficients=coefficients, grad_weight=grad_weight,
            grad_bias=grad_bias, batch_stats=batch_stats, message=message,
            rank=rank, partials=partials, y4=y4, g4=g4)
        _launch_normalize(stream, x4, g4 if masked else dy4, True, dx4,
                          _COMPUTED, param_dtype, coefficients=coefficients)
    return (_deliver(dx, out, stream), grad_weight, grad_bias,
            grad_output)


def write_message(gathered, rank, x, dy, center, moments, x_check=None,
                  save_invstd=None, y=None):
    """This rank's SyncBatchNorm message, into row ``rank`` of ``gathered``.

    Same parameters and returns as :func:`numba_bn.cpu.write_message`, with
    device arrays. One launch. ``x_check`` is not checked, as in
    :func:`backward`.
    """
    stream = _stream_for(x)
    _after_producers(stream, [dy, y])
    if y is None:
        # x is its own target here: the views are read, nothing is written.
        _, (x4, dy4, _) = _views([x, dy], [x], stream)
        grad_output, y4, g4 = dy, None, None
    else:
        (grad_output,), (x4, dy4, y4, g4) = _views([x, dy, y], [None],
                                                  stream)
    count = x4.shape[0] * x4.shape[2] * x4.shape[3]
    _launch_statistics(stream, x4, dy4, moments, center, count, _MESSAGE,
                       x.dtype, message=gathered, rank=rank, y4=y4, g4=g4)
    return grad_output


def merge_ranks(gathered, moments):
    """Whole-batch totals from every process's message (SyncBatchNorm).

    Same parameters and returns as :func:`numba_bn.cpu.merge_ranks`, with
    device arrays. One launch.
    """
    n_ranks, length = gathered.shape
    n_channels = (length - 2) // (3 if moments else 2)
    header = empty((n_ranks, 2), np.float64)
    partials = empty((2, 1, n_channels), np.float64)
    center = empty(n_channels, np.float64)
    threads = config.threads_per_block
    _merge_ranks[-(-max(n_ranks, n_channels) // threads), threads,
                 _stream_for(gathered)](
        _view(gathered), moments, _view(header), _view(partials),
        _view(center))
    return header, partials, center
