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
import ctypes
import os

import numpy as np

from . import cpu
from ._dispatch import backend_for, backend_named
from .functional import (check_gradient, check_output, check_residual,
                         gradients)
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


def _mpi_reads_gpu_memory(mpi):
    """Whether the MPI library takes CUDA device buffers (is CUDA-aware).

    ``NUMBA_BN_CUDA_AWARE_MPI=1`` (or ``0``) decides; otherwise the
    library's ``MPIX_Query_cuda_support()`` (Open MPI, MPICH) answers, and
    a library without that function counts as not CUDA-aware.
    """
    setting = os.environ.get("NUMBA_BN_CUDA_AWARE_MPI", "")
    if setting not in ("", "0", "1"):
        raise ValueError(
            f"NUMBA_BN_CUDA_AWARE_MPI must be 0 or 1, got {setting!r}")
    if setting:
        return setting == "1"
    try:
        # The extension module's handle also finds the symbols of the MPI
        # library it links.
        query = ctypes.CDLL(mpi.__file__).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


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

    Each training forward makes one collective (every rank's count and
    shifted sums per channel, merged with Chan's formula) and each backward
    one (the two gradient sums per channel); the first training forward
    also checks that every rank has the same ``num_features``. Eval mode
    and ``freeze`` communicate nothing. GPU inputs are reduced and merged
    on the GPU; the collective takes device buffers when the MPI is
    CUDA-aware (``MPIX_Query_cuda_support()``, or
    ``NUMBA_BN_CUDA_AWARE_MPI=1``) and stages them through host memory
    otherwise.

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
    bias, freeze, device, dtype, activation : optional
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
                 freeze=False, device="cpu", dtype="float32",
                 activation=None):
        mpi = _mpi()
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, bias=bias, freeze=freeze,
                         device=device, dtype=dtype, activation=activation)
        self.comm = mpi.COMM_WORLD if comm is None else comm
        # Whether the collectives take GPU buffers; None until the first
        # exchange (_agree_on_channels).
        self._gpu_buffers = None

    def forward(self, x, *, residual=None, out=None):
        """Normalize ``x``, this rank's shard of the batch (then ``residual``
        and the activation, as :meth:`numba_bn.BatchNorm2d.forward`).

        Parameters
        ----------
        x : array
            ``(N, C, *spatial)`` with 0 to 3 spatial axes; ``N`` may differ
            between ranks and may be 0.
        residual, out : array, optional
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
            return super().forward(x, residual=residual, out=out)
        backend, gathered = self._exchange_buffer(3)
        try:
            input_backend, x = backend_for(x)
            self._check_input(x, input_backend)
            residual = check_residual(residual, x, backend)
            out = check_output(out, x, [x], backend, residual)
            self._write_sums(backend, gathered, x, x, None)
        except Exception:
            self._exchange(backend, gathered, False, True)
            raise
        count, partials, mean, _ = self._exchange(backend, gathered, True,
                                                  True)
        if count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 "
                "in the batches of all ranks together")
        if count == 0:  # every shard empty: nothing changes, as in BatchNorm
            return self._normalize(backend, x, out, residual=residual)
        return self._normalize(backend, x, out,
                               moments=(count, mean, partials),
                               x_check=self._own_sums(backend, gathered, mean),
                               residual=residual)

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
        array or tuple of array
            ``dx`` for this rank's shard; ``(dx, d_residual)`` after a
            forward with a ``residual``.

        Raises
        ------
        RuntimeError
            No forward has run, this rank's input was changed in place since
            the forward (CPU), or another rank raised in this call (on
            every other rank).
        ValueError, TypeError
            ``dy`` of another shape, device or dtype.
        """
        if self._saved is None:
            raise RuntimeError("backward() called before any forward()")
        x, save_mean, save_invstd, batch_stats, x_check, y, residual = (
            self._saved)
        if not batch_stats or save_mean is None:
            # Constant statistics, or a batch empty on every rank: nothing
            # to share.
            return super().backward(dy, out=out)
        backend, gathered = self._exchange_buffer(2)
        try:
            dy = check_gradient(dy, x, backend)
            out = check_output(out, dy, [dy, x] + ([] if y is None else [y]),
                               backend)
            # dy through the activation: what the batch norm's sums and dx
            # read.
            grad_output = self._write_sums(backend, gathered, x, dy,
                                           save_mean, x_check, save_invstd, y)
        except Exception:
            self._exchange(backend, gathered, False, False)
            raise
        count, partials, _, gathered = self._exchange(backend, gathered,
                                                      True, False)
        # The gathered messages hold this rank's own sums too: the
        # parameter gradients come from those (``cpu.backward``).
        dx, grad_weight, grad_bias, _ = gradients(
            backend, grad_output, x, self.weight, save_mean, save_invstd,
            True, None if self.weight is None else self.dtype, out,
            sums=(count, partials, gathered, self.comm.rank))
        self.grad_weight = grad_weight
        self.grad_bias = grad_bias if self.bias is not None else None
        return (dx, grad_output) if residual else dx

    def _exchange_buffer(self, blocks):
        """This call's message buffer and the backend it lives on.

        ``(ranks, 2 + blocks * C)`` float64 on the module's device (also
        when the input turns out to be elsewhere, so that the call still
        makes the same collective as its peers); row ``comm.rank`` is this
        rank's message, ``[ok, count]`` and ``blocks`` per-channel vectors.
        """
        self._agree_on_channels()
        backend = backend_named(self.device)
        return backend, backend.empty(
            (self.comm.size, 2 + blocks * self.num_features), np.float64)

    def _agree_on_channels(self):
        """Check once, in a collective of its own, that every rank has this ``C``.

        The per-call collectives exchange buffers whose size follows from
        ``C``: ranks that disagree would meet an MPI error or a hang there,
        not a message. Also asks whether the MPI reads GPU memory.
        """
        if self._gpu_buffers is not None:
            return
        channels = self.comm.allgather(self.num_features)
        if len(set(channels)) > 1:
            raise ValueError(
                "SyncBatchNorm: num_features differs between the ranks of "
                f"the communicator (in rank order: {channels})")
        self._gpu_buffers = _mpi_reads_gpu_memory(_mpi())

    def _exchange(self, backend, gathered, ok, moments):
        """The call's one collective: every rank's row of ``gathered``.

        A rank whose own work failed (``ok`` False) sends a row flagged as
        failed, gets None back and raises its own error; the others raise
        here, all alike, so no rank is left waiting in a later collective.

        Returns
        -------
        count : int
            Values per channel in the whole batch.
        partials, center : array
            The whole batch's sums, on ``backend``: see
            :func:`numba_bn.cpu.merge_ranks`.
        gathered : array
            Every rank's message, on ``backend`` (a copy of the buffer when
            staged through host memory).
        """
        if not ok:
            _write_blank(backend, gathered, self.comm.rank, ok)
        in_place = _mpi().IN_PLACE
        if backend is cpu or self._gpu_buffers:
            self.comm.Allgather(in_place, backend.message_buffer(gathered))
        else:  # staged through host memory
            staged = backend.to_host(gathered)
            self.comm.Allgather(in_place, staged)
            gathered = backend.from_host(staged)
        if not ok:
            return None
        header, partials, center = backend.merge_ranks(gathered, moments)
        header = backend.to_host(header)
        failed = np.flatnonzero(header[:, 0] == 0).tolist()
        if failed:
            raise RuntimeError(
                f"SyncBatchNorm: rank(s) {failed} of the communicator raised "
                "in this call (see their error); nothing was changed")
        return int(header[:, 1].sum()), partials, center, gathered

    def _own_sums(self, backend, gathered, mean):
        """This shard's sums of ``x - mean`` (``mean`` the whole batch's),
        from its forward message in ``gathered``: ``s1 + count * (shift -
        mean)``, for the backward to check ``x`` against (CPU only, see
        :func:`numba_bn.cuda.backward`)."""
        if backend is not cpu:
            return None
        own = gathered[self.comm.rank]
        channels = self.num_features
        shift, s1 = own[2:2 + channels], own[2 + channels:2 + 2 * channels]
        return s1 + own[1] * (shift - mean)

    def _write_sums(self, backend, gathered, x, dy, center, x_check=None,
                    save_invstd=None, y=None):
        """This shard's message, into row ``comm.rank`` of ``gathered``.

        Forward (``center`` None): ``[1, count, *shift, *s1, *s2]``, with
        ``s1``, ``s2`` the per-channel sums of ``x - shift`` and its square
        about a sample of each channel, so that they do not cancel.
        Backward (``center`` the forward's mean):
        ``[1, count, *sum(dy), *sum(dy * (x - center))]``, after checking
        that ``x`` is unchanged (``x_check``), with ``dy`` through the
        activation whose output is ``y``, which it returns. See
        :func:`numba_bn.cpu.write_message`.
        """
        if x.size == 0:
            _write_blank(backend, gathered, self.comm.rank, True)
            return dy
        return backend.write_message(gathered, self.comm.rank, x, dy, center,
                                     center is None, x_check, save_invstd, y)


def _write_blank(backend, gathered, rank, ok):
    """A message without sums, ``[ok, 0, 0, ...]``, in row ``rank``: an
    empty shard's, or a failed rank's (``ok`` False). The other rows are
    overwritten by the collective, so the whole buffer is written at once
    (no device slicing on the host)."""
    blank = np.zeros(gathered.shape)
    blank[rank, 0] = ok
    backend.copy_from_host(gathered, blank)


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
        device=module.device, dtype=module.dtype,
        activation=module.activation)
    for key in ("weight", "bias", "running_mean", "running_var",
                "num_batches_tracked"):
        setattr(sync, key, getattr(module, key))
    sync.training = module.training
    return sync
