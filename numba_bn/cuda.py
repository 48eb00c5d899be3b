"""GPU backend: Numba CUDA kernels on device arrays, and their launch code.

Twin of ``cpu.py``: the public functions below have the same names and
signatures there, and the per-channel formulas are the same source
(``_channel.py``). Inputs arrive validated (``functional.py``); the kernels
see the canonical ``(N, C, R, S)`` view of ``_layout.py``, zero-copy.

- ``_channel_partials``: each channel's elements are split over several
  blocks; a block reduces its float64 sums in shared memory (no warp
  shuffles, so the CUDA simulator runs it too) and writes one partial row;
  ``_finish_*`` merges the partial rows per channel.
- ``_affine_pass``: one grid-stride element pass, walking the memory order
  (channel innermost for channels-last inputs) so accesses coalesce.

Buffers come from CuPy's memory pool and kernels run on CuPy's current
stream when CuPy is installed; otherwise Numba allocates on the default
stream. Nothing is read back to the host in forward or backward.
"""
import importlib.util
import math

import numba
import numpy as np
from numba import cuda

from . import _channel, config
from ._layout import (canonical_geometry, is_channels_last,
                      output_allocation, split_position)

DEVICE = "cuda"

_SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
if _SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import (
        FakeCUDAArray as _DeviceArray,
    )
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _DeviceArray

# The grid's y dimension (one row of blocks per channel) has this limit.
_MAX_GRID_Y = 65535


# --------------------------------------------------------------------------
# kernels

@cuda.jit(device=True)
def _block_sum2(shared, a, b):
    """Sum ``a`` and ``b`` over the block; every thread gets the totals."""
    t = cuda.threadIdx.x
    n = cuda.blockDim.x
    shared[t] = a
    shared[n + t] = b
    cuda.syncthreads()
    step = n // 2
    while step > 0:
        if t < step:
            shared[t] += shared[t + step]
            shared[n + t] += shared[n + t + step]
        cuda.syncthreads()
        step //= 2
    total_a = shared[0]
    total_b = shared[n]
    cuda.syncthreads()  # shared is rewritten by the next call
    return total_a, total_b


@cuda.jit(device=True)
def _element_index(j, n_channels, rows, cols, channels_last):
    """``(n, c, r, s)`` of the ``j``-th element in memory order."""
    if channels_last:
        c = j % n_channels
        j //= n_channels
        s = j % cols
        j //= cols
        r = j % rows
        n = j // rows
    else:
        s = j % cols
        j //= cols
        r = j % rows
        j //= rows
        c = j % n_channels
        n = j // n_channels
    return n, c, r, s


@cuda.jit(cache=True)
def _channel_partials(x4, dy4, center, moments, psum, psumprod):
    """Per block ``b``: ``psum[b, c] = sum(u)``, ``psumprod[b, c] = sum(u * (x - k))``.

    ``k = center[c]``; ``u = x - k`` with ``moments``, else ``u = dy``.
    Block ``(b, y)`` covers the ``b``-th stripe of channels
    ``y, y + gridDim.y, ...``.
    """
    shared = cuda.shared.array(0, numba.float64)
    n_samples, n_channels, rows, cols = x4.shape
    count = n_samples * rows * cols
    block = cuda.blockIdx.x
    stride = cuda.gridDim.x * cuda.blockDim.x
    for c in range(cuda.blockIdx.y, n_channels, cuda.gridDim.y):
        k = np.float64(center[c])
        s1 = 0.0
        s2 = 0.0
        for j in range(block * cuda.blockDim.x + cuda.threadIdx.x, count,
                       stride):
            n, r, s = split_position(j, rows, cols)
            u, uv = _channel.partial_terms(x4[n, c, r, s],
                                            dy4[n, c, r, s], k, moments)
            s1 += u
            s2 += uv
        s1, s2 = _block_sum2(shared, s1, s2)
        if cuda.threadIdx.x == 0:
            psum[block, c] = s1
            psumprod[block, c] = s2


