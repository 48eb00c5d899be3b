"""``BatchNorm1d/2d/3d``: PyTorch's batch-norm modules, plus MegEngine's ``freeze``."""
import numpy as np

from . import _validation as check
from ._dispatch import backend_for, backend_named
from .functional import (check_gradient, check_output, check_residual,
                         fold_batch_norm_params, gradients, normalize)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "fold_batch_norm"]

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var",
               "num_batches_tracked")


class _BatchNorm:
    r"""Batch normalization over the channel axis (axis 1).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}
              \gamma + \beta

    The mean and variance are taken per channel over every other axis. In
    training mode they are the batch's own (biased variance) and the running
    statistics are updated with the unbiased variance; in eval mode the
    running statistics normalize.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels: one mean, variance, :math:`\gamma`
        and :math:`\beta` per channel.
    eps : float, optional
        Added to the variance before the square root; must be positive.
    momentum : float or None, optional
        ``running = (1 - momentum) * running + momentum * batch``; None
        gives the cumulative average (``momentum = 1 / num_batches_tracked``).
    affine : bool, optional
        Learnable :math:`\gamma` (``weight``, ones) and :math:`\beta`
        (``bias``, zeros).
    track_running_stats : bool, optional
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and
        ``num_batches_tracked``; without them batch statistics normalize in
        eval mode too.
    bias : bool, optional
        Keyword only. With ``affine``, ``bias=False`` keeps :math:`\gamma`
        and drops :math:`\beta`.
    freeze : bool, optional
        Keyword only (from MegEngine). Normalize with the running statistics
        and never update them, even in training mode; :math:`\gamma,\beta`
        get no gradient.
    device : {"cpu", "cuda"}, optional
        Where the parameters and buffers live.
    dtype : str or numpy.dtype, optional
        dtype of the parameters and buffers: float16, float32 or float64.
    activation : {None, "relu"}, optional
        Keyword only. Applied to the output in the same pass (and its
        gradient in the backward's); not state (``state_dict`` leaves it
        out).

    Attributes
    ----------
    weight, bias : array or None
        :math:`\gamma` and :math:`\beta`, shape ``(C,)``.
    running_mean, running_var : array or None
        Running statistics, shape ``(C,)``.
    num_batches_tracked : array or None
        0-d int64 count of training batches.
    grad_weight, grad_bias : array or None
        Gradients of the last :meth:`backward` (None before one, and for
        frozen or missing parameters).
    training : bool
        Mode set by :meth:`train`/:meth:`eval`.

    Raises
    ------
    ValueError
        ``num_features <= 0``, ``eps <= 0``, ``momentum`` outside [0, 1],
        ``freeze`` without ``track_running_stats``, or an unknown device.
    TypeError
        A non-integer ``num_features`` or a non-float ``dtype``.
    """

    _input_ndims = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, bias=True, freeze=False,
                 device="cpu", dtype="float32", activation=None):
        self.dtype = check.check_construction(
            num_features, eps, momentum, track_running_stats, freeze, dtype)
        check.check_activation(activation)
        self.activation = activation
        self._backend = backend_named(device)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.freeze = bool(freeze)
        self.training = True
        self.weight = self._fill(1.0) if self.affine else None
        self.bias = self._fill(0.0) if self.affine and bias else None
        if self.track_running_stats:
            self.running_mean = self._fill(0.0)
            self.running_var = self._fill(1.0)
            self.num_batches_tracked = self._backend.from_host(
                np.zeros((), np.int64))
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None
        self.grad_weight = self.grad_bias = None
        self._saved = None

    @property
    def device(self):
        """``"cpu"`` or ``"cuda"``: where parameters and buffers live.

        Examples
        --------
        >>> import numba_bn as nbn
        >>> nbn.BatchNorm1d(3).device
        'cpu'
        """
        return self._backend.DEVICE

    def _fill(self, value):
        return self._backend.from_host(
            np.full(self.num_features, value, self.dtype))

    def _running_average(self):
        """``(momentum, cumulative)`` in PyTorch's convention for the kernels."""
        if self.momentum is None:
            return 0.0, True
        return self.momentum, False

    def _has_parameters(self):
        return self.weight is not None or self.running_mean is not None

    # ------------------------------------------------------------------
    # forward and backward

    def __call__(self, x, *, residual=None, out=None):
        return self.forward(x, residual=residual, out=out)

    def forward(self, x, *, residual=None, out=None):
        """Normalize ``x``, then add ``residual`` and apply the module's
        ``activation``, each where given, in the same pass:
        ``activation(BN(x) + residual)``.

        Training mode (and not frozen), or without running statistics: batch
        mean and biased variance normalize; in training mode the running
        statistics are updated with the unbiased variance and
        ``num_batches_tracked`` grows by one. Otherwise the running
        statistics normalize.

        Parameters
        ----------
        x : array
            Input of this module's rank, ``C = num_features``; a NumPy array
            on a CPU module, a CuPy or other CUDA array on a CUDA module.
        residual : array, optional
            Keyword only. Added to the normalized ``x`` before the
            activation; ``x``'s shape, dtype and device, any layout. Then
            :meth:`backward` returns its gradient too.
        out : array, optional
            Keyword only. Array of ``x``'s shape, dtype and device to write
            the output into, so that training loops allocate nothing per
            call; must not overlap ``x``; may be ``residual`` itself (a
            residual block writing the sum in place).

        Returns
        -------
        array
            ``out`` when given; same shape, dtype, device and memory order
            as ``x``.

        Raises
        ------
        TypeError
            Non-float input, or input dtype other than the parameters'
            (float16 input may meet float32 parameters).
        ValueError
            Wrong rank or channel count, input on the other device, or one
            value per channel where batch statistics are used.

        Examples
        --------
        >>> import numpy as np, numba_bn as nbn
        >>> bn = nbn.BatchNorm1d(2)
        >>> y = bn(np.array([[1.0, 2.0], [3.0, 6.0]], dtype=np.float32))
        >>> y
        array([[-0.999995  , -0.99999875],
               [ 0.999995  ,  0.99999875]], dtype=float32)
        >>> bn.running_mean, bn.running_var, bn.num_batches_tracked
        (array([0.2, 0.4], dtype=float32), array([1.1, 1.7], dtype=float32), array(1))
        """
        backend, x = backend_for(x)
        self._check_input(x, backend)
        if self._uses_batch_stats():
            check.check_values_per_channel(x)
        residual = check_residual(residual, x, backend)
        out = check_output(out, x, [x], backend, residual)
        return self._normalize(backend, x, out, residual=residual)

    def _uses_batch_stats(self):
        """Whether a forward now normalizes with the batch's statistics."""
        return ((self.training and not self.freeze)
                or not self.track_running_stats)

    def _normalize(self, backend, x, out, moments=None, x_check=None,
                   residual=None):
        """The validated forward; saves what :meth:`backward` needs.

        ``moments``: the statistics of a larger batch ``x`` belongs to
        (``cpu.forward_batch_stats``), and ``x_check`` then ``x``'s own
        sums of ``x - mean`` (``cpu.backward``); without ``moments`` they
        are zeros, as ``mean`` is ``x``'s own. ``residual``: added before
        the activation.
        """
        batch_stats = self._uses_batch_stats()
        update = batch_stats and self.track_running_stats
        momentum, cumulative = self._running_average()
        y, save_mean, save_invstd = normalize(
            backend, x, self.weight, self.bias, self.eps, batch_stats,
            self.running_mean if update or not batch_stats else None,
            self.running_var if update or not batch_stats else None,
            self.num_batches_tracked if update else None, momentum,
            cumulative, out, moments, residual, self.activation == "relu")
        if batch_stats and moments is None:
            x_check = np.zeros(self.num_features)
        # The ReLU's backward reads its output: overwriting y (or x) before
        # backward is the caller's error, as in PyTorch.
        self._saved = (x, save_mean, save_invstd, batch_stats, x_check,
                       y if self.activation == "relu" else None,
                       residual is not None)
        return y

    def backward(self, dy, *, out=None):
        """Gradient of the last forward with respect to its input.

        Sets ``grad_weight`` (:math:`\\sum dy\\,\\hat x`) and ``grad_bias``
        (:math:`\\sum dy`) where those parameters exist and are not frozen.

        Parameters
        ----------
        dy : array
            Gradient of the last forward's output: same shape, dtype and
            device.
        out : array, optional
            Keyword only. Where to write ``dx``; must not overlap ``dy`` or
            the forward's input.

        Returns
        -------
        array
            ``dx``. After a forward with batch statistics this is the full
            gradient through the mean and variance; after one with running
            statistics ``dx = dy * weight / sqrt(running_var + eps)``. With
            an activation ``dy`` first goes through it (0 where the output
            is 0, as PyTorch's ReLU).
        tuple of array
            ``(dx, d_residual)`` instead when the forward took a
            ``residual``: ``d_residual`` is ``dy`` through the activation,
            or ``dy`` itself without one.

        Raises
        ------
        RuntimeError
            No forward has run, or (CPU) the forward normalized with batch
            statistics and its input was changed in place since: the
            gradient would be wrong. ``grad_weight`` and ``grad_bias`` keep
            their values.
        ValueError, TypeError
            ``dy`` of another shape, device or dtype.

        Examples
        --------
        >>> import numpy as np, numba_bn as nbn
        >>> bn = nbn.BatchNorm1d(1, dtype="float64")
        >>> y = bn(np.array([[1.0], [3.0]]))
        >>> bn.backward(np.array([[1.0], [1.0]])).round(6), bn.grad_bias
        (array([[0.],
               [0.]]), array([2.]))
        """
        if self._saved is None:
            raise RuntimeError("backward() called before any forward()")
        x, save_mean, save_invstd, batch_stats, x_check, y, residual = (
            self._saved)
        dy = check_gradient(dy, x, self._backend)
        out = check_output(out, dy, [dy, x] + ([] if y is None else [y]),
                           self._backend)
        wants_grads = self.weight is not None and not self.freeze
        dx, grad_weight, grad_bias, d_residual = gradients(
            self._backend, dy, x, self.weight, save_mean, save_invstd,
            batch_stats, self.dtype if wants_grads else None, out,
            x_check=x_check, y=y)
        self.grad_weight = grad_weight
        self.grad_bias = grad_bias if self.bias is not None else None
        return (dx, d_residual) if residual else dx

    def _check_input(self, x, backend):
        check.check_float_input(x, ndims=self._input_ndims)
        check.check_channels(x, self.num_features)
        if backend.DEVICE != self.device:
            raise ValueError(
                f"input is on {backend.DEVICE} but the module's parameters "
                f"are on {self.device}: move the module with "
                f".to({backend.DEVICE!r}) (nothing is moved implicitly)")
        if self._has_parameters():
            check.check_dtype_match(x.dtype, self.dtype, "parameter")

    # ------------------------------------------------------------------
    # modes, resets, state

    def train(self, mode=True):
        """Set training mode (``mode=True``) or eval mode.

        Parameters
        ----------
        mode : bool, optional
            True for training mode (batch statistics, running statistics
            updated), False for eval mode (running statistics normalize).

        Returns
        -------
        module
            The module itself, so that calls chain.

        Examples
        --------
        >>> import numba_bn as nbn
        >>> bn = nbn.BatchNorm2d(4)
        >>> bn.train(False).training, bn.train().training
        (False, True)
        """
        self.training = bool(mode)
        return self

    def eval(self):
        """Set eval mode, the same as ``train(False)``.

        Returns
        -------
        module
            ``self``, now normalizing with the running statistics.

        Examples
        --------
        >>> import numpy as np, numba_bn as nbn
        >>> bn = nbn.BatchNorm1d(2).eval()
        >>> bn(np.ones((1, 2), np.float32))      # one sample: fine in eval
        array([[0.999995, 0.999995]], dtype=float32)
        """
        return self.train(False)

    def reset_running_stats(self):
        """Running mean to 0, running variance to 1, ``num_batches_tracked`` to 0.

        The arrays are overwritten in place (references to them stay valid);
        a module without running statistics is left as it is.

        Examples
        --------
        >>> import numpy as np, numba_bn as nbn
        >>> bn = nbn.BatchNorm1d(1)
        >>> _ = bn(np.array([[1.0], [3.0]], np.float32))
        >>> bn.reset_running_stats()
        >>> bn.running_mean, bn.running_var, bn.num_batches_tracked
        (array([0.], dtype=float32), array([1.], dtype=float32), array(0))
        """
        if self.track_running_stats:
            self._assign("running_mean", np.zeros(self.num_features))
            self._assign("running_var", np.ones(self.num_features))
            self._assign("num_batches_tracked", np.zeros(()))

    def reset_parameters(self):
        """:meth:`reset_running_stats`, then ``weight`` to 1 and ``bias`` to 0.

        Examples
        --------
        >>> import numba_bn as nbn
        >>> bn = nbn.BatchNorm1d(2)
        >>> bn.weight[:] = 3
        >>> bn.reset_parameters()
        >>> bn.weight
        array([1., 1.], dtype=float32)
        """
        self.reset_running_stats()
        if self.weight is not None:
            self._assign("weight", np.ones(self.num_features))
        if self.bias is not None:
            self._assign("bias", np.zeros(self.num_features))

    def _assign(self, name, values):
        """Overwrite ``name`` in place (references users hold stay valid)."""
        target = getattr(self, name)
        self._backend.copy_from_host(target,
                                     np.asarray(values, dtype=target.dtype))

    def state_dict(self):
        """Parameters and buffers as NumPy copies, PyTorch's keys.

        Returns
        -------
        dict
            ``weight``, ``bias``, ``running_mean``, ``running_var``,
            ``num_batches_tracked``; entries that are None are left out.

        Examples
        --------
        >>> import numba_bn as nbn
        >>> sorted(nbn.BatchNorm2d(3, affine=False).state_dict())
        ['num_batches_tracked', 'running_mean', 'running_var']
        """
        return {key: np.array(self._backend.to_host(getattr(self, key)))
                for key in _STATE_KEYS if getattr(self, key) is not None}

    def load_state_dict(self, state_dict, strict=True):
        """Load parameters and buffers, all or nothing.

        Parameters
        ----------
        state_dict : mapping
            As :meth:`state_dict` returns, or a PyTorch module's
            ``state_dict()``: any values ``numpy.asarray`` reads. A missing
            ``num_batches_tracked`` (old checkpoints) keeps the current count.
        strict : bool, optional
            Raise on missing or unexpected keys.

        Raises
        ------
        ValueError
            A value of the wrong shape, or (``strict``) missing or unexpected
            keys. Nothing was changed then.

        Examples
        --------
        >>> import numpy as np, numba_bn as nbn
        >>> bn = nbn.BatchNorm1d(2)
        >>> bn.load_state_dict({"weight": [2, 2], "bias": [0, 1],
        ...                     "running_mean": [0, 0], "running_var": [1, 1]})
        >>> bn.weight
        array([2., 2.], dtype=float32)
        """
        present = [key for key in _STATE_KEYS if getattr(self, key) is not None]
        if strict:
            missing = [key for key in present if key not in state_dict
                       and key != "num_batches_tracked"]
            unexpected = [key for key in state_dict if key not in present]
            if missing or unexpected:
                raise ValueError(
                    f"state_dict does not match {type(self).__name__}: "
                    f"missing keys {missing}, unexpected keys {unexpected}")
        loaded = {}
        for key in present:
            if key not in state_dict:
                continue
            value = np.asarray(state_dict[key])
            expected = (() if key == "num_batches_tracked"
                        else (self.num_features,))
            if value.shape != expected:
                raise ValueError(
                    f"{key} must have shape {expected}, got {value.shape}")
            loaded[key] = value
        for key, value in loaded.items():
            self._assign(key, value)

    def to(self, device):
        """Move parameters, buffers and gradients to ``device``.

        The saved forward is dropped, so :meth:`backward` needs a new
        forward on the new device.

        Parameters
        ----------
        device : {"cpu", "cuda"}
            The target device.

        Returns
        -------
        module
            The module itself.

        Raises
        ------
        ValueError
            An unknown device name.

        Examples
        --------
        >>> import numba_bn as nbn
        >>> nbn.BatchNorm2d(4).to("cpu").device
        'cpu'
        """
        target = backend_named(device)
        if target is not self._backend:
            for key in _STATE_KEYS + ("grad_weight", "grad_bias"):
                value = getattr(self, key)
                if value is not None:
                    setattr(self, key,
                            target.from_host(self._backend.to_host(value)))
            self._backend = target
            self._saved = None
        return self

    def extra_repr(self):
        """The arguments part of ``repr(module)``, as in PyTorch.

        Returns
        -------
        str
            ``"C, eps=..., momentum=..., affine=..., bias=...,
            track_running_stats=..."`` (and ``freeze=True`` when frozen),
            then the parameters' ``dtype`` and ``device``.

        Examples
        --------
        >>> import numba_bn as nbn
        >>> nbn.BatchNorm2d(8, momentum=None).extra_repr()
        "8, eps=1e-05, momentum=None, affine=True, bias=True, track_running_stats=True, dtype=float32, device='cpu'"
        """
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
                f", affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}"
                + (", freeze=True" if self.freeze else "")
                + (f", activation={self.activation!r}" if self.activation
                   else "")
                + f", dtype={self.dtype}, device={self.device!r}")

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


