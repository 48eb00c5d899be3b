"""CPU backend: Numba kernels on NumPy arrays, and their launch code.

``cuda.py`` is this module's twin: the public functions below have the same
names and signatures there. Inputs arrive validated (``functional.py``); the
kernels see the canonical ``(N, C, R, S)`` view of ``_layout.py``.

Every pass is one of two parallel kernels:

- ``_channel_partials``: per ``(n, c)`` plane, float64 sums of ``u`` and
  ``u * (x - center)`` (shifted moments forward, gradient sums backward);
- ``_affine_pass``: ``out = (x - mean) * scale + offset [+ gain * dy]``, the
  normalization forward and the input gradient backward;

each with a ``_rows`` twin that walks positions with the channel innermost
(channels-last and ``(N, C)`` inputs). Forward and backward call the same
compiled kernel with a flag, so a cold start compiles each once.

On planes longer than 1 KiB whose channel fits in the cores' caches
(``_per_channel``), a backward, and a training forward of float64 or of
float32 smaller than ``_FROM_MEMORY_BYTES``, instead run one kernel, a
channel per iteration (``_forward_per_channel``,
``_backward_per_channel``): the same plane loops (``_plane_sums``,
``_plane_affine``) with the per-channel formulas between them, so the
second pass reads the cache, not memory.

Arrays of one call in another memory layout than ``x`` (NCHW beside
channels-last, or the reverse) are copied into ``x``'s first, and an
``out`` in the other one is written through a stand-in
(``_in_other_layout``): ``_transposed_copy`` moves them in register-sized
blocks, where a pass reading across layouts would walk one array with a
stride.

Dense outputs of passes too large for the cache are written with
nontemporal stores (``_store_streaming``, ``_STREAM_WORKING_SET``): they
skip reading each cache line before writing it, a third of the traffic of
a normalization.

Per-channel work in between (``_channel.py``) is C-sized and runs serially:
a parallel region costs more than it saves there.

Inputs under 32768 elements run the serial twins of the kernels. Parallel
kernels launch one at a time (Numba's workqueue threading layer
aborts on concurrent launches from several Python threads; the other layers
gain nothing from them, each launch already uses every core). A process
forked after its parent ran an OpenMP-parallel kernel cannot run one itself
(GNU OpenMP is not fork-safe), so such a child runs serial twins of the
kernels. Numba's configuration (threading layer, thread count) is the
user's and is never changed here.

Numba's CPU target has no float16 arrays, so float16 data and parameters are
computed through float32 copies (the accumulation is float64 regardless).
"""
import os
import platform
import threading
import types

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba import types as numba_types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable

from . import _channel, _machine
from ._layout import (canonical_geometry, is_channels_last, line_segment,
                      output_allocation)

DEVICE = "cpu"

# Reassociating float64 sums lets LLVM vectorize the reductions (a scalar
# dependency chain runs ~6x below memory speed); "reassoc"/"contract" keep
# NaN and inf semantics intact, unlike fastmath=True.
_REDUCTION_FLAGS = {"reassoc", "contract"}

# The affine passes may fuse a multiply and an add: one rounding instead of
# two, and fewer instructions where the data sits in the cache.
_AFFINE_FLAGS = {"contract"}

# Elements per chunk of a channel-innermost pass: a chunk's rows stay in the
# L2 cache, and there are enough chunks to balance the threads. The chunking
# depends on the shape alone, so results do not depend on the thread count.
_ROWS_CHUNK_ELEMENTS = 32768
# Positions a channel-innermost reduction sums before updating its
# per-channel accumulators: enough independent lines in flight to keep the
# memory busy (large inputs' gradient sums, read from memory, take one
# position at a time instead: see ``_partials``).
_ROWS_UNROLL = 8
# Dense channel-innermost data with fewer channels is walked in rows of
# several positions, at least this many values long.
_ROWS_MIN_LENGTH = 256
# Streaming stores only where the kernel writes contiguous lines of at
# least this many bytes: a line's partial cache lines take ordinary stores,
# and mixing the two often costs more than streaming saves.
_STREAM_MIN_LINE = 1024
# Bytes the cache line holds, and the alignment a vector nontemporal store
# needs at most (AVX-512: 64).
_CACHE_LINE = 64
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def thresholds(l2, l3):
    """The byte thresholds that follow the caches, from a core's L2 and the
    L3 it shares (``_machine.caches``).

    Returns
    -------
    dict
        ``stream_working_set``: dense outputs of passes whose arrays hold at
        least this many bytes, three quarters of the L3, are written with
        nontemporal stores (``_store_streaming``): such a pass evicts its
        own data, so an ordinary store's read of the line it writes is a
        third stream for nothing, while a smaller pass leaves its output in
        the cache for whatever reads it next (glibc's memcpy streams past a
        similar size).
        ``from_memory``: inputs of at least a quarter of the L3 are taken to
        come from memory, not the cache (``_from_memory``).
        ``per_channel``: a channel whose planes, in all inputs of a pass,
        fit in twice a core's L2 is normalized in one kernel, a channel per
        iteration (``_per_channel``), so its second pass reads the cache.
        ``unrolled_gradient_sums``: channel-innermost gradient sums read
        many lines at once only while ``x`` and ``dy`` together fit in four
        L2s; from further away (other work evicted them, as in a network)
        one line at a time keeps the prefetchers ahead.
    """
    return {"stream_working_set": l3 * 3 // 4, "from_memory": l3 // 4,
            "per_channel": 2 * l2, "unrolled_gradient_sums": 4 * l2}


# On the project's 2-core EPYC VMs (1 MiB L2, 32 MiB L3) these are 24 MiB,
# 8 MiB, 2 MiB and 4 MiB, the values they were measured at.
_THRESHOLDS = thresholds(*_machine.caches()[:2])
_STREAM_WORKING_SET = _THRESHOLDS["stream_working_set"]
_FROM_MEMORY_BYTES = _THRESHOLDS["from_memory"]
_UNROLLED_GRADIENT_SUMS_BYTES = _THRESHOLDS["unrolled_gradient_sums"]
_PER_CHANNEL_BYTES = _THRESHOLDS["per_channel"]


# --------------------------------------------------------------------------
# kernels

@intrinsic
def _store_streaming(typingctx, array, index, value):
    """``array[index] = value`` as a nontemporal store, which writes past
    the caches without reading the line first.

    LLVM vectorizes a loop of nontemporal stores only when told they are
    aligned (x86 has no unaligned vector nontemporal store), so the store
    says: cache-line aligned. Callers make that hold for what the vectorized
    loop stores: it begins on a line (``_stream_span``) and steps by its
    vector width, to which its stores then are aligned, the one thing the
    instruction checks. Scalar remainder stores (``movntss``, or plain
    stores where x86 lacks those) check no alignment.
    ``index``: an integer or a tuple of them, non-negative.
    """
    def codegen(context, builder, signature, args):
        array_type, _, value_type = signature.args
        pointer = _item_pointer(context, builder, signature, args)
        element = context.cast(builder, args[2], value_type, array_type.dtype)
        store = builder.store(element, pointer, align=_CACHE_LINE)
        store.set_metadata("nontemporal", builder.module.add_metadata(
            [ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return numba_types.void(array, index, value), codegen


@intrinsic
def _fence_streaming_stores(typingctx):
    """Make a thread's nontemporal stores visible before its later stores.

    x86 keeps ordinary stores in order but not nontemporal ones: without
    ``sfence`` they may become visible after whatever the thread writes
    next, such as the threading layer's "done" flag, and the caller could
    read stale output. LLVM's own ``fence seq_cst`` is no substitute: on
    x86 it may become a locked instruction, which (as Linux's barriers
    note) does not order nontemporal stores. Elsewhere a full fence.
    Called once per streamed chunk of planes or rows, or per channel: 1-2 %
    of a pass over 25-51 MB.
    """
    def codegen(context, builder, signature, args):
        if _X86:
            sfence = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []),
                "llvm.x86.sse.sfence")
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()
    return numba_types.void(), codegen


@intrinsic
def _address(typingctx, array, index):
    """The address of ``array[index]``, as an integer.

    Not ``array.ctypes.data``: Numba counts an array whose ``ctypes`` a
    parallel loop reads as possibly aliased, and compiles the whole loop
    without ``noalias`` (7 x 7 planes ran 1.3x slower).
    ``index``: an integer or a tuple of them, non-negative.
    """
    def codegen(context, builder, signature, args):
        pointer = _item_pointer(context, builder, signature, args)
        return builder.ptrtoint(pointer, context.get_value_type(
            numba_types.intp))
    return numba_types.intp(array, index), codegen


# Vector bytes: AVX's 256-bit registers, 8 float32 or 4 float64 values.
_BLOCK_BYTES = 32


def _shuffle_mask(indices):
    """An LLVM ``<n x i32>`` constant: ``shufflevector``'s element choice."""
    return ir.Constant(ir.VectorType(ir.IntType(32), len(indices)),
                       [ir.Constant(ir.IntType(32), i) for i in indices])


# The in-lane interleaves of a 4 x 4 float32 transpose in each 128-bit half
# (x86's unpcklps/unpckhps, then shufps) and of a 2 x 2 float64 one
# (unpcklpd/unpckhpd): one instruction each, where masks that cross the
# halves cost several on AVX without AVX2.
_IN_LANE_STAGES = {
    8: ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15],
        [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]),
    4: ([0, 4, 2, 6], [1, 5, 3, 7]),
}


