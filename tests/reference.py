"""Plain float64 NumPy batch norm: the oracle every fast path is compared with.

Written for clarity, not speed: two-pass statistics over all axes but 1,
textbook gradients. Inputs of any dtype are promoted to float64 first.
"""
import numpy as np


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, x):
    """Broadcast a (C,) vector against x of shape (N, C, ...)."""
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))


def batch_stats(x):
    """Per-channel mean and biased variance (two passes, float64)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=_axes(x))
    var = ((x - _per_channel(mean, x)) ** 2).mean(axis=_axes(x))
    return mean, var


def forward(x, mean, var, weight=None, bias=None, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, in float64."""
    x = np.asarray(x, np.float64)
    y = (x - _per_channel(mean, x)) / np.sqrt(_per_channel(var, x) + eps)
    if weight is not None:
        y = y * _per_channel(weight, x)
    if bias is not None:
        y = y + _per_channel(bias, x)
    return y


def running_update(running_mean, running_var, x, momentum):
    """PyTorch's update: the unbiased batch variance enters running_var."""
    mean, var = batch_stats(x)
    n = x.size // x.shape[1]
    new_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
    new_var = ((1 - momentum) * np.asarray(running_var, np.float64)
               + momentum * var * n / (n - 1))
    return new_mean, new_var


def backward_batch_stats(dy, x, weight=None, eps=1e-5):
    """dx, dweight, dbias of a forward that used the batch statistics.

    Spelled out term by term: the direct path, the path through the mean and
    the path through the variance.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    axes = _axes(x)
    n = x.size // x.shape[1]
    mean, var = batch_stats(x)
    xmu = x - _per_channel(mean, x)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = xmu * _per_channel(invstd, x)
    w = np.ones(x.shape[1]) if weight is None else np.asarray(weight, np.float64)
    dxhat = dy * _per_channel(w, x)
    dvar = (dxhat * xmu).sum(axis=axes) * -0.5 * invstd ** 3
    dmean = -(dxhat * _per_channel(invstd, x)).sum(axis=axes) \
        + dvar * -2.0 * xmu.sum(axis=axes) / n
    dx = (dxhat * _per_channel(invstd, x)
          + _per_channel(dvar, x) * 2.0 * xmu / n
          + _per_channel(dmean, x) / n)
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def backward_running_stats(dy, x, running_mean, running_var, weight=None,
                           eps=1e-5):
    """dx, dweight, dbias of a forward that used constant (running) statistics."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    invstd = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
    xhat = (x - _per_channel(running_mean, x)) * _per_channel(invstd, x)
    w = np.ones(x.shape[1]) if weight is None else np.asarray(weight, np.float64)
    dx = dy * _per_channel(w * invstd, x)
    return dx, (dy * xhat).sum(axis=_axes(x)), dy.sum(axis=_axes(x))
