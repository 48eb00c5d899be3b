"""The canonical (N, C, R, S) view that every kernel of both backends reads.

Batch norm reduces over every axis but the channel axis. The kernels see the
input as a 4-d array ``(N, C, R, S)`` with arbitrary strides: the spatial axes
(none for ``(N, C)``, ``L``, ``H, W`` or ``D, H, W``) are merged into at most
two axes ``R`` and ``S`` wherever their strides allow it without a copy. Any
1-d or 2-d input and any 3-d input whose strides merge one pair of spatial
axes (contiguous, channels-last, most slices) therefore needs no copy, and
the kernels are compiled for a single number of dimensions.

Kernels walk either planes ``(n, c)`` (when a channel's values are
contiguous, NCHW) or positions ``(n, r, s)`` with all channels at once (when
the channel axis is the contiguous one: channels-last, ``(N, C)``).
"""
import functools

from numba.extending import register_jitable


@register_jitable
def split_position(j, rows, cols):
    """``(n, r, s)`` of the ``j``-th position, counting ``s`` fastest."""
    plane = rows * cols
    n = j // plane
    rs = j - n * plane
    r = rs // cols
    return n, r, rs - r * cols


@register_jitable
def line_segment(j, stop, rows, cols):
    """``(n, r, first, last)``: positions ``j`` up to ``stop`` that lie on one
    line ``(n, r, :)``, so that a kernel slices once per segment."""
    n, r, first = split_position(j, rows, cols)
    return n, r, first, min(cols, first + stop - j)


def merge_spatial(shape, strides_per_array):
    """Merge spatial axes where the strides of every array allow it.

    Parameters
    ----------
    shape : tuple of int
        The spatial part of the arrays' common shape.
    strides_per_array : list of tuple of int
        The spatial strides of each array (all in bytes, or all in elements).

    Returns
    -------
    list of (int, list of int)
        ``(size, strides)`` per merged axis, outermost first, with one stride
        per array. Axes of size 1 are dropped (their stride never matters),
        so an empty list means one element per channel and sample.
    """
    merged = []
    for axis in reversed(range(len(shape))):
        size = shape[axis]
        if size == 1:
            continue
        strides = [st[axis] for st in strides_per_array]
        if merged and all(outer == merged[-1][0] * inner for outer, inner
                          in zip(strides, merged[-1][1])):
            merged[-1] = (size * merged[-1][0], merged[-1][1])
        else:
            merged.append((size, strides))
    return merged[::-1]


# Memoized: a training loop meets the same few geometries on every call,
# and working one out in Python costs several microseconds, as much as a
# small pass itself.
@functools.lru_cache(maxsize=1024)
def canonical_geometry(shape, strides_per_array):
    """Common shape and per-array strides of the ``(N, C, R, S)`` views.

    Every array of one pass must be seen through the same ``(R, S)`` split,
    so the axes merge only where they merge in all of them.

    Parameters
    ----------
    shape : tuple of int
        The arrays' common shape ``(N, C, *spatial)``.
    strides_per_array : tuple of tuple of int
        Each array's strides.

    Returns
    -------
    tuple or None
        ``((N, C, R, S), ((sN, sC, sR, sS), ...))``, or ``None`` when the
        spatial axes do not merge into two (a 3-d input sliced in all three
        spatial axes): the caller then works on contiguous copies.
    """
    merged = merge_spatial(shape[2:], [st[2:] for st in strides_per_array])
    if len(merged) > 2:
        return None
    unit = [0] * len(strides_per_array)
    merged = [(1, unit)] * (2 - len(merged)) + merged
    (rows, row_strides), (cols, col_strides) = merged
    return ((shape[0], shape[1], rows, cols),
            tuple((st[0], st[1], r, c) for st, r, c
                  in zip(strides_per_array, row_strides, col_strides)))


@functools.lru_cache(maxsize=1024)
def is_channels_last(shape, strides):
    """Whether the channel axis has the smallest stride of the non-trivial axes.

    Such inputs (NHWC memory seen as NCHW, or a C-contiguous ``(N, C)``
    batch) get outputs of the same memory order, as PyTorch keeps the memory
    format, and GPU element passes walk them with the channel innermost so
    that neighbouring threads touch neighbouring addresses.
    """
    if shape[1] == 1:
        return False
    others = [abs(st) for i, (sz, st) in enumerate(zip(shape, strides))
              if i != 1 and sz > 1]
    return bool(others) and abs(strides[1]) < min(others)


@functools.lru_cache(maxsize=1024)
def output_allocation(shape, strides):
    """How to allocate an output like an input of ``shape`` and ``strides``.

    Channels-last inputs get channels-last outputs, everything else a
    C-contiguous one. Memoized, as ``canonical_geometry``: a small call
    spent 1 us working this out.

    Returns
    -------
    base_shape : tuple of int
    axes : tuple of int
        ``empty(base_shape).transpose(axes)`` has ``shape`` and the input's
        memory order.
    """
    ndim = len(shape)
    order = tuple(range(ndim))
    if is_channels_last(shape, strides):
        order = (0,) + tuple(range(2, ndim)) + (1,)
    return (tuple(shape[axis] for axis in order),
            tuple(order.index(axis) for axis in range(ndim)))
