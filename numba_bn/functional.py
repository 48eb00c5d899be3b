"""Functional batch norm: ``torch.nn.functional.batch_norm``'s signature.

Each public function validates its arguments, picks the backend from the
input's array type (``_dispatch``) and runs it. The modules share
:func:`normalize` and :func:`gradients`, the validated cores.
"""
import numpy as np

from . import _validation as check
from ._dispatch import backend_for

__all__ = ["batch_norm", "batch_norm_forward_training", "batch_norm_backward",
           "fold_batch_norm_params"]


def normalize(backend, x, weight, bias, eps, batch_stats, running_mean,
              running_var, num_batches_tracked=None, momentum=0.0,
              cumulative=False, out=None, moments=None, residual=None,
              relu=False):
    """Validated forward: batch or running statistics, on ``backend``.

    Running buffers given with ``batch_stats`` are updated; without
    ``batch_stats`` they normalize. An empty batch returns an empty output
    and changes nothing, unless it is part of a larger one whose
    ``moments`` are given (``cpu.forward_batch_stats``). ``residual`` and
    ``relu``: the fused add and ReLU after the normalization.

    Returns
    -------
    y : array
    save_mean, save_invstd : array or None
        float64 statistics that normalized (None for an empty batch).
    """
    if x.size == 0 and moments is None:
        return (backend.empty_like(x) if out is None else out), None, None
    if batch_stats:
        return backend.forward_batch_stats(
            x, weight, bias, float(eps), running_mean, running_var,
            num_batches_tracked, float(momentum), bool(cumulative), out,
            moments, residual, relu)
    return backend.forward_running_stats(x, weight, bias, float(eps),
                                         running_mean, running_var, out,
                                         residual, relu)


def gradients(backend, dy, x, weight, save_mean, save_invstd, batch_stats,
              grad_dtype, out=None, sums=None, x_check=None, y=None):
    """Validated backward on ``backend``; see ``cpu.backward``.

    For an empty batch ``dx`` is empty and the parameter gradients are zeros.

    Returns
    -------
    dx, grad_weight, grad_bias, grad_output
    """
    if x.size == 0:
        grads = (None, None) if grad_dtype is None else tuple(
            backend.from_host(np.zeros(x.shape[1], grad_dtype))
            for _ in range(2))
        return (backend.empty_like(x) if out is None else out,) + grads + (
            dy,)
    return backend.backward(dy, x, weight, save_mean, save_invstd,
                            batch_stats, grad_dtype, out, sums, x_check, y)