@cuda.jit(cache=True)
def _affine_pass(x4, mean, scale, offset, dy4, gain, with_dy, out4,
                 channels_last):
    """``out = (x - mean) * scale + offset``, plus ``gain * dy`` ``with_dy``."""
    n_samples, n_channels, rows, cols = x4.shape
    total = n_samples * n_channels * rows * cols
    for j in range(cuda.grid(1), total, cuda.gridsize(1)):
        n, c, r, s = _element_index(j, n_channels, rows, cols, channels_last)
        out4[n, c, r, s] = _channel.affine_element(
            x4[n, c, r, s], dy4[n, c, r, s], mean[c], scale[c], offset[c],
            gain[c], with_dy)


@cuda.jit(cache=True)
def _finish_batch_stats(shift, psum, psumsq, count, weight, bias, eps,
                        running_mean, running_var, num_batches_tracked,
                        momentum, cumulative, save_mean, save_invstd,
                        scale, offset):
    c = cuda.grid(1)
    if c < psum.shape[1]:
        _channel.finish_batch_stats(
            range(c, c + 1), shift, psum, psumsq, count, weight, bias, eps,
            running_mean, running_var, num_batches_tracked, momentum,
            cumulative, save_mean, save_invstd, scale, offset)


@cuda.jit(cache=True)
def _finish_running_stats(running_mean, running_var, weight, bias, eps,
                          save_mean, save_invstd, scale, offset):
    c = cuda.grid(1)
    if c < running_mean.shape[0]:
        _channel.finish_running_stats(
            range(c, c + 1), running_mean, running_var, weight, bias, eps,
            save_mean, save_invstd, scale, offset)


@cuda.jit(cache=True)
def _finish_backward(psum_dy, psum_dy_xmu, count, save_invstd, weight,
                     batch_stats, grad_weight, grad_bias, scale, offset, gain):
    c = cuda.grid(1)
    if c < psum_dy.shape[1]:
        _channel.finish_backward(
            range(c, c + 1), psum_dy, psum_dy_xmu, count, save_invstd, weight,
            batch_stats, grad_weight, grad_bias, scale, offset, gain)


@cuda.jit(cache=True)
def _merge_partials(psum, psumprod, total, total_prod):
    c = cuda.grid(1)
    if c < psum.shape[1]:
        total[c], total_prod[c] = _channel.merged_sums(psum, psumprod, c)


@cuda.jit(cache=True)
def _merge_ranks(gathered, moments, header, total, total_prod):
    i = cuda.grid(1)
    if i < gathered.shape[0]:
        header[i, 0] = gathered[i, 0]
        header[i, 1] = gathered[i, 1]
    if i < total.shape[0]:
        _channel.merge_ranks(range(i, i + 1), gathered, moments, total,
                             total_prod)


@cuda.jit(cache=True)
def _count_batch(num_batches_tracked):
    # A kernel of its own: _finish_batch_stats reads the old count in every
    # channel, so it cannot also increment it without a race.
    if cuda.grid(1) == 0:
        num_batches_tracked[0] += 1


# --------------------------------------------------------------------------
# array plumbing

def _cupy():
    """The CuPy module when installed (never under the simulator), else None."""
    if _SIMULATOR or importlib.util.find_spec("cupy") is None:
        return None
    import cupy
    return cupy


def _stream():
    """CuPy's current stream when CuPy is in use, else Numba's default stream."""
    cupy = _cupy()
    if cupy is None:
        return cuda.default_stream()
    return cuda.external_stream(cupy.cuda.get_current_stream().ptr)


def as_device_array(x):
    """``x`` with NumPy-style ``dtype``/``shape``/``strides``, zero-copy.

    CuPy, Numba and simulator arrays pass through; any other
    ``__cuda_array_interface__`` object becomes a Numba device array view.
    """
    cupy = _cupy()
    if isinstance(x, _DeviceArray) or (cupy is not None
                                       and isinstance(x, cupy.ndarray)):
        return x
    # sync=False: kernels run on the stream the data was produced on, so
    # Numba need not synchronize the exporter's stream (a host wait).
    return cuda.as_cuda_array(x, sync=False)


def _kernel_view(a):
    """``a`` as a Numba device array for a kernel argument.

    Scalars and None pass through; CuPy arrays become zero-copy views.
    """
    if a is None or isinstance(a, (_DeviceArray, bool, int, float)):
        return a
    # sync=False: the kernels run on the stream the data was produced on, so
    # Numba need not wait for the exporter's stream (a host synchronization).
    return cuda.as_cuda_array(a, sync=False)


