"""``SyncBatchNorm``: batch statistics shared by the processes of an MPI
communicator, for data-parallel training where each process holds a shard
of the batch.

A training forward normalizes every rank's shard with the statistics of the
whole batch (the concatenation of all shards), and the backward gives each
rank its slice of the whole batch's input gradient. Each call makes one
collective on per-channel vectors; eval and frozen modules communicate
nothing. mpi4py is imported when the first SyncBatchNorm is built, not with
numba_bn.
"""
import numpy as np

from ._dispatch import backend_for
from .functional import check_gradient, check_output, gradients
from .modules import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "SyncBatchNorm needs mpi4py and an MPI library: "
            "pip install 'numba_bn[mpi]' (mpi4py and the mpich wheel)"
        ) from exc
    return MPI


def _first_sample(x):
    """``x[0, :, 0, ...]``: one value of each channel (a view, same device)."""
    return x[(0, slice(None)) + (0,) * (x.ndim - 2)]


def merge_moments(parts):
    """Chan's pairwise merge of per-rank ``(count, mean, m2)``, in rank order.

    ``m2`` is the sum of squared deviations from the mean. Merging
    ``(n_a, mean_a, m2_a)`` and ``(n_b, mean_b, m2_b)`` with
    ``delta = mean_b - mean_a`` and ``n = n_a + n_b`` gives
    ``mean = mean_a + delta * n_b / n`` and
    ``m2 = m2_a + m2_b + delta**2 * n_a * n_b / n``: no ``sum(x**2)``, so
    nothing cancels when the mean is large. Every rank merges the same
    parts in the same order, so all get bit-identical statistics.

    Parameters
    ----------
    parts : list of (int, numpy.ndarray, numpy.ndarray)
        Per rank: the value count per channel and ``(C,)`` float64 mean and
        ``m2`` (zeros for an empty shard).

    Returns
    -------
    count : int
    mean, m2 : numpy.ndarray or float
        ``(C,)`` float64 (the float ``0.0`` when every count is 0).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_bn.sync import merge_moments
    >>> a, b = np.array([1.0, 2.0]), np.array([6.0])
    >>> parts = [(v.size, np.array([v.mean()]), np.array([((v - v.mean())**2).sum()]))
    ...          for v in (a, b)]
    >>> count, mean, m2 = merge_moments(parts)
    >>> count, mean, m2 / count          # mean 3, biased variance 14/3
    (3, array([3.]), array([4.66666667]))
    """
    count, mean, m2 = 0, 0.0, 0.0
    for n, mean_k, m2_k in parts:
        if n == 0:
            continue
        total = count + n
        delta = mean_k - mean
        mean = mean + delta * (n / total)
        m2 = m2 + m2_k + delta * delta * (count * n / total)
        count = total
    return count, mean, m2


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization with statistics over all ranks of an MPI communicator.

    In training mode the per-channel mean and variance are those of the
    concatenation of every rank's batch (ranks may hold different batch
    sizes, including 0); running statistics are updated with the global
    unbiased variance and stay identical on every rank. The backward sums
    the per-channel :math:`\sum dy` and :math:`\sum dy\,\hat x` across
    ranks, so each rank's ``dx`` is its slice of the whole batch's
    gradient. ``grad_weight`` and ``grad_bias`` are the sums over this
    rank's shard only, as in PyTorch: averaging (or summing) them across
    ranks is the training framework's job.

    Each training forward makes one collective (every rank's count, mean
    and sum of squared deviations per channel, merged with Chan's formula)
    and each backward one (the two gradient sums per channel); eval mode
    and ``freeze`` communicate nothing. GPU inputs are reduced on the GPU;
    the per-channel vectors travel through host memory.

    Every rank of ``comm`` must call forward and backward the same number
    of times, in the same mode. A rank whose input is invalid raises its
    own error, and the other ranks raise ``RuntimeError`` from the same
    call instead of waiting for it; nothing changes on any rank.

    Parameters
    ----------
    num_features : int
        ``C``, the channel count; the same on every rank.
    eps, momentum, affine, track_running_stats
        As :class:`numba_bn.BatchNorm2d`.
    comm : mpi4py.MPI.Comm, optional
        Keyword only. The ranks that share statistics (``MPI.COMM_WORLD``
        when None); a sub-communicator (``comm.Split``) shares them within
        itself only.
    bias, freeze, device, dtype : optional
        Keyword only. As :class:`numba_bn.BatchNorm2d`.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
        The communicator.

    Raises
    ------
    ImportError
        mpi4py is not installed (``pip install 'numba_bn[mpi]'``).
    ValueError, TypeError
        As :class:`numba_bn.BatchNorm2d`; in a forward, also when the
        ranks' channel counts differ (on every rank).

    Examples
    --------
    Run under ``mpiexec -n 2 python script.py``; with one process it is a
    plain batch norm:

    >>> import numpy as np, numba_bn as nbn
    >>> bn = nbn.SyncBatchNorm(3)
    >>> x = np.random.default_rng(bn.comm.rank).normal(size=(4, 3, 8, 8))
    >>> y = bn(x.astype(np.float32))
    >>> bn.comm.size == 1 and bool(np.allclose(y, nbn.BatchNorm2d(3)(x.astype(np.float32)), atol=1e-6))
    True
    """

    _input_ndims = (2, 3, 4, 5)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, comm=None, bias=True,
                 freeze=False, device="cpu", dtype="float32"):
        mpi = _mpi()
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, bias=bias, freeze=freeze,
                         device=device, dtype=dtype)
        self.comm = mpi.COMM_WORLD if comm is None else comm

    def forward(self, x, *, out=None):
        """Normalize ``x``, this rank's shard of the batch.

        Parameters
        ----------
        x : array
            ``(N, C, *spatial)`` with 0 to 3 spatial axes; ``N`` may differ
            between ranks and may be 0.
        out : array, optional
            Keyword only, as :meth:`numba_bn.BatchNorm2d.forward`.

        Returns
        -------
        array
            This rank's slice of the normalized batch.

        Raises
        ------
        ValueError
            Channel counts differ between ranks, or the whole batch has one
            value per channel; and the errors of
            :meth:`numba_bn.BatchNorm2d.forward`.
        RuntimeError
            Another rank's input was invalid.
        """
        if not self._uses_batch_stats():
            return super().forward(x, out=out)
        try:
            backend, x = backend_for(x)
            self._check_input(x, backend)
            out = check_output(out, x, [x], backend)
            local = self._local_moments(backend, x)
        except Exception:
            self._exchange(None)
            raise
        count, mean, m2 = merge_moments(self._exchange(local))
        if count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 "
                "in the batches of all ranks together")
        if count == 0:  # every shard empty: nothing changes, as in BatchNorm
            return self._normalize(backend, x, out)
        return self._normalize(backend, x, out, moments=(
            count, backend.from_host(mean), backend.from_host(m2)))

    def backward(self, dy, *, out=None):
        """This rank's slice of the whole batch's input gradient.

        Sets ``grad_weight`` and ``grad_bias`` to this rank's own sums.

        Parameters
        ----------
        dy : array
            Gradient of this rank's last forward output.
        out : array, optional
            Keyword only, as :meth:`numba_bn.BatchNorm2d.backward`.

        Returns
        -------
        array
            ``dx`` for this rank's shard.

        Raises
        ------
        RuntimeError
            No forward has run, or another rank's ``dy`` was invalid.
        ValueError, TypeError
            ``dy`` of another shape, device or dtype.
        """
        if self._saved is None:
            raise RuntimeError("backward() called before any forward()")
        x, save_mean, save_invstd, batch_stats = self._saved
        if not batch_stats or save_mean is None:
            # Constant statistics, or a batch empty on every rank: nothing
            # to share.
            return super().backward(dy, out=out)
        backend = self._backend
        try:
            dy = check_gradient(dy, x, backend)
            out = check_output(out, dy, [dy, x], backend)
            count, sum_dy, sum_dy_xmu = self._local_gradient_sums(
                backend, x, dy, save_mean)
        except Exception:
            self._exchange(None)
            raise
        parts = self._exchange((count, sum_dy, sum_dy_xmu))
        total = tuple(sum(part[i] for part in parts) for i in range(3))
        dx, _, _ = gradients(
            backend, dy, x, self.weight, save_mean, save_invstd, True, None,
            out, sums=(total[0], backend.from_host(total[1]),
                       backend.from_host(total[2])))
        self.grad_weight = self.grad_bias = None
        if self.weight is not None:
            invstd = backend.to_host(save_invstd)
            self.grad_weight = backend.from_host(
                (sum_dy_xmu * invstd).astype(self.dtype))
        if self.bias is not None:
            self.grad_bias = backend.from_host(sum_dy.astype(self.dtype))
        return dx

    def _exchange(self, payload):
        """The call's one collective: every rank's ``payload`` in rank order.

        ``payload`` None says that this rank failed; it gets None back and
        raises its own error. The others raise here, all alike, so no rank
        is left waiting in a later collective.
        """
        gathered = self.comm.allgather((self.num_features, payload))
        if payload is None:
            return None
        failed = [rank for rank, (_, part) in enumerate(gathered)
                  if part is None]
        if failed:
            raise RuntimeError(
                f"SyncBatchNorm: rank(s) {failed} of the communicator raised "
                "in this call (see their error); nothing was changed")
        channels = [c for c, _ in gathered]
        if len(set(channels)) > 1:
            raise ValueError(
                "SyncBatchNorm: num_features differs between the ranks of "
                f"the communicator (in rank order: {channels})")
        return [part for _, part in gathered]

    def _local_moments(self, backend, x):
        """This shard's ``(count, mean, m2)`` per channel, on the host."""
        n_channels = x.shape[1]
        count = x.size // n_channels
        if count == 0:
            return 0, np.zeros(n_channels), np.zeros(n_channels)
        # Sums about a sample of each channel do not cancel (see
        # cpu.forward_batch_stats).
        shift = np.asarray(backend.to_host(_first_sample(x)), np.float64)
        s1, s2 = backend.channel_sums(x, x, backend.from_host(shift), True)
        s1, s2 = backend.to_host(s1), backend.to_host(s2)
        mean = shift + s1 / count
        return count, mean, np.maximum(s2 - s1 * (s1 / count), 0.0)

    def _local_gradient_sums(self, backend, x, dy, save_mean):
        """``(count, sum(dy), sum(dy * (x - mean)))`` of this shard, on the host."""
        n_channels = x.shape[1]
        count = x.size // n_channels
        if count == 0:
            return 0, np.zeros(n_channels), np.zeros(n_channels)
        sums = backend.channel_sums(x, dy, save_mean, False)
        return (count,) + tuple(backend.to_host(s) for s in sums)


def convert_sync_batchnorm(module, comm=None):
    """A :class:`SyncBatchNorm` with ``module``'s settings, parameters and buffers.

    The new module holds the same arrays (no copies), as PyTorch's
    ``SyncBatchNorm.convert_sync_batchnorm`` does, and the same mode. A
    MegEngine-convention module's momentum is converted (0.9 there is 0.1
    here).

    Parameters
    ----------
    module : numba_bn.BatchNorm1d, BatchNorm2d or BatchNorm3d
        Also the ``numba_bn.megengine`` ones.
    comm : mpi4py.MPI.Comm, optional
        As :class:`SyncBatchNorm`.

    Returns
    -------
    SyncBatchNorm

    Raises
    ------
    TypeError
        ``module`` is not a numba_bn batch norm.
    ImportError
        mpi4py is not installed.

    Examples
    --------
    >>> import numba_bn as nbn
    >>> bn = nbn.BatchNorm2d(4, momentum=0.2).eval()
    >>> sync = nbn.convert_sync_batchnorm(bn)
    >>> sync.momentum, sync.training, sync.running_var is bn.running_var
    (0.2, False, True)
    """
    if not isinstance(module, _BatchNorm):
        raise TypeError(f"expected a numba_bn batch norm, got "
                        f"{type(module).__name__}")
    momentum, cumulative = module._running_average()
    sync = SyncBatchNorm(
        module.num_features, module.eps, None if cumulative else momentum,
        module.affine, module.track_running_stats, comm=comm,
        bias=module.bias is not None, freeze=module.freeze,
        device=module.device, dtype=module.dtype)
    for key in ("weight", "bias", "running_mean", "running_var",
                "num_batches_tracked"):
        setattr(sync, key, getattr(module, key))
    sync.training = module.training
    return sync