def batch_norm(x, running_mean, running_var, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, out=None,
               activation=None, residual=None):
    r"""Batch normalization, as ``torch.nn.functional.batch_norm``.

    .. math:: y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta

    per channel (axis 1). In training mode :math:`\mu, \sigma^2` are the
    batch mean and biased variance over all other axes, and the running
    buffers, when given, are updated in place with
    ``running = (1 - momentum) * running + momentum * batch`` (the unbiased
    variance for ``running_var``). Otherwise the running buffers normalize.

    Parameters
    ----------
    x : array
        ``(N, C, ...)`` float16, float32 or float64; a NumPy array runs on
        the CPU, a CuPy or other CUDA array on the GPU.
    running_mean, running_var : array or None
        ``(C,)`` buffers on the input's device; required unless
        ``training``.
    weight, bias : array, optional
        ``(C,)`` affine parameters :math:`\gamma, \beta`.
    training : bool, optional
        Normalize with batch statistics (and update the running buffers).
    momentum : float, optional
        Weight of the batch in the running averages (not range-checked).
    eps : float, optional
        Added to the variance before the square root.
    out : array, optional
        Keyword only. Array of ``x``'s shape, dtype and device to write
        ``y`` into (no allocation per call); must not overlap ``x``; may be
        ``residual`` itself.
    activation : {None, "relu"}, optional
        Keyword only. Applied last, in the same pass.
    residual : array, optional
        Keyword only. Added before the activation, in the same pass:
        ``y = relu(bn(x) + residual)``; ``x``'s shape, dtype and device,
        any layout.

    Returns
    -------
    array
        ``y`` (``out`` when given), same shape, dtype, device and memory
        order as ``x``.

    Raises
    ------
    TypeError
        Non-float input, or parameters of another dtype.
    ValueError
        Buffers or parameters of the wrong length or device, eval without
        running buffers, or one value per channel in training.

    Examples
    --------
    >>> import numpy as np, numba_bn as nbn
    >>> x = np.arange(8, dtype=np.float32).reshape(4, 2)
    >>> rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    >>> nbn.batch_norm(x, rm, rv, training=True, momentum=0.5).round(3)
    array([[-1.342, -1.342],
           [-0.447, -0.447],
           [ 0.447,  0.447],
           [ 1.342,  1.342]], dtype=float32)
    >>> rm, rv
    (array([1.5, 2. ], dtype=float32), array([3.8333333, 3.8333333], dtype=float32))
    """
    backend, x = backend_for(x)
    check.check_float_input(x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(
            "running_mean and running_var are required when training=False")
    _check_vectors(backend, x, running_mean=running_mean,
                   running_var=running_var, weight=weight, bias=bias)
    if training:
        check.check_values_per_channel(x)
    relu = check.check_activation(activation)
    residual = check_residual(residual, x, backend)
    out = check_output(out, x, [x], backend, residual)
    y, _, _ = normalize(backend, x, weight, bias, eps, training, running_mean,
                        running_var, None, momentum, out=out,
                        residual=residual, relu=relu)
    return y


def batch_norm_forward_training(x, weight, bias, eps=1e-5, *, out=None,
                                activation=None, residual=None):
    """Training forward that returns what the backward needs.

    Parameters
    ----------
    x : array
        ``(N, C, ...)`` input, at least 2 values per channel.
    weight, bias : array or None
        ``(C,)`` affine parameters.
    eps : float, optional
    out : array, optional
        Keyword only. Where to write ``y``, as in :func:`batch_norm`.
    activation, residual : optional
        Keyword only. As in :func:`batch_norm`; pass the same to
        :func:`batch_norm_backward` (with ``y``).

    Returns
    -------
    y : array
    save_mean, save_invstd : array
        float64 ``(C,)`` batch mean and ``1 / sqrt(var + eps)`` (biased
        variance), for :func:`batch_norm_backward`. For an empty batch both
        are None.

    Raises
    ------
    TypeError, ValueError
        As :func:`batch_norm`.

    Examples
    --------
    >>> import numpy as np, numba_bn as nbn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, mean, invstd = nbn.batch_norm_forward_training(x, None, None)
    >>> y.round(4), mean, invstd.round(4)
    (array([[-1., -1.],
           [ 1.,  1.]]), array([ 2., 20.]), array([1. , 0.1]))
    """
    backend, x = backend_for(x)
    check.check_float_input(x)
    _check_vectors(backend, x, weight=weight, bias=bias)
    check.check_values_per_channel(x)
    relu = check.check_activation(activation)
    residual = check_residual(residual, x, backend)
    out = check_output(out, x, [x], backend, residual)
    return normalize(backend, x, weight, bias, eps, True, None, None, out=out,
                     residual=residual, relu=relu)


def batch_norm_backward(dy, x, weight, save_mean, save_invstd, *, out=None,
                        activation=None, y=None, residual=False):
    r"""Gradients of :func:`batch_norm_forward_training`.

    With :math:`\hat x = (x - \mu) \cdot invstd` and :math:`n` values per
    channel:

    .. math::

        \frac{\partial L}{\partial x} = \gamma \cdot invstd \left(dy
        - \frac{1}{n}\sum dy - \hat x \frac{1}{n} \sum dy \, \hat x\right),
        \quad \frac{\partial L}{\partial \gamma} = \sum dy \, \hat x,
        \quad \frac{\partial L}{\partial \beta} = \sum dy

    Parameters
    ----------
    dy : array
        Gradient of the output, shape and dtype of ``x``.
    x : array
        The forward's input.
    weight : array or None
        ``(C,)`` :math:`\gamma` of the forward.
    save_mean, save_invstd : array
        ``(C,)`` statistics returned by the forward.
    out : array, optional
        Keyword only. Where to write ``dx``; must not overlap ``dy``, ``x``
        or ``y``.
    activation : {None, "relu"}, optional
        Keyword only. The forward's activation: ``dy`` is then the gradient
        of its output ``y`` and goes through the ReLU first (0 where ``y``
        is 0, as in PyTorch).
    y : array, optional
        Keyword only. The forward's output; required with ``activation``.
    residual : bool, optional
        Keyword only. Whether the forward added a residual: its gradient
        is returned too.

    Returns
    -------
    dx : array
    dweight, dbias : array or None
        In ``weight``'s dtype; None when ``weight`` is None.
    d_residual : array
        Only with ``residual=True``: the gradient at the residual, ``dy``
        through the activation (``dy`` itself without one).

    Raises
    ------
    TypeError, ValueError
        Mismatched shapes, dtypes or devices; ``activation`` without ``y``.

    Examples
    --------
    >>> import numpy as np, numba_bn as nbn
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, invstd = nbn.batch_norm_forward_training(x, np.ones(1), None)
    >>> dx, dw, db = nbn.batch_norm_backward(np.array([[1.0], [0.0]]), x,
    ...                                      np.ones(1), mean, invstd)
    >>> bool(abs(dx).max() < 1e-5), dw.round(4), db
    (True, array([-1.]), array([1.]))
    """
    backend, x = backend_for(x)
    check.check_float_input(x)
    dy = check_gradient(dy, x, backend)
    for name, a in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        if a is None:
            raise ValueError(f"{name} is required")
        check.check_device(a, backend.DEVICE, name)
        if tuple(a.shape) != (x.shape[1],):
            raise ValueError(f"{name} must have shape ({x.shape[1]},), got "
                             f"{tuple(a.shape)}")
    _check_vectors(backend, x, weight=weight)
    if check.check_activation(activation):
        if y is None:
            raise ValueError(
                f"activation={activation!r} needs y=, the forward's output "
                "(the ReLU's gradient is 0 where it is 0)")
        y = check_gradient(y, x, backend, "y")
    else:
        y = None
    out = check_output(out, dy, [dy, x] + ([] if y is None else [y]),
                       backend)
    grad_dtype = None if weight is None else weight.dtype
    dx, dweight, dbias, d_residual = gradients(
        backend, dy, x, weight, save_mean, save_invstd, True, grad_dtype, out,
        y=y)
    if residual:
        return dx, dweight, dbias, d_residual
    return dx, dweight, dbias


def check_gradient(dy, x, backend, name="dy"):
    """``dy`` (or another array named ``name``) as ``backend`` reads it,
    checked against the forward input ``x``."""
    check.check_device(dy, backend.DEVICE, name)
    dy = backend_for(dy)[1]
    check.check_same_as_input(dy, x, name)
    return dy


def check_residual(residual, x, backend):
    """A fused forward's ``residual`` as ``backend`` reads it (None passes)."""
    if residual is None:
        return None
    return check_gradient(residual, x, backend, "residual")


def check_output(out, like, inputs, backend, residual=None):
    """``out=`` as ``backend`` reads it, checked against ``like`` (None
    passes): it overlaps none of ``inputs``, and ``residual`` only as that
    very array, element for element."""
    if out is None:
        return None
    # Read as the backend reads it before its dtype is compared: a PyTorch
    # CUDA tensor's dtype is no NumPy dtype.
    check.check_device(out, backend.DEVICE, "out")
    out = backend_for(out)[1]
    if residual is not None and not check.same_elements(out, residual):
        inputs = [*inputs, residual]
    check.check_out(out, like, inputs, backend)
    return out


def _check_vectors(backend, x, **vectors):
    for name, a in vectors.items():
        check.check_vector(a, name, x.shape[1], backend.DEVICE, x.dtype)


def fold_batch_norm_params(weight, bias, running_mean, running_var,
                           bn_weight, bn_bias, eps=1e-5):
    r"""Fold an eval-mode batch norm into the conv or linear layer before it.

    With :math:`s = \gamma / \sqrt{\sigma^2_{run} + \epsilon}` per output
    channel, ``weight' = weight * s`` along axis 0 and
    ``bias' = (bias - running_mean) * s + beta``, so that the layer with
    the folded parameters computes the batch norm of its old output in
    eval mode (inference: one pass fewer over the activations).
    ``torch.nn.utils.fusion.fuse_conv_bn_weights`` computes the same.

    Parameters
    ----------
    weight : array
        ``(C_out, ...)``: PyTorch's layout of a conv (``(C_out, C_in, kH,
        kW)``) or linear (``(C_out, C_in)``) weight, float16, float32 or
        float64.
    bias : array or None
        ``(C_out,)`` bias of the layer; None for a layer without one.
    running_mean, running_var : array
        ``(C_out,)`` running statistics of the batch norm.
    bn_weight, bn_bias : array or None
        ``(C_out,)`` :math:`\gamma, \beta`; None for ones and zeros.
    eps : float, optional
        The batch norm's ``eps``.

    Returns
    -------
    weight, bias : array
        New arrays in ``weight``'s dtype and on its device, computed in
        float64; the bias also when ``bias`` was None.

    Raises
    ------
    TypeError
        Non-float weight.
    ValueError
        Vectors of another length than ``weight.shape[0]``, or on another
        device.

    Examples
    --------
    >>> import numpy as np, numba_bn as nbn
    >>> w = np.ones((2, 3), np.float32)            # a linear layer, 3 -> 2
    >>> w2, b2 = nbn.fold_batch_norm_params(w, None, np.array([1.0, 2.0]),
    ...                                     np.array([4.0, 1.0]), None, None,
    ...                                     eps=0.0)
    >>> w2, b2
    (array([[0.5, 0.5, 0.5],
           [1. , 1. , 1. ]], dtype=float32), array([-0.5, -2. ], dtype=float32))
    """
    backend, weight = backend_for(weight)
    check.check_float_input(weight, "weight")
    vectors = {"bias": bias, "running_mean": running_mean,
               "running_var": running_var, "bn_weight": bn_weight,
               "bn_bias": bn_bias}
    for name, a in vectors.items():
        if a is None and name in ("running_mean", "running_var"):
            raise ValueError(f"{name} is required: folding uses the running "
                             "statistics")
        # Any dtype: the arithmetic is float64.
        check.check_vector(a, name, weight.shape[0], backend.DEVICE,
                           None if a is None else a.dtype)
    host = {name: None if a is None else backend.to_host(a).astype(np.float64)
            for name, a in vectors.items()}
    scale = 1.0 / np.sqrt(host["running_var"] + float(eps))
    if host["bn_weight"] is not None:
        scale = scale * host["bn_weight"]
    folded_bias = -host["running_mean"] * scale
    if host["bias"] is not None:
        folded_bias += host["bias"] * scale
    if host["bn_bias"] is not None:
        folded_bias += host["bn_bias"]
    per_row = scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    folded_weight = backend.to_host(weight).astype(np.float64) * per_row
    with np.errstate(over="ignore"):
        return (backend.from_host(folded_weight.astype(weight.dtype)),
                backend.from_host(folded_bias.astype(weight.dtype)))