def _launch(kernel, blocks, threads, *args, shared_bytes=0):
    """Run ``kernel`` on the current stream with device-array views of ``args``."""
    kernel[blocks, threads, _stream(), shared_bytes](
        *[_kernel_view(a) for a in args])


def _strided_view(a, shape, strides):
    """A view of device array ``a`` from its first element with new geometry."""
    a = _kernel_view(a)
    if _SIMULATOR:
        return _DeviceArray(np.lib.stride_tricks.as_strided(
            a._ary, shape, strides))
    return _DeviceArray(shape, strides, a.dtype, gpu_data=a.gpu_data)


def empty(shape, dtype):
    """An uninitialized array of this device (CuPy's when CuPy is installed)."""
    cupy = _cupy()
    if cupy is not None:
        return cupy.empty(shape, dtype)
    return cuda.device_array(shape, dtype, stream=_stream())


def _rows(block):
    """The rows of a 2-d device array, as separate arrays."""
    return [block[i] for i in range(block.shape[0])]


def _copy(src, dst):
    """``dst[...] = src`` for 5-d arrays whose spatial axes need not merge.

    One depth slice at a time with the identity affine pass (each
    ``(N, C, H, W)`` slice has a canonical view), so no extra kernel exists.
    """
    mean, offset, scale = _rows(from_host(np.array([[0.0], [0.0], [1.0]])
                                          * np.ones(src.shape[1])))
    for d in range(src.shape[2]):
        src_d, dst_d = src[:, :, d], dst[:, :, d]
        shape4, (src4, dst4) = canonical_geometry(
            src_d.shape, (src_d.strides, dst_d.strides))
        src4 = _strided_view(src_d, shape4, src4)
        _launch_affine(src4, mean, scale, offset, src4, scale, False,
                       _strided_view(dst_d, shape4, dst4))


def _views(inputs, out):
    """The array the kernels write, and their views of all arrays.

    Parameters
    ----------
    inputs : list of device arrays
        Inputs of one shape and dtype.
    out : device array or None
        The caller's output, or None for a new one like ``inputs[0]``.

    Returns
    -------
    target : device array
        ``out`` (or a new array like ``inputs[0]``), or a contiguous
        stand-in when the spatial axes do not merge (see :func:`_deliver`).
    list of device arrays
        ``(N, C, R, S)`` views of the inputs and of ``target`` with one
        common ``(R, S)`` split; inputs are copied (on the device) only
        where their spatial axes do not merge into two.
    """
    target = empty_like(inputs[0]) if out is None else out
    arrays = [_kernel_view(a) for a in inputs + [target]]
    geometry = canonical_geometry(target.shape,
                                  tuple(a.strides for a in arrays))
    if geometry is None:
        contiguous = []
        for a in arrays[:-1]:
            contiguous.append(_kernel_view(empty(a.shape, a.dtype)))
            _copy(a, contiguous[-1])
        target = empty(target.shape, target.dtype)
        arrays = contiguous + [_kernel_view(target)]
        geometry = canonical_geometry(target.shape,
                                      tuple(a.strides for a in arrays))
    shape4, strides4 = geometry
    return target, [_strided_view(a, shape4, st)
                    for a, st in zip(arrays, strides4)]


def _deliver(target, out):
    """``out`` when given (filled from a stand-in ``target``), else ``target``."""
    if out is None or target is out:
        return target
    _copy(_kernel_view(target), _kernel_view(out))
    return out


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
    """``base.transpose(axes)`` for any device array: Numba's transpose
    2-d arrays only."""
    if not isinstance(base, _DeviceArray):  # CuPy's
        return base.transpose(axes)
    return _strided_view(base, tuple(base.shape[i] for i in axes),
                         tuple(base.strides[i] for i in axes))


def from_host(a):
    """``a`` copied to the GPU in its memory order, as ``empty_like``
    allocates it (channels-last stays channels-last); a CuPy array when
    CuPy is installed."""
    a = np.asarray(a)
    axes = (output_allocation(a.shape, a.strides)[1] if a.ndim > 2
            else tuple(range(a.ndim)))
    # The values in the device memory's order, copied over in one piece.
    stored = np.asarray(a.transpose(tuple(np.argsort(axes))), order="C")
    cupy = _cupy()
    base = (cupy.asarray(stored) if cupy is not None
            else cuda.to_device(stored, stream=_stream()))
    return base if axes == tuple(range(a.ndim)) else _transposed(base, axes)