def _documented(inputs, example):
    """The shared class docstring, for one input rank, with its own example."""
    return (_BatchNorm.__doc__.replace("over the channel axis (axis 1)",
                                       f"of {inputs} input over axis 1", 1)
            + "\n    Examples\n    --------\n" + example)


class BatchNorm1d(_BatchNorm):
    __doc__ = _documented("``(N, C)`` or ``(N, C, L)``", """\
    >>> import numpy as np, numba_bn as nbn
    >>> bn = nbn.BatchNorm1d(3)
    >>> bn(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)).shape
    (8, 3)
    """)
    _input_ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    __doc__ = _documented("``(N, C, H, W)``", """\
    >>> import numpy as np, numba_bn as nbn
    >>> bn = nbn.BatchNorm2d(3)
    >>> x = np.random.default_rng(0).normal(5, 2, size=(4, 3, 8, 8))
    >>> y = bn(x.astype(np.float32))
    >>> float(abs(y.mean())) < 1e-6, bn.running_mean.round(1)
    (True, array([0.5, 0.5, 0.5], dtype=float32))
    """)
    _input_ndims = (4,)


class BatchNorm3d(_BatchNorm):
    __doc__ = _documented("``(N, C, D, H, W)``", """\
    >>> import numpy as np, numba_bn as nbn
    >>> bn = nbn.BatchNorm3d(2).eval()
    >>> bn(np.ones((1, 2, 2, 2, 2), np.float32)).max()
    np.float32(0.999995)
    """)
    _input_ndims = (5,)


