"""Per-channel formulas shared by the CPU and the GPU kernels.

Each ``finish_*`` function handles the channels of a ``range``: the CPU
passes all of them in one call (arguments are passed once, not per
channel), a GPU thread passes its own. ``register_jitable`` makes one Python
source compile into Numba's CPU kernels (``cpu.py``) and its CUDA kernels
(``cuda.py``), so both devices derive statistics, running averages and
gradient coefficients with the same float64 arithmetic. The element passes
themselves live in the backends, where memory access differs.

The two element formulas (``partial_terms`` and ``affine_element``) are
shared too, so that the twin kernels differ only in how they walk memory
(and in one CPU arithmetic shortcut for float32, ``cpu._leaves_mean_out``).

Numba's on-disk cache keys a kernel on its own source file only: after
editing this module, delete ``numba_bn/__pycache__`` (installed packages are
not edited, so users never meet stale kernels).

Partial sums arrive as ``(P, C)`` float64 arrays: the GPU's last block
merges its rows and passes one, as the CPU does (``cpu._row_totals``).

Optional per-channel arrays (weight, bias, running buffers, counter,
gradients) are tested as ``a is not None and a.shape[0] > 0``: the CPU
passes ``None`` (Numba compiles the branch away, which it does only when
the test names the argument itself), the GPU an empty placeholder array,
because numba-cuda's launcher refuses ``None`` as a kernel argument.
"""
import math

import numpy as np
from numba.extending import register_jitable


@register_jitable
def partial_terms(x, dy, k, moments):
    """The two summands of one element ``x``: ``u`` and ``u * (x - k)``.

    ``u = x - k`` with ``moments`` (shifted first and second moments, the
    forward pass: ``k`` is a sample of the channel, so the float64 sums do
    not cancel when ``|mean| >> std``, unlike ``E[x**2] - E[x]**2``), else
    ``u = dy`` (gradient sums, the backward pass: ``k`` is the mean).
    A flag rather than ``dy=None``: forward and backward then share one
    compiled kernel, which halves the compilation of a cold start.

    The kernels pass element values, not arrays and an index: an array
    argument costs a reference-count update per call, which two CPU threads
    contend for (short rows ran at half speed).
    """
    v = np.float64(x) - k
    u = v if moments else np.float64(dy)
    return u, u * v


@register_jitable
def affine_element(x, dy, mean, scale, offset, gain, with_dy, relu):
    """``(x - mean) * scale + offset``, plus ``gain * dy`` ``with_dy``, then
    ``max(., 0)`` with ``relu``.

    ``with_dy`` with ``gain`` 1 adds a residual. The ReLU keeps NaN, as
    PyTorch's does (``v < 0`` is false for NaN).

    float64 arithmetic: ``x - mean`` must not round the mean to the input's
    precision (mean 1e4 in float32 is off by up to 5e-4). The coefficients
    are the element's channel's values: a plane kernel reads them once per
    plane, so that LLVM need not prove that the output never overlaps them
    (it vectorizes a loop with a few runtime overlap checks, not with many).
    """
    v = (np.float64(x) - mean) * scale + offset
    if with_dy:
        v += gain * np.float64(dy)
    if relu and v < 0.0:
        v = 0.0
    return v


@register_jitable
def masked_gradient(dy, y, masked):
    """``dy`` as float64, or 0 where ``masked`` and the ReLU's output ``y``
    is not positive: the gradient through ``relu``, PyTorch's
    ``threshold_backward`` (0 at exactly 0; NaN in ``y`` lets ``dy``
    through)."""
    if masked and y <= 0:
        return 0.0
    return np.float64(dy)


@register_jitable
def merged_sums(psum, psumprod, c):
    """Channel ``c``'s totals of the two ``(P, C)`` partial-sum arrays."""
    total = 0.0
    total_prod = 0.0
    for p in range(psum.shape[0]):
        total += psum[p, c]
        total_prod += psumprod[p, c]
    return total, total_prod


@register_jitable
def merge_ranks(channels, gathered, moments, partials, center):
    """Combine the per-channel sums of several processes, in rank order, into
    ``partials[:, 0]`` as the finishers read them.

    Row ``r`` of ``gathered`` is rank ``r``'s message: ``[ok, count, *a, *b]``
    with ``moments`` (``a`` = shift, then its ``x - shift`` sums ``s1`` and
    ``s2``: three ``C``-blocks), else ``[ok, count, *sum_a, *sum_b]`` (two).
    Without ``moments`` the totals are plain sums. With ``moments`` they
    are the whole batch's mean and ``m2``, the sum of squared deviations,
    by Chan's merge: ``(n_a, mean_a, m2_a)`` and ``(n_b, mean_b, m2_b)``
    with ``delta = mean_b - mean_a`` and ``n = n_a + n_b`` give
    ``mean = mean_a + delta * n_b / n`` and
    ``m2 = m2_a + m2_b + delta**2 * n_a * n_b / n``: no ``sum(x**2)``, so
    nothing cancels when the mean is large. Every process merges the same
    rows in the same order, so all get bit-identical statistics.

    With ``moments`` the mean goes to ``center`` and ``partials[:, 0]``
    holds the sums about it, ``0`` and ``m2``; otherwise the two sums.
    """
    n_channels = partials.shape[2]
    first = 2 + n_channels if moments else 2
    for c in channels:
        count = 0.0
        a = 0.0
        b = 0.0
        for r in range(gathered.shape[0]):
            n = gathered[r, 1]
            a_r = gathered[r, first + c]
            b_r = gathered[r, first + n_channels + c]
            if not moments:
                a += a_r
                b += b_r
            elif n > 0:
                mean_r = gathered[r, 2 + c] + a_r / n
                m2_r = max(b_r - a_r * (a_r / n), 0.0)
                merged = count + n
                delta = mean_r - a
                a += delta * (n / merged)
                b += m2_r + delta * delta * (count * n / merged)
            count += n
        if moments:
            center[c] = a
            partials[0, 0, c] = 0.0
        else:
            partials[0, 0, c] = a
        partials[1, 0, c] = b