def to_host(a):
    """``a`` copied to a NumPy array."""
    cupy = _cupy()
    if cupy is not None and isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    return _kernel_view(a).copy_to_host()


def copy_from_host(target, values):
    """Overwrite device array ``target`` in place with host ``values`` of its shape."""
    values = np.ascontiguousarray(values, dtype=target.dtype)
    cupy = _cupy()
    if cupy is not None and isinstance(target, cupy.ndarray):
        target.set(values)
    else:
        _kernel_view(target).copy_to_device(values, stream=_stream())


def message_buffer(a):
    """``a`` as an MPI buffer (SyncBatchNorm), once the kernels writing it are done.

    A CUDA-aware MPI reads and writes device memory through
    ``__cuda_array_interface__`` but knows nothing of streams, so the
    current stream is synchronized first. The simulator's device arrays are
    host memory without that interface: their NumPy array stands in.
    """
    _stream().synchronize()
    if _SIMULATOR:
        return _kernel_view(a)._ary
    return a


def _launch_affine(x4, mean, scale, offset, dy4, gain, with_dy, out4):
    total = math.prod(x4.shape)
    tpb = config.threads_per_block
    blocks = max(1, min(-(-total // tpb), config.element_blocks))
    _launch(_affine_pass, blocks, tpb, x4, mean, scale, offset, dy4, gain,
            with_dy, out4, is_channels_last(out4.shape, out4.strides))


def _launch_partials(x4, dy4, center, moments):
    """Partial sums of every channel, as two ``(blocks, C)`` float64 arrays."""
    n_samples, n_channels, rows, cols = x4.shape
    tpb = config.threads_per_block
    count = n_samples * rows * cols
    blocks = max(1, min(-(-count // tpb),
                        config.reduction_blocks // n_channels))
    psum, psumprod = _rows(empty((2, blocks, n_channels), np.float64))
    _launch(_channel_partials, (blocks, min(n_channels, _MAX_GRID_Y)), tpb,
            x4, dy4, center, moments, psum, psumprod, shared_bytes=2 * tpb * 8)
    return psum, psumprod


def _launch_per_channel(kernel, n_channels, *args):
    tpb = config.threads_per_block
    _launch(kernel, -(-n_channels // tpb), tpb, *args)


# --------------------------------------------------------------------------
# operations

def forward_batch_stats(x, weight, bias, eps, running_mean, running_var,
                        num_batches_tracked, momentum, cumulative, out=None,
                        moments=None):
    """Normalize ``x`` with its batch statistics; update the running ones.

    Same parameters and returns as :func:`numba_bn.cpu.forward_batch_stats`,
    with device arrays.
    """
    y, (x4, y4) = _views([x], out)
    n_samples, n_channels, rows, cols = x4.shape
    if moments is None:
        # Sums of x - shift with a sample of each channel as its shift.
        shift = x4[0, :, 0, 0]
        psum, psumsq = _launch_partials(x4, x4, shift, True)
        count = n_samples * rows * cols
    else:
        # Sums about the mean itself: the first is 0, the second is m2.
        count, shift, m2 = moments
        psum = from_host(np.zeros((1, n_channels)))
        psumsq = _kernel_view(m2).reshape(1, n_channels)
    save_mean, save_invstd, scale, offset = _rows(
        empty((4, n_channels), np.float64))
    counter = (None if num_batches_tracked is None
               else _strided_view(num_batches_tracked, (1,), (8,)))
    _launch_per_channel(
        _finish_batch_stats, n_channels, shift, psum, psumsq, count, weight,
        bias, eps, running_mean, running_var, counter, momentum, cumulative,
        save_mean, save_invstd, scale, offset)
    if counter is not None:
        _launch(_count_batch, 1, 1, counter)
    _launch_affine(x4, save_mean, scale, offset, x4, scale, False, y4)
    return _deliver(y, out), save_mean, save_invstd


def forward_running_stats(x, weight, bias, eps, running_mean, running_var,
                          out=None):
    """Normalize ``x`` with the running statistics (eval mode, frozen).

    Same parameters and returns as :func:`numba_bn.cpu.forward_running_stats`,
    with device arrays.
    """
    y, (x4, y4) = _views([x], out)
    n_channels = x4.shape[1]
    save_mean, save_invstd, scale, offset = _rows(
        empty((4, n_channels), np.float64))
    _launch_per_channel(_finish_running_stats, n_channels, running_mean,
                        running_var, weight, bias, eps, save_mean,
                        save_invstd, scale, offset)
    _launch_affine(x4, save_mean, scale, offset, x4, scale, False, y4)
    return _deliver(y, out), save_mean, save_invstd


def backward(dy, x, weight, save_mean, save_invstd, batch_stats, grad_dtype,
             out=None, sums=None):
    """Gradients of a forward that normalized with ``save_mean``/``save_invstd``.

    Same parameters and returns as :func:`numba_bn.cpu.backward`, with device
    arrays.
    """
    dx, (x4, dy4, dx4) = _views([x, dy], out)
    n_samples, n_channels, rows, cols = x4.shape
    count = n_samples * rows * cols
    if sums is not None:
        count, sum_dy, sum_dy_xmu = sums
        psum_dy = _kernel_view(sum_dy).reshape(1, n_channels)
        psum_dy_xmu = _kernel_view(sum_dy_xmu).reshape(1, n_channels)
    elif batch_stats or grad_dtype is not None:
        psum_dy, psum_dy_xmu = _launch_partials(x4, dy4, save_mean, False)
    else:
        # Constant statistics and no parameter gradient: dx = gain * dy.
        psum_dy = psum_dy_xmu = empty((0, n_channels), np.float64)
    grad_weight = grad_bias = None
    if grad_dtype is not None:
        grad_weight, grad_bias = _rows(empty((2, n_channels), grad_dtype))
    scale, offset, gain = _rows(empty((3, n_channels), np.float64))
    _launch_per_channel(
        _finish_backward, n_channels, psum_dy, psum_dy_xmu, count,
        save_invstd, weight, batch_stats, grad_weight, grad_bias, scale,
        offset, gain)
    _launch_affine(x4, save_mean, scale, offset, dy4, gain, True, dx4)
    return _deliver(dx, out), grad_weight, grad_bias


def channel_sums(x, dy, center, moments, out=None):
    """Per-channel float64 totals of ``u`` and ``u * (x - center)``.

    Same parameters and returns as :func:`numba_bn.cpu.channel_sums`, with
    device arrays.
    """
    # x is its own target here: the views are read, nothing is written.
    _, (x4, dy4, _) = _views([x, dy], x)
    n_channels = x4.shape[1]
    psum, psumprod = _launch_partials(x4, dy4, center, moments)
    total, total_prod = (_rows(empty((2, n_channels), np.float64))
                         if out is None else out)
    _launch_per_channel(_merge_partials, n_channels, psum, psumprod, total,
                        total_prod)
    return total, total_prod


def merge_ranks(gathered, moments):
    """Whole-batch totals from every process's per-channel sums (SyncBatchNorm).

    Same parameters and returns as :func:`numba_bn.cpu.merge_ranks`, with
    device arrays.
    """
    n_ranks, length = gathered.shape
    n_channels = (length - 2) // (3 if moments else 2)
    header = empty((n_ranks, 2), np.float64)
    total, total_prod = _rows(empty((2, n_channels), np.float64))
    _launch_per_channel(_merge_ranks, max(n_ranks, n_channels), gathered,
                        moments, header, total, total_prod)
    return header, total, total_prod


def parameter_gradients(sum_dy, sum_dy_xmu, save_invstd, grad_dtype):
    """``grad_weight`` and ``grad_bias`` from a batch's gradient sums.

    Same parameters and returns as :func:`numba_bn.cpu.parameter_gradients`,
    with device arrays.
    """
    n_channels = sum_dy.shape[0]
    grad_weight, grad_bias = _rows(empty((2, n_channels), grad_dtype))
    scale, offset, gain = _rows(empty((3, n_channels), np.float64))
    _launch_per_channel(
        _finish_backward, n_channels, _kernel_view(sum_dy).reshape(1, n_channels),
        _kernel_view(sum_dy_xmu).reshape(1, n_channels), 1, save_invstd, None,
        False, grad_weight, grad_bias, scale, offset, gain)
    return grad_weight, grad_bias