def fold_batch_norm(weight, bias, bn):
    """Fold batch norm ``bn`` into the conv or linear layer before it, for
    inference.

    Returns the parameters of a layer that computes ``bn(layer(x))`` as
    ``bn`` computes it in eval mode, from its running statistics, in one
    layer: :func:`numba_bn.fold_batch_norm_params` with ``bn``'s buffers,
    parameters and ``eps``. ``bn`` itself is not changed, whatever its mode.

    Parameters
    ----------
    weight : array
        ``(C_out, ...)`` weight of the layer, output channels on axis 0
        (PyTorch's conv and linear layout), on ``bn``'s device.
    bias : array or None
        ``(C_out,)`` bias of the layer, or None.
    bn : numba_bn.BatchNorm1d, BatchNorm2d, BatchNorm3d or SyncBatchNorm
        With ``num_features == C_out`` and running statistics.

    Returns
    -------
    weight, bias : array
        In ``weight``'s dtype, computed in float64.

    Raises
    ------
    ValueError
        ``bn`` keeps no running statistics (``track_running_stats=False``
        normalizes every batch with its own), or the shapes differ.

    Examples
    --------
    >>> import numpy as np, numba_bn as nbn
    >>> bn = nbn.BatchNorm1d(2).eval()
    >>> bn.running_mean[:] = [1.0, -1.0]
    >>> w, b = nbn.fold_batch_norm(np.eye(2, dtype=np.float32), None, bn)
    >>> x = np.array([[3.0, 5.0]], np.float32)
    >>> np.allclose(x @ w.T + b, bn(x @ np.eye(2, dtype=np.float32).T))
    True
    """
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"expected a numba_bn batch norm, got "
                        f"{type(bn).__name__}")
    if bn.running_mean is None:
        raise ValueError(
            "cannot fold a batch norm without running statistics "
            "(track_running_stats=False): it normalizes every batch with "
            "that batch's own statistics")
    return fold_batch_norm_params(weight, bias, bn.running_mean,
                                  bn.running_var, bn.weight, bn.bias, bn.eps)