@register_jitable
def affine_coefficients(c, invstd, weight, bias):
    """``(scale, offset)`` of ``y = (x - mean) * scale + offset``: normalization
    and affine map folded."""
    s = invstd
    if weight is not None and weight.shape[0] > 0:
        s = invstd * np.float64(weight[c])
    b = 0.0
    if bias is not None and bias.shape[0] > 0:
        b = np.float64(bias[c])
    return s, b


@register_jitable
def affine(c, mean, invstd, weight, bias, scale, offset):
    """:func:`affine_coefficients` of channel ``c`` into ``scale``, ``offset``."""
    scale[c], offset[c] = affine_coefficients(c, invstd, weight, bias)


@register_jitable
def finish_batch_stats(channels, shift, psum, psumsq, count, weight, bias,
                       eps, running_mean, running_var, num_batches_tracked,
                       momentum, cumulative, save_mean, save_invstd,
                       scale, offset):
    """Batch mean and biased variance of each channel; update running stats.

    ``psum``/``psumsq`` hold partial sums of ``x - shift[c]`` and its
    square.
    The running variance takes the unbiased estimate ``var * n / (n - 1)``
    (``count >= 2`` is checked before dispatch). With ``cumulative`` the
    averaging factor is ``1 / (num_batches_tracked + 1)``, the count after
    this batch (PyTorch's ``momentum=None``).
    """
    factor = momentum
    if num_batches_tracked is not None and num_batches_tracked.shape[0] > 0:
        if cumulative:
            factor = 1.0 / (num_batches_tracked[0] + 1)
    for c in channels:
        s1, s2 = merged_sums(psum, psumsq, c)
        shifted_mean = s1 / count
        mean = np.float64(shift[c]) + shifted_mean
        var = max((s2 - s1 * shifted_mean) / count, 0.0)
        invstd = 1.0 / math.sqrt(var + eps)
        save_mean[c] = mean
        save_invstd[c] = invstd
        affine(c, mean, invstd, weight, bias, scale, offset)
        if running_mean is not None and running_mean.shape[0] > 0:
            running_mean[c] = ((1.0 - factor) * np.float64(running_mean[c])
                               + factor * mean)
            running_var[c] = ((1.0 - factor) * np.float64(running_var[c])
                              + factor * var * count / (count - 1))


@register_jitable
def running_invstd(running_var, c, eps):
    """``1 / sqrt(running_var[c] + eps)`` in float64."""
    return 1.0 / math.sqrt(np.float64(running_var[c]) + eps)


@register_jitable
def finish_running_stats(channels, running_mean, running_var, weight, bias,
                         eps, save_mean, save_invstd, scale, offset):
    """Normalization coefficients of each channel from the running statistics."""
    for c in channels:
        mean = np.float64(running_mean[c])
        invstd = running_invstd(running_var, c, eps)
        save_mean[c] = mean
        save_invstd[c] = invstd
        affine(c, mean, invstd, weight, bias, scale, offset)


@register_jitable
def parameter_gradients(c, sum_dy, sum_dy_xmu, invstd, grad_weight,
                        grad_bias):
    """``grad_weight[c] = sum(dy * x_hat)`` and ``grad_bias[c] = sum(dy)``,
    where each exists."""
    if grad_weight is not None and grad_weight.shape[0] > 0:
        grad_weight[c] = sum_dy_xmu * invstd
    if grad_bias is not None and grad_bias.shape[0] > 0:
        grad_bias[c] = sum_dy


@register_jitable
def finish_backward(channels, psum_dy, psum_dy_xmu, count, save_invstd, weight,
                    batch_stats, grad_weight, grad_bias, scale, offset, gain):
    """Parameter gradients and the coefficients of ``dx``, per channel.

    ``dx = (x - mean) * scale + offset + gain * dy`` with ``gain = w * invstd``.
    With batch statistics the gradient also flows through the mean and the
    variance: ``offset = -gain * sum(dy) / n`` and
    ``scale = -gain * invstd**2 * sum(dy * (x - mean)) / n``; with running
    (constant) statistics both are 0.
    """
    for c in channels:
        sum_dy, sum_dy_xmu = merged_sums(psum_dy, psum_dy_xmu, c)
        invstd = np.float64(save_invstd[c])
        parameter_gradients(c, sum_dy, sum_dy_xmu, invstd, grad_weight,
                            grad_bias)
        g, _ = affine_coefficients(c, invstd, weight, None)
        gain[c] = g
        if batch_stats:
            scale[c] = -g * invstd * invstd * sum_dy_xmu / count
            offset[c] = -g * sum_dy / count
        else:
            scale[c] = 0.0
            offset[c] = 0.0