def _transposed_registers(builder, load_half, first, width):
    """The columns of the ``width x width`` block from source row ``first``
    on, one register each.

    Each row is loaded in two halves so that the halves of rows ``i`` and
    ``i + width/2`` share a register; the block then transposes within the
    128-bit halves (``_IN_LANE_STAGES``) and needs no cross-half shuffle.
    """
    half = width // 2
    joined = _shuffle_mask(range(width))
    rows = [builder.shuffle_vector(
        load_half(first + i % half, i // half * half),
        load_half(first + i % half + half, i // half * half), joined)
        for i in range(width)]
    stages = [_shuffle_mask(m) for m in _IN_LANE_STAGES[width]]
    columns = []
    # Register i holds columns i // half * half on: transpose each group
    # of ``half`` registers within the 128-bit halves.
    for group in range(0, width, half):
        r = rows[group:group + half]
        if width == 4:
            columns += [builder.shuffle_vector(r[0], r[1], stages[0]),
                        builder.shuffle_vector(r[0], r[1], stages[1])]
            continue
        low = [builder.shuffle_vector(r[k], r[k + 1], stages[0])
               for k in (0, 2)]
        high = [builder.shuffle_vector(r[k], r[k + 1], stages[1])
                for k in (0, 2)]
        columns += [builder.shuffle_vector(low[0], low[1], stages[2]),
                    builder.shuffle_vector(low[0], low[1], stages[3]),
                    builder.shuffle_vector(high[0], high[1], stages[2]),
                    builder.shuffle_vector(high[0], high[1], stages[3])]
    return columns


def _make_transpose_block(streaming):
    """The intrinsic that copies a ``2B x B`` block, ``B = _BLOCK_BYTES /
    itemsize``, transposed: ``dst[dst_index + j * dst_step + i] =
    src[src_index + i * src_step + j]``, for float32 or float64 arrays;
    indices as in ``_item_pointer``, steps in elements.

    Each destination row gets ``2B`` values, ``_CACHE_LINE`` bytes, stored
    one after the other: with ``streaming`` as nontemporal stores, which
    then must be whole aligned lines, so that the write-combining buffers
    fill one line at a time and write it past the caches.
    """
    @intrinsic
    def transpose_block(typingctx, src, src_index, src_step, dst, dst_index,
                        dst_step):
        if src.dtype != dst.dtype or src.dtype not in (
                numba_types.float32, numba_types.float64):
            return None

        def codegen(context, builder, signature, args):
            item = signature.args[0].dtype.bitwidth // 8
            width = _BLOCK_BYTES // item
            element = context.get_value_type(signature.args[0].dtype)
            vector = ir.VectorType(element, width)
            half_vector = ir.VectorType(element, width // 2)
            src_pointer = _item_pointer(context, builder, signature, args)
            dst_pointer = _item_pointer(
                context, builder, signature.replace(args=signature.args[3:]),
                args[3:])
            src_step, dst_step = args[2], args[5]

            def load_half(row, column):
                offset = builder.add(
                    builder.mul(src_step, ir.Constant(src_step.type, row)),
                    ir.Constant(src_step.type, column))
                pointer = builder.gep(src_pointer, [offset])
                return builder.load(
                    builder.bitcast(pointer, half_vector.as_pointer()),
                    align=item)

            blocks = [_transposed_registers(builder, load_half, first, width)
                      for first in (0, width)]
            for j in range(width):
                row = builder.gep(dst_pointer, [
                    builder.mul(dst_step, ir.Constant(dst_step.type, j))])
                for k, columns in enumerate(blocks):
                    pointer = builder.gep(row, [ir.Constant(dst_step.type,
                                                            k * width)])
                    store = builder.store(
                        columns[j], builder.bitcast(pointer,
                                                    vector.as_pointer()),
                        align=_BLOCK_BYTES if streaming else item)
                    if streaming:
                        store.set_metadata(
                            "nontemporal", builder.module.add_metadata(
                                [ir.Constant(ir.IntType(32), 1)]))
            return context.get_dummy_value()
        return (numba_types.void(src, src_index, src_step, dst, dst_index,
                                 dst_step), codegen)
    return transpose_block


_transpose_block = _make_transpose_block(False)
_transpose_block_streaming = _make_transpose_block(True)


def _item_pointer(context, builder, signature, args):
    """LLVM pointer to ``array[index]``, the first two arguments of an
    intrinsic (no wraparound of negative indices)."""
    array_type, index_type = signature.args[:2]
    array_value, index_value = args[:2]
    indices = (cgutils.unpack_tuple(builder, index_value)
               if isinstance(index_type, numba_types.BaseTuple)
               else [index_value])
    return cgutils.get_item_pointer(
        context, builder, array_type,
        context.make_array(array_type)(context, builder, array_value),
        indices, wraparound=False)


@register_jitable
def _stream_span(line, start, length, stream):
    """``(first, last)``: the elements of ``line`` from index ``start`` on,
    ``length`` of unit stride, that fill whole cache lines, counted from
    ``start``; they are stored nontemporally when ``stream``, else
    ``(length, length)``, none.

    The partial cache lines at either end take ordinary stores: they may
    hold elements of a neighbouring line too, and a cache line written
    partly nontemporally and partly not is flushed and then read back
    (256 x 64 planes of 196 float32 values, 12.25 cache lines each, ran 7x
    slower when they were streamed from their first cache line to the end).
    """
    address = _address(line, start)
    itemsize = line.itemsize
    if not stream or address % itemsize:
        return length, length
    per_line = _CACHE_LINE // itemsize
    first = min(length, (-address) % _CACHE_LINE // itemsize)
    return first, first + (length - first) // per_line * per_line


def _holds_float32(x):
    """Whether the Numba type ``x`` is of a float32 array or value."""
    dtype = x.dtype if isinstance(x, numba_types.Array) else x
    return dtype == numba_types.float32


def _leaves_mean_out(x):
    """Whether element loops over ``x`` (an array or an element) leave the
    mean out; see the overload."""


@overload(_leaves_mean_out)
def _leaves_mean_out_overload(x):
    """True for float32: its element loops leave the mean to float64
    per-channel arithmetic, where the cancellation this causes costs digits
    a float32 result does not have.

    The affine passes compute ``x * scale + (offset - mean * scale)``
    (``_folded``), and the gradient sums ``sum(dy * x)``, from which
    ``_centered`` subtracts ``mean * sum(dy)`` per plane or chunk. float32
    products are exact in float64, and at mean 1e4, std 1 the subtraction
    cancels 4 of float64's 16 digits: 1e-12 relative, far below a float32
    output's rounding. Each saves a subtraction per element and, in the
    channel-innermost loops, the load of the mean: channels-last
    (32, 512, 7, 7) float32 backward ran 1.3x faster looped over three
    inputs, 1.12x in the bench's setting. float64 element
    loops keep the subtraction, which is exact there.
    """
    leaves_out = _holds_float32(x)
    return lambda x: leaves_out


def _folded(x, mean, scale, offset):
    """``(mean, offset)`` of an affine pass over ``x``; see the overload."""


@overload(_folded)
def _folded_overload(x, mean, scale, offset):
    """``(0, offset - mean * scale)`` where ``_leaves_mean_out(x)``, else
    ``(mean, offset)``: per-channel vectors (the folded mean is None,
    read by ``_coefficient``) or one channel's scalars."""
    if not _holds_float32(x):
        return lambda x, mean, scale, offset: (mean, offset)
    if not isinstance(mean, numba_types.Array):
        return lambda x, mean, scale, offset: (0.0, offset - mean * scale)

    def fold(x, mean, scale, offset):
        intercept = np.empty(offset.shape[0])
        for c in range(offset.shape[0]):
            intercept[c] = offset[c] - mean[c] * scale[c]
        return None, intercept
    return fold


@register_jitable
def _terms(x, dy, k, moments):
    """The summands of one element: ``_channel.partial_terms`` and
    ``x - k``, whose sum checks in the backward that ``x`` did not change
    since the forward (``_x_changed``). For the gradient sums of elements
    ``x`` that ``_leaves_mean_out``: ``(dy, dy * x, x)``; add their sums up
    with ``_centered``."""
    if not moments and _leaves_mean_out(x):
        u = np.float64(dy)
        v = np.float64(x)
        return u, u * v, v
    u, uv = _channel.partial_terms(x, dy, k, moments)
    if moments:
        # Adding -0.0 changes no sum, so LLVM drops the forward's third
        # accumulator (the forward reads its statistics from the others).
        return u, uv, -0.0
    return u, uv, np.float64(x) - k


@register_jitable
def _centered(x, s1, s2, s3, k, count, moments):
    """``(s1, s2, s3)``, sums of ``_terms`` of ``count`` elements of the
    array ``x``, as sums of ``_channel.partial_terms`` and of ``x - k``."""
    if not moments and _leaves_mean_out(x):
        return s1, s2 - k * s1, s3 - k * count
    return s1, s2, s3


@register_jitable
def _coefficient(vector, c):
    """``vector[c]``, or 0.0 for a folded mean (None, see ``_folded``)."""
    if vector is None:
        return 0.0
    return vector[c]


@register_jitable
def _segment(vector, first, stop):
    """``vector[first:stop]``; None (a folded mean) stays None."""
    if vector is None:
        return vector
    return vector[first:stop]


@register_jitable
def _tiled(vector, width):
    """A per-channel ``vector`` repeated to fill rows of ``width`` values
    (rows of several positions, see ``_plan_views``); None stays None.

    Tiled inside the kernels: in NumPy the copies cost a small call 1.5 us.
    """
    if vector is None or vector.shape[0] == width:
        return vector
    tiled = np.empty(width)
    for i in range(width):
        tiled[i] = vector[i % vector.shape[0]]
    return tiled


@njit(inline="always")
def _plane_sums(x4, dy4, n, c, k, moments, rows, cols, y4, g4, masked):
    """Float64 sums of ``u``, ``u * (x - k)`` and ``x - k`` over the plane
    ``(n, c)``.

    ``u = x - k`` with ``moments``, else ``u = dy``. Elements are indexed
    with 4-d tuples, not through row slices: a slice costs as much as a
    short row (7x7 planes ran 2x slower), and LLVM vectorizes the innermost
    axis either way. Inlined into each kernel (a call per 7x7 plane ran
    2x slower), so the kernel must carry ``_REDUCTION_FLAGS``. ``rows``,
    ``cols``: ``x4.shape[2:]``, read once by the kernel. With ``masked``
    (a fused ReLU's backward) ``dy`` is ``_channel.masked_gradient`` of the
    ReLU's output ``y4``, and is written to ``g4``.
    """
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for r in range(rows):
        for s in range(cols):
            dy = _channel.masked_gradient(dy4[n, c, r, s], y4[n, c, r, s],
                                          masked)
            if masked:
                g4[n, c, r, s] = dy
            u, uv, v = _terms(x4[n, c, r, s], dy, k, moments)
            s1 += u
            s2 += uv
            s3 += v
    return _centered(x4, s1, s2, s3, k, rows * cols, moments)


@njit(inline="always")
def _plane_element(x4, dy4, index, mean, scale, offset, gain, with_dy,
                   relu):
    """``_channel.affine_element`` at ``index`` of a plane kernel."""
    return _channel.affine_element(x4[index], dy4[index], mean, scale,
                                   offset, gain, with_dy, relu)


@njit(inline="always")
def _plane_affine(x4, n, c, mean, scale, offset, dy4, gain, with_dy, relu,
                  out4, rows, cols, stream):
    """``out = (x - mean) * scale + offset [+ gain * dy]`` (``relu``: its
    ReLU) on the plane
    ``(n, c)`` (``rows``, ``cols`` as in ``_plane_sums``); the whole cache
    lines of each line nontemporally when ``stream`` (a C-contiguous
    ``out4``, see ``_stream_span``)."""
    for r in range(rows):
        stream_from, stream_to = _stream_span(out4, (n, c, r, 0), cols,
                                             stream)
        for s in range(stream_from):
            out4[n, c, r, s] = _plane_element(x4, dy4, (n, c, r, s), mean,
                                              scale, offset, gain, with_dy,
                                              relu)
        # Unsigned: Numba wraps negative indices around, and LLVM, unable
        # to rule them out from ``stream_from`` on, would gather the loads
        # (and store element by element).
        for s in range(np.uint64(stream_from), np.uint64(stream_to)):
            _store_streaming(out4, (n, c, r, s), _plane_element(
                x4, dy4, (n, c, r, s), mean, scale, offset, gain, with_dy,
                relu))
        for s in range(np.uint64(stream_to), np.uint64(cols)):
            out4[n, c, r, s] = _plane_element(x4, dy4, (n, c, r, s), mean,
                                              scale, offset, gain, with_dy,
                                              relu)


@njit(inline="always")
def _channel_totals(x4, dy4, c, k, moments, totals, rows, cols):
    """``totals[:, c]``: channel ``c``'s sums of ``_plane_sums`` (unmasked),
    all planes."""
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for n in range(x4.shape[0]):
        t1, t2, t3 = _plane_sums(x4, dy4, n, c, k, moments, rows, cols, dy4,
                                 x4, False)
        s1 += t1
        s2 += t2
        s3 += t3
    totals[0, c] = s1
    totals[1, c] = s2
    totals[2, c] = s3


# A plane kernel walks chunks of consecutive planes of about this many
# values in all, with a loop over samples and one over channels in each,
# not one ``prange`` iteration per plane: splitting a plane index into ``n``
# and ``c`` takes a division per plane, which short planes feel. Fixed: the
# chunks fix the order of summation.
_PLANE_CHUNK_ELEMENTS = 4096


@register_jitable
def _plane_chunks(x4):
    """``(chunks, per_chunk)``: ``x4``'s ``(n, c)`` planes, counted
    ``n * C + c``, in chunks of ``per_chunk`` consecutive planes."""
    n_samples, n_channels, rows, cols = x4.shape
    planes = n_samples * n_channels
    per_chunk = max(1, min(planes,
                           _PLANE_CHUNK_ELEMENTS // max(1, rows * cols)))
    return -(-planes // per_chunk), per_chunk


@register_jitable
def _chunk_channels(n, p, per_chunk, n_channels):
    """``(first, stop)``: the channels of sample ``n`` in plane chunk ``p``."""
    start = n * n_channels
    return (max(0, p * per_chunk - start),
            min(n_channels, (p + 1) * per_chunk - start))


@register_jitable
def _chunk_samples(p, per_chunk, n_samples, n_channels):
    """The samples with planes in plane chunk ``p``, as a ``(first, stop)``."""
    return (min(n_samples, p * per_chunk // n_channels),
            min(n_samples, -(-(p + 1) * per_chunk // n_channels)))


@njit(parallel=True, cache=True, fastmath=_REDUCTION_FLAGS)
def _channel_partials(x4, dy4, center, moments, psum, psumprod, psum_x, y4,
                      g4, masked):
    """``psum[n, c] = sum(u)``, ``psumprod[n, c] = sum(u * (x - center[c]))``
    and ``psum_x[n, c] = sum(x - center[c])`` for every plane (see
    ``_plane_sums``, also for ``y4``, ``g4``, ``masked``)."""
    n_samples, n_channels, rows, cols = x4.shape
    chunks, per_chunk = _plane_chunks(x4)
    for p in prange(chunks):
        first_n, stop_n = _chunk_samples(p, per_chunk, n_samples, n_channels)
        for n in range(first_n, stop_n):
            first_c, stop_c = _chunk_channels(n, p, per_chunk, n_channels)
            for c in range(first_c, stop_c):
                psum[n, c], psumprod[n, c], psum_x[n, c] = _plane_sums(
                    x4, dy4, n, c, np.float64(center[c]), moments, rows,
                    cols, y4, g4, masked)


@njit(inline="always")
def _plane_chunk_affine(x4, mean, scale, offset, dy4, gain, with_dy, relu,
                        out4, p, per_chunk, stream):
    """``_affine_pass`` on plane chunk ``p`` (see ``_plane_chunks``)."""
    n_samples, n_channels, rows, cols = x4.shape
    first_n, stop_n = _chunk_samples(p, per_chunk, n_samples, n_channels)
    for n in range(first_n, stop_n):
        first_c, stop_c = _chunk_channels(n, p, per_chunk, n_channels)
        for c in range(first_c, stop_c):
            _plane_affine(x4, n, c, _coefficient(mean, c), scale[c],
                          offset[c], dy4, gain[c], with_dy, relu, out4, rows,
                          cols, stream)


@njit(parallel=True, cache=True, fastmath=_AFFINE_FLAGS)
def _affine_pass(x4, mean, scale, offset, dy4, gain, with_dy, relu, out4,
                 stream):
    """``out = (x - mean) * scale + offset``, plus ``gain * dy`` ``with_dy``,
    its ReLU with ``relu``; nontemporal stores when ``stream``.

    The coefficients go to each plane as scalars (see
    ``_channel.affine_element``).
    """
    chunks, per_chunk = _plane_chunks(x4)
    mean, offset = _folded(x4, mean, scale, offset)
    # One loop per kind of store, the flag a constant in each: testing it
    # inside the loop, LLVM kept the streaming loops, and 7 x 7 planes ran
    # 1.4x slower without streaming.
    if stream:
        for p in prange(chunks):
            _plane_chunk_affine(x4, mean, scale, offset, dy4, gain, with_dy,
                                relu, out4, p, per_chunk, True)
            _fence_streaming_stores()
    else:
        for p in prange(chunks):
            _plane_chunk_affine(x4, mean, scale, offset, dy4, gain, with_dy,
                                relu, out4, p, per_chunk, False)


@njit(parallel=True, cache=True, fastmath=_REDUCTION_FLAGS)
def _forward_per_channel(x4, weight, bias, eps, running_mean, running_var,
                         num_batches_tracked, momentum, cumulative, save_mean,
                         save_invstd, scale, offset, out4, stream, residual4,
                         with_residual, relu, normalize):
    """Training forward, one channel per iteration: its shifted sums, its
    statistics (``_channel.finish_batch_stats``), then its normalization
    while its planes are still in the core's cache, so ``x`` comes from
    the cache or memory once.

    Nontemporal stores when ``stream`` (float64 outputs; float32 ones that
    large take the two passes, see ``forward_batch_stats``). With
    ``with_residual`` it adds ``residual4``, with ``relu`` it applies the
    ReLU (``_channel.affine_element``). Compiled with
    ``_REDUCTION_FLAGS`` for the sums, which include the affine passes'
    ``_AFFINE_FLAGS``. Without ``normalize``, only the statistics and
    coefficients: for an ``out`` in the other layout, which ``_affine``
    then writes (``_affine_pass_transposed``), from the statistics of this
    very code, so that the values are the matched call's to the bit.
    """
    n_samples, n_channels, rows, cols = x4.shape
    shift = np.empty(n_channels)
    totals = np.empty((3, n_channels))
    for c in prange(n_channels):
        shift[c] = x4[0, c, 0, 0]
        _channel_totals(x4, x4, c, shift[c], True, totals, rows, cols)
        _channel.finish_batch_stats(
            range(c, c + 1), shift, totals[0:1], totals[1:2],
            n_samples * rows * cols, weight, bias, eps, running_mean,
            running_var, num_batches_tracked, momentum, cumulative,
            save_mean, save_invstd, scale, offset)
        if normalize:
            mean, intercept = _folded(x4, save_mean[c], scale[c], offset[c])
            for n in range(n_samples):
                _plane_affine(x4, n, c, mean, scale[c], intercept, residual4,
                              1.0, with_residual, relu, out4, rows, cols,
                              stream)
            if stream:
                _fence_streaming_stores()


@njit(parallel=True, cache=True, fastmath=_REDUCTION_FLAGS)
def _backward_per_channel(x4, dy4, save_mean, save_invstd, weight,
                          batch_stats, grad_weight, grad_bias, scale, offset,
                          gain, dx4, stream, sum_x):
    """Backward, one channel per iteration: its gradient sums, its
    coefficients (``_channel.finish_backward``), then its ``dx`` while
    ``x`` and ``dy`` are still in the core's cache (see
    ``_forward_per_channel``). ``sum_x``: a ``(1, C)`` array for the sums
    of ``x - save_mean``."""
    n_samples, n_channels, rows, cols = x4.shape
    totals = np.empty((3, n_channels))
    for c in prange(n_channels):
        mean = np.float64(save_mean[c])
        _channel_totals(x4, dy4, c, mean, False, totals, rows, cols)
        sum_x[0, c] = totals[2, c]
        _channel.finish_backward(
            range(c, c + 1), totals[0:1], totals[1:2],
            n_samples * rows * cols, save_invstd, weight, batch_stats,
            grad_weight, grad_bias, scale, offset, gain)
        folded_mean, intercept = _folded(x4, mean, scale[c], offset[c])
        for n in range(n_samples):
            _plane_affine(x4, n, c, folded_mean, scale[c], intercept, dy4,
                          gain[c], True, False, dx4, rows, cols, stream)
        if stream:
            _fence_streaming_stores()


@njit(parallel=True, cache=True, fastmath=_REDUCTION_FLAGS)
def _channel_partials_rows(xp, dyp, center, moments, unrolled, psum,
                           psumprod, psum_x, yp, gp, masked):
    """Channel-innermost twin of ``_channel_partials``.

    Takes position-major views ``(N, R, S, C)``; partial row ``p`` sums the
    ``p``-th chunk of positions, every channel at once, so the inner loop
    runs along the contiguous channel axis. With ``unrolled``, positions
    are summed ``_ROWS_UNROLL`` at a time in registers before they meet the
    per-channel accumulators, whose loads and stores otherwise bound the
    loop; else one at a time (see ``_partials``). ``yp``, ``gp``,
    ``masked``: as in ``_plane_sums``.
    """
    n_samples, rows, cols, n_channels = xp.shape
    positions = n_samples * rows * cols
    chunks = psum.shape[0]
    per_chunk = -(-positions // chunks)
    center = _tiled(center, n_channels)
    for p in prange(chunks):
        k = np.empty(n_channels)
        for c in range(n_channels):
            k[c] = center[c]
        s1 = np.zeros(n_channels)
        s2 = np.zeros(n_channels)
        s3 = np.zeros(n_channels)
        stop = min(positions, (p + 1) * per_chunk)
        j = p * per_chunk
        while j < stop:
            n, r, first, last = line_segment(j, stop, rows, cols)
            x_line = xp[n, r]
            dy_line = dyp[n, r]
            y_line = yp[n, r]
            g_line = gp[n, r]
            full = first
            if unrolled:
                full += (last - first) // _ROWS_UNROLL * _ROWS_UNROLL
            for s in range(first, full, _ROWS_UNROLL):
                # A constant trip count: LLVM unrolls the position loop and
                # vectorizes over the channels.
                for c in range(n_channels):
                    t1 = 0.0
                    t2 = 0.0
                    t3 = 0.0
                    for q in range(_ROWS_UNROLL):
                        dy = _channel.masked_gradient(
                            dy_line[s + q, c], y_line[s + q, c], masked)
                        if masked:
                            g_line[s + q, c] = dy
                        u, uv, v = _terms(x_line[s + q, c], dy, k[c],
                                          moments)
                        t1 += u
                        t2 += uv
                        t3 += v
                    s1[c] += t1
                    s2[c] += t2
                    s3[c] += t3
            for s in range(full, last):
                for c in range(n_channels):
                    dy = _channel.masked_gradient(dy_line[s, c],
                                                  y_line[s, c], masked)
                    if masked:
                        g_line[s, c] = dy
                    u, uv, v = _terms(x_line[s, c], dy, k[c], moments)
                    s1[c] += u
                    s2[c] += uv
                    s3[c] += v
            j += last - first
        count = max(0, stop - p * per_chunk)
        for c in range(n_channels):
            psum[p, c], psumprod[p, c], psum_x[p, c] = _centered(
                xp, s1[c], s2[c], s3[c], k[c], count, moments)


@register_jitable
def _row_element(x_row, dy_row, c, mean, scale, offset, gain, with_dy, relu):
    """``_channel.affine_element`` at channel ``c`` of a position's row.

    Left to LLVM to inline: inlined by Numba (``inline="always"``), its
    array arguments kept LLVM from vectorizing the serial twin of
    ``_affine_pass_rows``, which ran 4x slower (``tests/test_codegen.py``).
    """
    return _channel.affine_element(x_row[c], dy_row[c],
                                   _coefficient(mean, c), scale[c],
                                   offset[c], gain[c], with_dy, relu)


@njit(inline="always")
def _chunk_affine(xp, mean, scale, offset, dyp, gain, with_dy, relu, outp,
                  p, per_chunk, stream):
    """``_affine_pass_rows`` on chunk ``p`` of positions."""
    n_samples, rows, cols, n_channels = xp.shape
    stop = min(n_samples * rows * cols, (p + 1) * per_chunk)
    j = p * per_chunk
    while j < stop:
        n, r, first, last = line_segment(j, stop, rows, cols)
        x_line = xp[n, r]
        dy_line = dyp[n, r]
        out_line = outp[n, r]
        for s in range(first, last):
            x_row = x_line[s]
            dy_row = dy_line[s]
            out_row = out_line[s]
            stream_from, stream_to = _stream_span(out_row, 0, n_channels,
                                                 stream)
            for c in range(stream_from):
                out_row[c] = _row_element(x_row, dy_row, c, mean, scale,
                                          offset, gain, with_dy, relu)
            # Unsigned, as in ``_plane_affine``.
            for c in range(np.uint64(stream_from), np.uint64(stream_to)):
                _store_streaming(out_row, c, _row_element(
                    x_row, dy_row, c, mean, scale, offset, gain, with_dy,
                    relu))
            for c in range(np.uint64(stream_to), np.uint64(n_channels)):
                out_row[c] = _row_element(x_row, dy_row, c, mean, scale,
                                          offset, gain, with_dy, relu)
        j += last - first


@njit(parallel=True, cache=True, fastmath=_AFFINE_FLAGS)
def _affine_pass_rows(xp, mean, scale, offset, dyp, gain, with_dy, relu,
                      outp, chunks, stream):
    """Channel-innermost twin of ``_affine_pass`` on position-major views,
    ``chunks`` chunks of positions (``stream``: see ``_plane_affine``)."""
    n_samples, rows, cols, n_channels = xp.shape
    per_chunk = -(-n_samples * rows * cols // chunks)
    mean, offset = _folded(xp, mean, scale, offset)
    mean, scale = _tiled(mean, n_channels), _tiled(scale, n_channels)
    offset, gain = _tiled(offset, n_channels), _tiled(gain, n_channels)
    # One loop per kind of store, as in ``_affine_pass``.
    if stream:
        for p in prange(chunks):
            _chunk_affine(xp, mean, scale, offset, dyp, gain, with_dy, relu,
                          outp, p, per_chunk, True)
            _fence_streaming_stores()
    else:
        for p in prange(chunks):
            _chunk_affine(xp, mean, scale, offset, dyp, gain, with_dy, relu,
                          outp, p, per_chunk, False)


# Tiles of a transposed copy, elements a side: a float32 tile of the source
# and of the destination, 16 KiB each, stay in a core's L1 cache while its
# blocks go through the registers, and each of its lines is 256 bytes of
# consecutive memory, long enough for the hardware prefetchers.
_TRANSPOSE_TILE = 64


@register_jitable
def _tile_plan(src3, lead):
    """How ``_transposed_copy`` and ``_affine_pass_transposed`` cut
    C-contiguous ``(N, A, B)`` ``src3`` into ``_TRANSPOSE_TILE`` tiles:
    ``(block_first, block_stop, block_cols, row_tiles, col_tiles)``. Rows
    ``block_first`` (``lead``) to ``block_stop`` and columns up to
    ``block_cols`` go through ``_transpose_block`` blocks, the ragged
    edges element by element."""
    n_samples, rows, cols = src3.shape
    depth = 2 * _BLOCK_BYTES // src3.itemsize
    block_first = min(lead, rows)
    block_stop = block_first + (rows - block_first) // depth * depth
    block_cols = cols - cols % (depth // 2)
    row_tiles = max(1, -(-(block_stop - block_first) // _TRANSPOSE_TILE))
    col_tiles = -(-cols // _TRANSPOSE_TILE)
    return block_first, block_stop, block_cols, row_tiles, col_tiles


@register_jitable
def _tile_extent(t, rows, cols, plan):
    """Tile ``t`` of ``_tile_plan``'s ``plan``: ``(n, low, high, first_row,
    stop_row, first_col, stop_col)``, rows ``low`` to ``high`` and columns
    ``first_col`` to ``stop_col`` of sample ``n``, of which rows
    ``first_row`` to ``stop_row`` are in blocks (the first and last row
    tiles also take the rows before the first block and after the last)."""
    block_first, block_stop, block_cols, row_tiles, col_tiles = plan
    tiles = row_tiles * col_tiles
    n = t // tiles
    row_tile = (t - n * tiles) // col_tiles
    first_col = (t - n * tiles - row_tile * col_tiles) * _TRANSPOSE_TILE
    first_row = block_first + row_tile * _TRANSPOSE_TILE
    stop_row = min(block_stop, first_row + _TRANSPOSE_TILE)
    low = 0 if row_tile == 0 else first_row
    high = rows if row_tile == row_tiles - 1 else stop_row
    return (n, low, high, first_row, stop_row, first_col,
            min(cols, first_col + _TRANSPOSE_TILE))


@njit(inline="always")
def _transposed_tile(src, src_n, row_shift, col_shift, dst3, extent,
                     block_cols, stream):
    """``dst3[n, j, i] = src[src_n, i - row_shift, j - col_shift]`` over
    the tile ``extent`` (``_tile_extent``): its blocks, then the rest
    element by element."""
    n, low, high, first_row, stop_row, first_col, stop_col = extent
    width = _BLOCK_BYTES // src.itemsize
    src_step, dst_step = src.shape[2], dst3.shape[2]
    for j in range(first_col, min(stop_col, block_cols), width):
        for i in range(first_row, stop_row, 2 * width):
            if stream:
                _transpose_block_streaming(
                    src, (src_n, i - row_shift, j - col_shift), src_step,
                    dst3, (n, j, i), dst_step)
            else:
                _transpose_block(src, (src_n, i - row_shift, j - col_shift),
                                 src_step, dst3, (n, j, i), dst_step)
    for i in range(low, high):
        edge = (max(first_col, block_cols) if first_row <= i < stop_row
                else first_col)
        for j in range(edge, stop_col):
            dst3[n, j, i] = src[src_n, i - row_shift, j - col_shift]


@njit(parallel=True, cache=True)
def _transposed_copy(src3, dst3, lead, stream):
    """``dst3[n, j, i] = src3[n, i, j]`` for C-contiguous ``(N, A, B)``
    ``src3`` and ``(N, B, A)`` ``dst3``: NCHW data to channels-last and
    back (see ``_relayout_copy``).

    In the tiles of ``_tile_plan``, from source row ``lead`` on. With
    ``stream`` the blocks' destination lines are whole cache lines
    (``lead`` aligns them), stored nontemporally.
    """
    n_samples, rows, cols = src3.shape
    plan = _tile_plan(src3, lead)
    tiles = n_samples * plan[3] * plan[4]
    # One loop per kind of store, as in ``_affine_pass``.
    if stream:
        for t in prange(tiles):
            extent = _tile_extent(t, rows, cols, plan)
            _transposed_tile(src3, extent[0], 0, 0, dst3, extent, plan[2],
                             True)
            _fence_streaming_stores()
    else:
        for t in prange(tiles):
            extent = _tile_extent(t, rows, cols, plan)
            _transposed_tile(src3, extent[0], 0, 0, dst3, extent, plan[2],
                             False)


@njit(inline="always")
def _affine_tile(x3, mean, scale, offset, dy3, gain, with_dy, relu,
                 channel_rows, out3, t, plan, stream):
    """Tile ``t`` of ``_affine_pass_transposed``: its values into a tile
    in ``x3``'s layout, which stays in the core's L1 cache, then
    transposed into ``out3``."""
    n_samples, rows, cols = x3.shape
    extent = _tile_extent(t, rows, cols, plan)
    n, low, high, _, _, first_col, stop_col = extent
    depth = 2 * _BLOCK_BYTES // x3.itemsize
    tile = np.empty((1, _TRANSPOSE_TILE + 2 * depth, _TRANSPOSE_TILE),
                    out3.dtype)
    # Loops over row slices from 0, as in ``_chunk_affine``: LLVM then
    # knows the indices are not negative (which Numba would wrap around)
    # and vectorizes them.
    width = stop_col - first_col
    if not channel_rows:
        mean = _segment(mean, first_col, stop_col)
        scale, offset = scale[first_col:stop_col], offset[first_col:stop_col]
        gain = gain[first_col:stop_col]
    for i in range(low, high):
        x_row = x3[n, i, first_col:stop_col]
        dy_row = dy3[n, i, first_col:stop_col]
        tile_row = tile[0, i - low]
        if channel_rows:
            m, a, b, g = _coefficient(mean, i), scale[i], offset[i], gain[i]
            for k in range(width):
                tile_row[k] = _channel.affine_element(
                    x_row[k], dy_row[k], m, a, b, g, with_dy, relu)
        else:
            for k in range(width):
                tile_row[k] = _row_element(x_row, dy_row, k, mean, scale,
                                           offset, gain, with_dy, relu)
    _transposed_tile(tile, 0, low, first_col, out3, extent, plan[2], stream)


@njit(parallel=True, cache=True, fastmath=_AFFINE_FLAGS)
def _affine_pass_transposed(x3, mean, scale, offset, dy3, gain, with_dy,
                            relu, channel_rows, out3, lead, stream):
    """``_affine_pass`` from C-contiguous ``(N, A, B)`` ``x3`` and ``dy3``
    into ``(N, B, A)`` ``out3``, the other memory layout: channels are
    ``x3``'s rows (NCHW data) with ``channel_rows``, else its columns.

    Each value is ``_channel.affine_element`` of the same coefficients as
    in ``_affine_pass`` and ``_affine_pass_rows``, so the results are
    theirs to the bit, stored as ``_transposed_copy`` stores (``lead``,
    ``stream``) without the copy's second pass.
    """
    n_samples, rows, cols = x3.shape
    plan = _tile_plan(x3, lead)
    mean, offset = _folded(x3, mean, scale, offset)
    # One loop per kind of store, as in ``_affine_pass``.
    if stream:
        for t in prange(n_samples * plan[3] * plan[4]):
            _affine_tile(x3, mean, scale, offset, dy3, gain, with_dy, relu,
                         channel_rows, out3, t, plan, True)
            _fence_streaming_stores()
    else:
        for t in prange(n_samples * plan[3] * plan[4]):
            _affine_tile(x3, mean, scale, offset, dy3, gain, with_dy, relu,
                         channel_rows, out3, t, plan, False)


@register_jitable
def _row_totals(psum, psumprod):
    """``(1, C)`` sums of the rows of two ``(P, C)`` partial-sum arrays.

    Row by row, so the loads run along memory: ``_channel.merged_sums``
    walks a column (a GPU thread's channel), which on the CPU misses the
    cache on every row once ``C`` is large (25 x 512 partials took 40 us).
    Rows are added in the same order, so the totals are the same.
    """
    total = np.zeros((1, psum.shape[1]))
    total_prod = np.zeros((1, psum.shape[1]))
    for p in range(psum.shape[0]):
        for c in range(psum.shape[1]):
            total[0, c] += psum[p, c]
            total_prod[0, c] += psumprod[p, c]
    return total, total_prod


@njit(cache=True)
def _finish_batch_stats(shift, psum, psumsq, count, weight, bias, eps,
                        running_mean, running_var, num_batches_tracked,
                        momentum, cumulative, save_mean, save_invstd,
                        scale, offset):
    total, total_sq = _row_totals(psum, psumsq)
    _channel.finish_batch_stats(
        range(psum.shape[1]), shift, total, total_sq, count, weight, bias,
        eps, running_mean, running_var, num_batches_tracked, momentum,
        cumulative, save_mean, save_invstd, scale, offset)


@njit(cache=True)
def _finish_running_stats(running_mean, running_var, weight, bias, eps,
                          save_mean, save_invstd, scale, offset):
    _channel.finish_running_stats(
        range(running_mean.shape[0]), running_mean, running_var, weight, bias,
        eps, save_mean, save_invstd, scale, offset)


@njit(cache=True)
def _finish_backward(psum_dy, psum_dy_xmu, count, save_invstd, weight,
                     batch_stats, grad_weight, grad_bias, scale, offset, gain):
    sum_dy, sum_dy_xmu = _row_totals(psum_dy, psum_dy_xmu)
    _channel.finish_backward(
        range(psum_dy.shape[1]), sum_dy, sum_dy_xmu, count, save_invstd,
        weight, batch_stats, grad_weight, grad_bias, scale, offset, gain)


@njit(cache=True)
def _merge_partials(psum, psumprod, total, total_prod):
    row_total, row_total_prod = _row_totals(psum, psumprod)
    total[:] = row_total[0]
    total_prod[:] = row_total_prod[0]


@njit(cache=True)
def _merge_ranks(gathered, moments, header, partials, center):
    header[:, :] = gathered[:, :2]
    _channel.merge_ranks(range(center.shape[0]), gathered, moments, partials,
                         center)


# Float64 sums of one channel's values in two orders (the forward's, about
# a sample of the channel, and the backward's, about the mean) differ by
# rounding: at most about (values added in a row) x eps x (the values' size)
# per value. 2**16 eps per value covers that with a wide margin and stays
# far below an ordinary change of a single value (``_x_changed``).
_UNCHANGED_SLACK = 2.0 ** 16 * np.finfo(np.float64).eps


@njit(cache=True)
def _x_changed(psum_x, expected, count, save_mean, save_invstd, first):
    """Whether ``x`` changed since the forward: whether its sums of
    ``x - save_mean``, the rows of ``psum_x``, differ from the forward's
    ``expected`` by more than rounding (``_UNCHANGED_SLACK``).

    The values' size is ``|mean| + std + |first - mean|``, ``first`` the
    sample of each channel the forward summed about. NaN sums compare
    unequal to nothing: a NaN in ``x`` is the forward's result, not a
    change.
    """
    total, _ = _row_totals(psum_x, psum_x)
    for c in range(expected.shape[0]):
        mean = np.float64(save_mean[c])
        invstd = np.float64(save_invstd[c])
        size = abs(mean) + abs(np.float64(first[c]) - mean)
        size += 1.0 / invstd if invstd > 0.0 else np.inf
        if abs(total[0, c] - expected[c]) > _UNCHANGED_SLACK * count * size:
            return True
    return False


def _first_sample(x4, n_channels, rows_layout):
    """The first value of each channel in the views of ``_views``: the
    forward's shift (``forward_batch_stats``)."""
    return x4[0, 0, 0, :n_channels] if rows_layout else x4[0, :, 0, 0]


def _check_unchanged(x_check, psum_x, x4, rows_layout, count, save_mean,
                     save_invstd):
    """Raise when ``x`` changed since the forward (``_x_changed``); a
    ``x_check`` of None checks nothing."""
    if x_check is None:
        return
    first = _first_sample(x4, save_mean.shape[0], rows_layout)
    if _x_changed(psum_x, x_check, count, save_mean, save_invstd, first):
        raise RuntimeError(
            "the input of the last forward() was changed in place before "
            "backward(): its per-channel sums differ from the forward's by "
            "more than rounding, so the saved statistics no longer match "
            "it. Leave x unchanged until backward (pass forward a copy if "
            "you must reuse the array), or run forward again")


# --------------------------------------------------------------------------
# launching

def _serial_twin(kernel):
    """``kernel`` compiled without ``parallel`` (``prange`` runs as ``range``).

    The twin gets a qualified name of its own: Numba names cache files after
    the function, and a twin of the same name would load the parallel code.
    """
    func = kernel.py_func
    name = func.__name__ + "_serial"
    code = func.__code__.replace(co_name=name,
                                 co_qualname=func.__qualname__ + "_serial")
    twin = types.FunctionType(code, func.__globals__, name,
                              func.__defaults__, func.__closure__)
    options = {key: value for key, value in kernel.targetoptions.items()
               if key not in ("parallel", "nopython")}
    return njit(cache=True, **options)(twin)


_SERIAL_TWINS = {kernel: _serial_twin(kernel)
                 for kernel in (_channel_partials, _channel_partials_rows,
                                _affine_pass, _affine_pass_rows,
                                _forward_per_channel, _backward_per_channel,
                                _transposed_copy, _affine_pass_transposed)}
_launch_lock = threading.Lock()
_parallel_unsafe = False


def _after_fork_in_child():
    global _launch_lock, _parallel_unsafe
    # A lock another thread held at fork time would stay locked forever.
    _launch_lock = threading.Lock()
    try:
        layer = numba.threading_layer()
    except ValueError:  # the parent never ran a parallel kernel
        return
    _parallel_unsafe = _parallel_unsafe or layer == "omp"


os.register_at_fork(after_in_child=_after_fork_in_child)


# Below this many elements a pass is as fast serial as parallel: waking the
# thread pool costs a few microseconds, and a process that only normalizes
# small arrays never starts it (a fraction of a second of cold start).
_SERIAL_BELOW = 32768


def _launch(kernel, x4, *args):
    """Run ``kernel(x4, *args)``: serially for small ``x4`` or in a forked
    child of an OpenMP parent, else in parallel, one launch at a time."""
    if _parallel_unsafe or x4.size < _SERIAL_BELOW:
        kernel = _SERIAL_TWINS[kernel]
    with _launch_lock:
        kernel(x4, *args)



# Planes this short or shorter take the two passes even when their channel
# fits (``_per_channel``): a channel's planes lie a sample apart, and read a
# short plane at a time the hardware prefetchers fall behind two passes over
# contiguous memory.
_PER_CHANNEL_SHORT_PLANE = 1024


def _from_memory(x4):
    """Whether a kernel reads ``x4`` from memory, not from the cache
    (``_FROM_MEMORY_BYTES``), which changes the fastest way to walk it
    (``_partials``, ``forward_batch_stats``)."""
    return x4.nbytes >= _FROM_MEMORY_BYTES


def _per_channel(x4, inputs, rows_layout):
    """Whether a pass over ``inputs`` arrays like ``x4`` runs per channel:
    planes (not the channel-innermost layout, whose views of ``_views``
    are position-major) longer than ``_PER_CHANNEL_SHORT_PLANE`` bytes, in
    a channel that fits ``_PER_CHANNEL_BYTES``."""
    if rows_layout:
        return False
    n_samples, _, rows, cols = x4.shape
    plane_bytes = rows * cols * x4.itemsize
    return (plane_bytes > _PER_CHANNEL_SHORT_PLANE
            and inputs * n_samples * plane_bytes <= _PER_CHANNEL_BYTES)


def _row_chunks(xp):
    """Chunks of rows for a channel-innermost pass over position-major ``xp``."""
    n_samples, rows, cols, width = xp.shape
    positions = n_samples * rows * cols
    return max(1, min(positions,
                      -(-positions * width // _ROWS_CHUNK_ELEMENTS)))


def _partials(x4, dy4, center, moments, rows_layout, y4=None, g4=None):
    """Partial sums of every channel as three ``(P, C)`` float64 arrays (see
    ``_plane_sums``).

    Per plane (P = N) when a channel's values are contiguous, per chunk of
    positions (and position in a row group) when the channel axis is
    (``rows_layout``; ``x4``, ``dy4`` are then position-major, see
    ``_views``). With ``y4`` (a fused ReLU's output) the sums are of the
    gradient through the ReLU, which goes to ``g4``.
    """
    n_channels = center.shape[0]
    masked = y4 is not None
    if not masked:
        y4, g4 = dy4, _unwritten(dy4)
    if not rows_layout:
        psums = _empties(3, (x4.shape[0], n_channels))
        _launch(_channel_partials, x4, dy4, center, moments, *psums, y4, g4,
                masked)
        return psums
    psums = _empties(3, (_row_chunks(x4), x4.shape[3]))
    # Unrolled only for inputs in the cache, or float64 sums of x: from
    # memory (``_from_memory``) one position at a time, a line after the
    # other, keeps the prefetchers ahead where eight or sixteen lines at
    # once fall behind. The gradient sums read sixteen lines at once (eight
    # of x, eight of dy) and fall behind sooner
    # (``_UNROLLED_GRADIENT_SUMS_BYTES``).
    if moments:
        unrolled = x4.itemsize == 8 or not _from_memory(x4)
    else:
        unrolled = 2 * x4.nbytes < _UNROLLED_GRADIENT_SUMS_BYTES
    _launch(_channel_partials_rows, x4, dy4, center, moments, unrolled,
            *psums, y4, g4, masked)
    # (chunks, positions per row * C) is (chunks * positions per row, C):
    # one partial row each.
    return [a.reshape(-1, n_channels) for a in psums]


def _unwritten(a):
    """A stand-in for an output the kernels do not write: one element seen
    at every index of ``a``'s shape (zero strides), of one Numba type for
    every call (made once per shape, as making it costs a small call 5 us).
    """
    key = (a.dtype, a.shape)
    stand_in = _UNWRITTEN.get(key)
    if stand_in is None:
        if len(_UNWRITTEN) >= _VIEW_PLANS_KEPT:
            _UNWRITTEN.clear()
        stand_in = _UNWRITTEN[key] = np.lib.stride_tricks.as_strided(
            np.empty(1, a.dtype), a.shape, (0,) * a.ndim)
    return stand_in


_UNWRITTEN = {}


def _residual_views(x, residual, out):
    """``_views`` of a forward: ``(y, x4, residual4, y4, rows_layout)``,
    ``residual4`` standing in as ``x4`` without a residual."""
    if residual is None:
        y, (x4, y4), rows_layout = _views([x], out)
        return y, x4, x4, y4, rows_layout
    y, (x4, residual4, y4), rows_layout = _views(
        [x, *_computable(residual)], out)
    return y, x4, residual4, y4, rows_layout


def _add_residual(x4, mean, scale, offset, residual4, y4, rows_layout,
                  with_residual, relu, other):
    """``y4 = relu((x4 - mean) * scale + offset + residual4)``, each step
    where asked: ``_affine`` with a gain of 1 on the residual (``other``
    and the result as there)."""
    gain = np.ones(mean.shape[0]) if with_residual else scale  # unread
    return _affine(x4, mean, scale, offset, residual4, gain, with_residual,
                   y4, rows_layout, relu, other)


def _streams(out, arrays):
    """Whether the kernels write ``out`` (the view they index, whose last
    axis they write in lines) with nontemporal stores: a C-contiguous one
    in lines of ``_STREAM_MIN_LINE`` bytes or more, in a pass over
    ``arrays`` arrays of its size (inputs and ``out``) that hold
    ``_STREAM_WORKING_SET`` bytes or more."""
    return (arrays * out.nbytes >= _STREAM_WORKING_SET
            and out.flags.c_contiguous
            and out.shape[-1] * out.itemsize >= _STREAM_MIN_LINE)


def _affine(x4, mean, scale, offset, dy4, gain, with_dy, out4, rows_layout,
            relu=False, other=None):
    """``out4 = (x4 - mean) * scale + offset [+ gain * dy4]``, its ReLU with
    ``relu``, on the views of ``_views``.

    With ``other`` (``_other_layout_out``), the caller's ``out`` for which
    ``out4`` is a stand-in in ``x``'s layout, the pass writes ``other``
    instead, through tiles in the cache (``_affine_pass_transposed``): one
    pass, where the stand-in and its copy into ``other`` take three.
    Returns whether it wrote ``other``.
    """
    if (other is not None and _dense_layout(other) is (not rows_layout)
            and x4.flags.c_contiguous and dy4.flags.c_contiguous):
        out3 = _walked(other, not rows_layout)
        shape3 = (out3.shape[0], out3.shape[2], out3.shape[1])
        _launch(_affine_pass_transposed, x4.reshape(shape3), mean, scale,
                offset, dy4.reshape(shape3), gain, with_dy, relu,
                not rows_layout, out3,
                *_transposed_stores(other, out3, 3 if with_dy else 2))
        return True
    stream = _streams(out4, 3 if with_dy else 2)
    if rows_layout:
        _launch(_affine_pass_rows, x4, mean, scale, offset, dy4, gain,
                with_dy, relu, out4, _row_chunks(x4), stream)
    else:
        _launch(_affine_pass, x4, mean, scale, offset, dy4, gain, with_dy,
                relu, out4, stream)
    return False


def _other_layout_out(target, out):
    """``out``, where ``target``, the array the kernels write (``_views``),
    is a stand-in for it in ``x``'s dense layout, ``out`` being dense in the
    other one, of the same dtype (see ``_in_other_layout``); else None."""
    if out is None or target is out or out.dtype != target.dtype:
        return None
    layout = _dense_layout(target)
    return (out if layout is not None and _dense_layout(out) is (not layout)
            else None)


# --------------------------------------------------------------------------
# array plumbing

def _empties(count, shape, dtype=np.float64):
    """``count`` new arrays of ``shape``.

    Separate arrays: unpacking the rows of one costs 0.15 us a row more,
    which a small call notices.
    """
    return [np.empty(shape, dtype) for _ in range(count)]


def _compute_dtype(dtype):
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def _computable(*arrays):
    """The arrays themselves, float32 copies for float16 ones (None stays
    None), as a list."""
    return [a if a is None or a.dtype != np.float16 else a.astype(np.float32)
            for a in arrays]


def _computable_like(x, *like_x):
    """``_computable(x, *like_x)`` for arrays validated against ``x``: of
    ``x``'s dtype, unless ``x`` is float16. Only then can any of them be
    float16, so only then are they looked at one by one (which costs a
    small call 0.3 us)."""
    if x.dtype != np.float16:
        return (x, *like_x)
    return _computable(x, *like_x)


def _to_dtype(a, dtype):
    """``a`` cast to ``dtype`` (float16 results leave their float32 stand-in).

    Values beyond float16's range become inf, as in PyTorch, without
    NumPy's overflow warning.
    """
    if a.dtype == dtype:
        return a
    with np.errstate(over="ignore"):
        return a.astype(dtype)


def _write_back(target, computed):
    """Copy results computed in a stand-in (float32 for float16, or in
    ``x``'s memory layout: ``_in_other_layout``) back into ``target``."""
    if computed is target:
        return
    layout = _dense_layout(computed)
    if (computed.dtype == target.dtype and layout is not None
            and _dense_layout(target) is (not layout)):
        _relayout_copy(computed, target)
        return
    with np.errstate(over="ignore"):
        target[...] = computed


def _channels_last_axes(ndim):
    """The axes of an ``(N, C, *spatial)`` array with the channel axis last."""
    return (0, *range(2, ndim), 1)


def _dense_layout(a):
    """True for a dense channels-last ``(N, C, *spatial)`` array, False for
    a C-contiguous one; None for neither, for both (a single channel or
    position) and below 3 dimensions."""
    if a.ndim < 3:
        return None
    planes = a.flags.c_contiguous
    rows = a.transpose(_channels_last_axes(a.ndim)).flags.c_contiguous
    return None if planes == rows else rows


def _in_other_layout(inputs, out):
    """Where a pass mixes dense NCHW and dense channels-last arrays: the
    indices of the inputs in the other layout than ``x`` (``inputs[0]``),
    and whether ``out`` (None: one like ``x``) is in it.

    The kernels then see every array in ``x``'s layout: those inputs
    through copies (``_relaid``), such an ``out`` through a stand-in, which
    the element pass writes in its place where it can (``_affine``), else
    ``_write_back`` copies, so that the results are those of the call with
    every array in ``x``'s layout, to the last bit, whatever ``out`` is. A
    kernel reading across layouts walks one array with the stride of a
    channel or of a plane, 3-10x slower than a pass; a transposed copy
    costs about two passes.
    """
    layout = _dense_layout(inputs[0])
    if layout is None:
        return (), False
    other = not layout
    return (tuple(i for i, a in enumerate(inputs) if _dense_layout(a) is other),
            out is not None and _dense_layout(out) is other)


def _walked(a, channels_last):
    """A C-contiguous 3-d view of ``(N, C, *spatial)`` ``a``, as
    ``_transposed_copy`` and ``_affine_pass_transposed`` walk it:
    ``(N, positions, C)`` of dense ``channels_last`` data, else
    ``(N, C, positions)`` of C-contiguous data (a single channel or
    position is both)."""
    n_samples, n_channels = a.shape[:2]
    positions = a.size // max(1, n_samples * n_channels)
    # Reshapes of C-contiguous arrays: views, so the kernels write ``a``.
    if not channels_last:
        return a.reshape(n_samples, n_channels, positions)
    return a.transpose(_channels_last_axes(a.ndim)).reshape(
        n_samples, positions, n_channels)


def _transposed_stores(dst, dst3, arrays):
    """``(lead, stream)`` of a kernel that writes ``dst3``, a view of
    ``dst``, through ``_transposed_tile``, in a pass over ``arrays`` arrays:
    nontemporal stores as ``_streams`` decides them, for destination lines
    that all start at one offset in a cache line, which ``lead`` skips."""
    address, item = dst.ctypes.data, dst.itemsize
    line = dst3.shape[2] * item
    stream = (arrays * dst.nbytes >= _STREAM_WORKING_SET
              and address % item == 0 and line >= _STREAM_MIN_LINE
              and line % _CACHE_LINE == 0)
    return (-address % _CACHE_LINE // item if stream else 0), stream


def _relayout_copy(src, dst):
    """``dst[...] = src`` for arrays of one shape and dtype, one C-contiguous
    and the other dense channels-last (``_dense_layout``)."""
    to_channels_last = src.flags.c_contiguous
    dst3 = _walked(dst, to_channels_last)
    _launch(_transposed_copy, _walked(src, not to_channels_last), dst3,
            *_transposed_stores(dst, dst3, 2))


def _relaid(a, x):
    """A copy of dense ``a`` in the memory layout of ``x``, dense in the
    other one."""
    copy = _allocate(_allocation(x), a.dtype)
    _relayout_copy(a, copy)
    return copy


def _views(inputs, out):
    """The array the kernels write, and the views the kernels walk.

    Parameters
    ----------
    inputs : list of numpy.ndarray
        float32/float64 inputs of one shape.
    out : numpy.ndarray or None
        The caller's output, or None for a new one like ``inputs[0]``.

    Returns
    -------
    target : numpy.ndarray
        ``out`` itself when the kernels can write it (see ``_plan_views``),
        else a new float32/float64 array.
    list of numpy.ndarray
        Views of the inputs and of ``target`` with one common geometry:
        ``(N, C, R, S)`` (see ``_layout``), or, where ``rows_layout``,
        ``(N, R, S, C)`` or one line of rows (``_plan_views``).
        Inputs are copied only where their spatial axes do not merge into
        two, or into ``x``'s layout (``_in_other_layout``).
    rows_layout : bool
        Whether the channel axis is the contiguous one (channels-last,
        ``(N, C)``): the kernels then walk positions, not planes. Decided
        once per call, so that the passes of an operation share the views.
    """
    dtype = inputs[0].dtype
    writes_out = out is not None and out.dtype == dtype
    key = (dtype, inputs[0].shape, writes_out,
           None if out is None else out.strides, *[a.strides for a in inputs])
    plan = _VIEW_PLANS.get(key)
    if plan is None:
        if len(_VIEW_PLANS) >= _VIEW_PLANS_KEPT:
            _VIEW_PLANS.clear()
        plan = _VIEW_PLANS[key] = _plan_views(inputs, out, writes_out)
    copies, allocation, shape4, rows_layout, dense_rows, minority = plan
    if copies:
        inputs = [np.ascontiguousarray(a) for a in inputs]
    if minority:
        inputs = [_relaid(a, inputs[0]) if i in minority else a
                  for i, a in enumerate(inputs)]
    target = out if allocation is None else _allocate(allocation, dtype)
    arrays = (*inputs, target)
    # Reshapes are views here (the plan found that the axes merge) and far
    # cheaper than as_strided; size-1 axes take whatever stride they give.
    if dense_rows is not None:
        channel_last, rows_shape = dense_rows
        return target, [a.transpose(channel_last).reshape(rows_shape)
                        for a in arrays], True
    views = [a.reshape(shape4) for a in arrays]
    if rows_layout:
        return target, [v.transpose(0, 2, 3, 1) for v in views], True
    return target, views, False


# ``_views``' decisions depend only on the arrays' dtype, shape and strides,
# of which a training loop meets a few: they are worked out once each
# (``_plan_views``), as checking flags and strides on every call costs a
# small call as long as its pass.
_VIEW_PLANS = {}
_VIEW_PLANS_KEPT = 1024


def _plan_views(inputs, out, writes_out):
    """How ``_views`` makes the views of arrays like these.

    Returns
    -------
    copies : bool
        Whether the inputs are copied to C-contiguous ones first (spatial
        axes that do not merge into two) and the target is a new
        C-contiguous array.
    allocation : tuple or None
        ``(base_shape, axes)`` of a new target (see ``_allocation``), or
        None to write ``out`` (``writes_out``).
    shape4 : tuple of int
        The ``(N, C, R, S)`` shape that every array is reshaped to (a view).
    rows_layout : bool
        See ``_views``.
    dense_rows : tuple or None
        Where all arrays with their channel axis moved last are
        C-contiguous (dense channels-last data): that transposition and
        the shape ``(1, 1, rows, width)`` of one line of rows it is
        reshaped to (no copy), so that the kernels slice
        once per chunk, not once per sample. Rows then hold several
        consecutive positions, at least ``_ROWS_MIN_LENGTH`` values where
        ``C`` is small: the kernels slice once per row, and a row of 16
        values costs a slice per 16 values. The kernels tile per-channel
        vectors to the rows' width (``_tiled``), and their partial sums come
        out per position of a row.
    minority : tuple of int
        The inputs that ``_views`` copies into ``x``'s layout
        (``_in_other_layout``).
    """
    dtype = inputs[0].dtype
    allocation = None if writes_out else _allocation(
        inputs[0] if out is None else out)
    minority, out_in_other_layout = _in_other_layout(inputs, out)
    if minority:
        # Plan with arrays like their copies in x's layout.
        inputs = [_allocate(_allocation(inputs[0]), dtype)
                  if i in minority else a for i, a in enumerate(inputs)]
    if out_in_other_layout:
        allocation = _allocation(inputs[0])
    target = out if allocation is None else _allocate(allocation, dtype)
    arrays = [*inputs, target]
    copies = False
    if all([a.flags.c_contiguous for a in arrays]):
        n_samples, n_channels = target.shape[:2]
        shape4 = (n_samples, n_channels, 1,
                  target.size // max(1, n_samples * n_channels))
    else:
        geometry = canonical_geometry(target.shape,
                                      tuple(a.strides for a in arrays))
        if geometry is None:
            # Every call copies the inputs to C order: plan with new
            # C-order arrays, whose strides are the copies', not the copies.
            # Those copies bring any input in the other layout to C order
            # too, so none is copied into x's first.
            copies = True
            minority = ()
            allocation = (target.shape, None)
            arrays = [_allocate(allocation, dtype) for _ in arrays]
            geometry = canonical_geometry(target.shape,
                                          tuple(a.strides for a in arrays))
        shape4 = geometry[0]
    if not is_channels_last(shape4, arrays[0].reshape(shape4).strides):
        return copies, allocation, shape4, False, None, minority
    # The arrays with their channel axis last: (N, R, S, C) walks.
    channel_last = _channels_last_axes(target.ndim)
    walks = [a.transpose(channel_last) for a in arrays]
    if (not walks[-1].flags.c_contiguous
            and all([w.flags.c_contiguous for w in walks[:-1]])):
        # An ``out`` that breaks the inputs' line of rows: the sums must
        # come out as without it, to the last bit, so the kernels write a
        # stand-in like the input, which ``_deliver`` copies into ``out``.
        allocation = _allocation(inputs[0])
    elif not all([w.flags.c_contiguous for w in walks]):
        return copies, allocation, shape4, True, None, minority
    n_channels = target.shape[1]
    positions = target.size // max(1, n_channels)
    group = max(1, _ROWS_MIN_LENGTH // n_channels)
    while positions % group:
        group -= 1
    return (copies, allocation, shape4, True,
            (channel_last, (1, 1, positions // group, group * n_channels)),
            minority)


def _deliver(target, dtype, out):
    """The result in ``dtype``: ``out`` when given (filled from ``target``)."""
    if out is None:
        return _to_dtype(target, dtype)
    _write_back(out, target)
    return out


def empty(shape, dtype):
    """An uninitialized array of this device."""
    return np.empty(shape, dtype)


def empty_like(x, dtype=None):
    """Uninitialized array of ``x``'s shape and memory order (channels-last stays).

    Parameters
    ----------
    x : numpy.ndarray
        Input of shape ``(N, C, *spatial)``.
    dtype : numpy.dtype, optional
        Defaults to ``x.dtype``.
    """
    return _allocate(_allocation(x), dtype or x.dtype)


def _allocation(x):
    """``(base_shape, axes)``: ``empty(base_shape).transpose(axes)`` has
    ``x``'s shape and memory order (see ``_layout.output_allocation``)."""
    if x.flags.c_contiguous:
        return x.shape, None
    return output_allocation(x.shape, x.strides)


def _allocate(allocation, dtype):
    """A new array as ``_allocation`` describes it (axes None: C order)."""
    base_shape, axes = allocation
    if axes is None:
        return np.empty(base_shape, dtype)
    return np.empty(base_shape, dtype).transpose(axes)


def from_host(a):
    """``a`` as an array of this device (a NumPy array; no copy if it is one)."""
    return np.asarray(a)


def to_host(a):
    """``a`` as a NumPy array."""
    return np.asarray(a)


def copy_from_host(target, values):
    """Overwrite array ``target`` in place with host ``values`` of its shape."""
    target[...] = values


def may_share_memory(a, b):
    """Whether arrays ``a`` and ``b`` may overlap (``numpy.may_share_memory``)."""
    return np.may_share_memory(a, b)


def message_buffer(a):
    """``a`` as an MPI buffer (SyncBatchNorm): ``a`` itself."""
    return a


# --------------------------------------------------------------------------
# operations

def forward_batch_stats(x, weight, bias, eps, running_mean, running_var,
                        num_batches_tracked, momentum, cumulative, out=None,
                        moments=None, residual=None, relu=False):
    """Normalize ``x`` with its batch statistics; update the running ones.

    Parameters
    ----------
    x : numpy.ndarray
        Validated input ``(N, C, *spatial)`` with at least 2 values per channel.
    weight, bias : numpy.ndarray or None
        Affine parameters, shape ``(C,)``.
    eps : float
    running_mean, running_var : numpy.ndarray or None
        Updated in place when given.
    num_batches_tracked : numpy.ndarray or None
        0-d int64 counter, incremented when given.
    momentum : float
        Weight of the batch in the running average.
    cumulative : bool
        Use ``1 / num_batches_tracked`` (after the increment) instead of
        ``momentum``.
    out : numpy.ndarray, optional
        Validated output array (shape and dtype of ``x``) to fill and return.
    moments : tuple, optional
        ``(count, shift, partials)``: the statistics of a batch that ``x``
        is part of (SyncBatchNorm), as :func:`merge_ranks` returns them: the
        value count, ``(C,)`` float64 shifts and the ``(2, 1, C)`` float64
        sums of ``x - shift`` and its square; then ``x``'s own are not
        computed.
    residual : numpy.ndarray, optional
        Validated array like ``x`` added to the normalized values (``out``
        may be ``residual`` itself).
    relu : bool, optional
        Apply the ReLU last: ``y = relu(bn(x) + residual)``.

    Returns
    -------
    y, save_mean, save_invstd : numpy.ndarray
        Output like ``x``; float64 batch mean and ``1 / sqrt(var + eps)``.
    """
    x_compute, weight, bias, rm, rv = _computable_like(
        x, weight, bias, running_mean, running_var)
    y, x4, residual4, y4, rows_layout = _residual_views(x_compute, residual,
                                                        out)
    other = _other_layout_out(y, out)
    n_channels = x.shape[1]
    save_mean, save_invstd, scale, offset = _empties(4, n_channels)
    counter = (None if num_batches_tracked is None
               else num_batches_tracked.reshape(1))
    # One kernel per channel (``_per_channel``) for float64, and for float32
    # only in the cache: from memory two passes over contiguous memory beat
    # one over a channel's planes a sample apart, as a float32 byte holds
    # twice the values to convert and sum. The backward keeps it (it saves
    # two tensor reads per channel, not one). For an ``out`` in the other
    # layout it only computes the statistics, which ``_affine`` then
    # applies: a channel's values are a cache line apart there.
    per_channel = (moments is None
                   and (x4.itemsize == 8 or not _from_memory(x4))
                   and _per_channel(x4, 1, rows_layout))
    if per_channel:
        _launch(_forward_per_channel, x4, weight, bias, eps, rm, rv, counter,
                momentum, cumulative, save_mean, save_invstd, scale, offset,
                y4, _streams(y4, 2 if residual is None else 3), residual4,
                residual is not None, relu, other is None)
    else:
        if moments is None:
            # Sums of x - shift with a sample of each channel as its
            # shift; float64 like the backward's mean, so both passes
            # share one compiled kernel.
            shift = _first_sample(x4, n_channels, rows_layout).astype(
                np.float64)
            psum, psumsq, _ = _partials(x4, x4, shift, True, rows_layout)
            count = x.size // n_channels
        else:
            count, shift, (psum, psumsq) = moments
        _finish_batch_stats(shift, psum, psumsq, count, weight, bias, eps,
                            rm, rv, counter, momentum, cumulative, save_mean,
                            save_invstd, scale, offset)
    if (not per_channel or other is not None) and _add_residual(
            x4, save_mean, scale, offset, residual4, y4, rows_layout,
            residual is not None, relu, other):
        y = out
    if running_mean is not None:
        _write_back(running_mean, rm)
        _write_back(running_var, rv)
    if counter is not None:
        counter[0] += 1  # the item: ``+=`` on the array costs 1 us more
    return _deliver(y, x.dtype, out), save_mean, save_invstd


def forward_running_stats(x, weight, bias, eps, running_mean, running_var,
                          out=None, residual=None, relu=False):
    """Normalize ``x`` with the running statistics (eval mode, frozen);
    ``residual``, ``relu`` as in :func:`forward_batch_stats`.

    Returns
    -------
    y, save_mean, save_invstd : numpy.ndarray
        Output like ``x``; the float64 running mean and
        ``1 / sqrt(running_var + eps)`` that normalized it.
    """
    x_compute, running_mean, running_var, weight, bias = _computable_like(
        x, running_mean, running_var, weight, bias)
    y, x4, residual4, y4, rows_layout = _residual_views(x_compute, residual,
                                                        out)
    save_mean, save_invstd, scale, offset = _empties(4, x.shape[1])
    _finish_running_stats(running_mean, running_var, weight, bias, eps,
                          save_mean, save_invstd, scale, offset)
    if _add_residual(x4, save_mean, scale, offset, residual4, y4, rows_layout,
                     residual is not None, relu, _other_layout_out(y, out)):
        y = out
    return _deliver(y, x.dtype, out), save_mean, save_invstd


def backward(dy, x, weight, save_mean, save_invstd, batch_stats, grad_dtype,
             out=None, sums=None, x_check=None, y=None):
    """Gradients of a forward that normalized with ``save_mean``/``save_invstd``.

    Parameters
    ----------
    dy, x : numpy.ndarray
        Output gradient and the forward's input, same shape and dtype.
    weight : numpy.ndarray or None
    save_mean, save_invstd : numpy.ndarray
        The statistics the forward used.
    batch_stats : bool
        Whether they were the batch's own (then the gradient also flows
        through them) or constants (running statistics).
    grad_dtype : numpy.dtype or None
        dtype of ``grad_weight``/``grad_bias``; None computes neither.
    out : numpy.ndarray, optional
        Validated output array for ``dx``.
    sums : tuple, optional
        ``(count, partials, message, rank)`` over a batch that ``x`` is
        part of (SyncBatchNorm): the value count and the ``(2, 1, C)``
        float64 sums of ``dy`` and ``dy * (x - save_mean)`` for the
        coefficients of ``dx``, in place of ``x``'s own, as
        :func:`merge_ranks` returns them; the parameter gradients come from
        this rank's own sums, row ``rank`` of the gathered ``message``.
    x_check : numpy.ndarray, optional
        ``(C,)`` float64 sums of ``x - save_mean`` at the forward (zeros:
        ``save_mean`` is ``x``'s mean), for a batch-statistics backward
        without ``sums`` to check that ``x`` is unchanged; None checks
        nothing (the functional form, whose caller may pass any
        statistics).
    y : numpy.ndarray, optional
        The output of a forward with a fused ReLU: ``dy`` is the gradient
        of ``y`` and goes through the ReLU first. Not with ``sums``
        (:func:`write_message` takes ``y`` there).

    Returns
    -------
    dx : numpy.ndarray
    grad_weight, grad_bias : numpy.ndarray or None
    grad_output : numpy.ndarray
        The gradient at the batch norm's output, which a residual added
        there also gets: ``dy`` through the ReLU (a new array like ``x``,
        written by the pass that sums it), or ``dy`` itself without ``y``.

    Raises
    ------
    RuntimeError
        ``x``'s sums differ from ``x_check`` by more than rounding: ``x``
        was changed since the forward.
    """
    x_compute, dy_compute, weight = _computable_like(x, dy, weight)
    n_channels = x.shape[1]
    # Statistics are not validated against x's dtype: numba_bn's forward
    # returns float64 ones, PyTorch's the input's dtype. The kernels sum
    # about a float64 mean.
    save_mean, save_invstd = [np.asarray(a, np.float64)
                              for a in (save_mean, save_invstd)]
    count = x.size // n_channels
    grad_output = dy
    if y is not None:
        # The pass that sums the gradient through the ReLU also writes it,
        # and dx is then computed from it: 5 tensor reads and 2 writes.
        grad_output, (x4, dy4, y4, g4), rows_layout = _views(
            [x_compute, dy_compute, *_computable_like(x, y)[1:]], None)
        psums = _partials(x4, dy4, save_mean, False, rows_layout, y4, g4)
        if batch_stats:
            _check_unchanged(x_check, psums[2], x4, rows_layout, count,
                             save_mean, save_invstd)
        sums = (count, psums[:2], None, 0)
        dy_compute = grad_output
    dx, (x4, dy4, dx4), rows_layout = _views([x_compute, dy_compute], out)
    grad_weight = grad_bias = None
    if grad_dtype is not None:
        grad_weight, grad_bias = _empties(2, n_channels,
                                          _compute_dtype(grad_dtype))
    scale, offset, gain = _empties(3, n_channels)
    reduces = sums is None and (batch_stats or grad_dtype is not None)
    if reduces and batch_stats and _per_channel(x4, 2, rows_layout):
        # With dx even for an ``out`` in the other layout, unlike the
        # forward: a stand-in and its copy cost the two passes that a
        # transposing pass would spend reading x and dy again, and measured
        # faster in float32.
        sum_x = np.empty((1, n_channels))
        _launch(_backward_per_channel, x4, dy4, save_mean, save_invstd,
                weight, batch_stats, grad_weight, grad_bias, scale, offset,
                gain, dx4, _streams(dx4, 3), sum_x)
        # After dx, which the same kernel wrote: the module's state is
        # assigned only when this returns.
        _check_unchanged(x_check, sum_x, x4, rows_layout, count, save_mean,
                         save_invstd)
    else:
        message = None
        if sums is not None:
            count, (psum_dy, psum_dy_xmu), message, rank = sums
        elif reduces:
            psum_dy, psum_dy_xmu, psum_x = _partials(x4, dy4, save_mean,
                                                     False, rows_layout)
            if batch_stats:
                _check_unchanged(x_check, psum_x, x4, rows_layout, count,
                                 save_mean, save_invstd)
        else:
            # Constant statistics and no parameter gradient: dx = gain * dy.
            psum_dy = psum_dy_xmu = np.zeros((0, n_channels))
        _finish_backward(psum_dy, psum_dy_xmu, count, save_invstd, weight,
                         batch_stats, grad_weight, grad_bias, scale, offset,
                         gain)
        if message is not None and grad_dtype is not None:
            # Parameter gradients of this rank's own sums, as in PyTorch.
            own = message[rank, 2:].reshape(2, 1, n_channels)
            _finish_backward(own[0], own[1], count, save_invstd, weight,
                             batch_stats, grad_weight, grad_bias,
                             *_empties(3, n_channels))
        if batch_stats:
            wrote_other = _affine(x4, save_mean, scale, offset, dy4, gain,
                                  True, dx4, rows_layout,
                                  other=_other_layout_out(dx, out))
        else:
            # Constant statistics: dx = gain * dy, which reads no x (NaN or
            # inf there must not reach dx, as in PyTorch).
            zeros = np.zeros(n_channels)
            wrote_other = _affine(dy4, zeros, gain, zeros, dy4, gain, False,
                                  dx4, rows_layout,
                                  other=_other_layout_out(dx, out))
        if wrote_other:
            dx = out
    if grad_dtype is not None:
        grad_weight = _to_dtype(grad_weight, grad_dtype)
        grad_bias = _to_dtype(grad_bias, grad_dtype)
    return (_deliver(dx, dy.dtype, out), grad_weight, grad_bias,
            _to_dtype(grad_output, dy.dtype))


def write_message(gathered, rank, x, dy, center, moments, x_check=None,
                  save_invstd=None, y=None):
    """This rank's SyncBatchNorm message, into row ``rank`` of ``gathered``.

    ``[1, count, *shift, *s1, *s2]`` with ``moments``: the shift is a sample
    of each channel, ``x[0, c, 0, ...]``, and ``s1``, ``s2`` the sums of
    ``x - shift`` and its square (they do not cancel when the mean is
    large). Otherwise ``[1, count, *sum(dy), *sum(dy * (x - center))]``.

    Parameters
    ----------
    gathered : numpy.ndarray
        ``(P, L)`` float64 message buffer of every rank.
    rank : int
    x, dy : numpy.ndarray
        Validated arrays of one shape, not empty (pass ``x`` as ``dy`` with
        ``moments``).
    center : numpy.ndarray or None
        ``(C,)`` float64 forward mean (backward only).
    moments : bool
    x_check, save_invstd : numpy.ndarray, optional
        Backward only: ``(C,)`` float64 sums of this shard's
        ``x - center`` at the forward, and the forward's ``save_invstd``,
        to check that ``x`` is unchanged, as in :func:`backward`.
    y : numpy.ndarray, optional
        Backward only: a fused ReLU's output, as in :func:`backward`.

    Returns
    -------
    numpy.ndarray
        Backward: the gradient at the batch norm's output (``grad_output``
        of :func:`backward`), for the backward's ``dy``.

    Raises
    ------
    RuntimeError
        ``x`` was changed since the forward (see :func:`backward`).
    """
    original_dy = dy
    x, dy = _computable_like(x, dy)
    y4 = g4 = None
    if y is None:
        # x is its own target here: the views are read, nothing is written.
        _, (x4, dy4, _), rows_layout = _views([x, dy], x)
        grad_output = original_dy
    else:
        grad_output, (x4, dy4, y4, g4), rows_layout = _views(
            [x, dy, *_computable_like(x, y)[1:]], None)
    n_channels = x.shape[1]
    row = gathered[rank]
    count = x.size // n_channels
    row[:2] = 1, count
    if moments:
        center = row[2:2 + n_channels]
        center[:] = _first_sample(x4, n_channels, rows_layout)
    psum, psumprod, psum_x = _partials(x4, dy4, center, moments, rows_layout,
                                       y4, g4)
    if not moments:
        _check_unchanged(x_check, psum_x, x4, rows_layout, count, center,
                         save_invstd)
    _merge_partials(psum, psumprod, row[-2 * n_channels:-n_channels],
                    row[-n_channels:])
    return _to_dtype(grad_output, original_dy.dtype)


def merge_ranks(gathered, moments):
    """Whole-batch totals from every process's message (SyncBatchNorm).

    Parameters
    ----------
    gathered : numpy.ndarray
        ``(P, L)`` float64, one message per process in rank order (see
        :func:`write_message`).
    moments : bool

    Returns
    -------
    header : numpy.ndarray
        ``(P, 2)`` float64: each process's ``ok`` flag and value count.
    partials : numpy.ndarray
        ``(2, 1, C)`` float64: with ``moments`` the whole batch's sums of
        ``x - mean`` (0) and of its square (``m2``); else the two sums.
    center : numpy.ndarray
        ``(C,)`` float64: with ``moments`` the whole batch's mean (the
        shift of ``partials``).
    """
    n_channels = (gathered.shape[1] - 2) // (3 if moments else 2)
    header = np.empty((gathered.shape[0], 2))
    partials = np.empty((2, 1, n_channels))
    center = np.empty(n_channels)
    _merge_ranks(gathered, moments, header, partials, center)
    return header, partials, center
