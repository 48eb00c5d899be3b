"""MegEngine's ``BatchNorm1d/2d`` arguments and defaults on numba_bn's modules.

MegEngine weighs the *old* running value by ``momentum`` (default 0.9):
``running = momentum * running + (1 - momentum) * batch``, which is PyTorch's
``momentum=0.1``. Everything else (methods, attributes, ``freeze``,
``state_dict``) is :class:`numba_bn.BatchNorm2d`'s.
"""
from . import modules

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class _MegEngineMomentum:
    """Constructor and averaging in MegEngine's momentum convention."""

    def __init__(self, num_features, eps=1e-5, momentum=0.9, affine=True,
                 track_running_stats=True, freeze=False, *, device="cpu",
                 dtype="float32", activation=None):
        if momentum is None:
            raise ValueError("momentum must be a float in [0, 1] (MegEngine "
                             "has no cumulative average)")
        super().__init__(num_features, eps, momentum, affine,
                         track_running_stats, freeze=freeze, device=device,
                         dtype=dtype, activation=activation)

    def _running_average(self):
        return 1.0 - self.momentum, False


_DOC = """:class:`numba_bn.{name}` with MegEngine's arguments.

    Parameters
    ----------
    num_features : int
    eps : float, optional
    momentum : float, optional
        Weight of the old running value: ``running = momentum * running +
        (1 - momentum) * batch`` (0.9 here equals PyTorch's 0.1).
    affine, track_running_stats, freeze : bool, optional
    device, dtype, activation : optional
        Keyword only. As :class:`numba_bn.{name}`.

    Raises
    ------
    ValueError
        ``momentum=None`` (MegEngine has no cumulative average), and the
        construction errors of :class:`numba_bn.{name}`.
    TypeError
        As :class:`numba_bn.{name}`.

    Examples
    --------
    >>> import numpy as np
    >>> from numba_bn import megengine
{example}"""


class BatchNorm1d(_MegEngineMomentum, modules.BatchNorm1d):
    __doc__ = _DOC.format(name="BatchNorm1d", example="""\
    >>> bn = megengine.BatchNorm1d(1)
    >>> _ = bn(np.array([[1.0], [3.0]], np.float32))
    >>> bn.running_mean
    array([0.2], dtype=float32)
    """)


class BatchNorm2d(_MegEngineMomentum, modules.BatchNorm2d):
    __doc__ = _DOC.format(name="BatchNorm2d", example="""\
    >>> bn = megengine.BatchNorm2d(2, freeze=True)
    >>> bn(np.ones((1, 2, 1, 1), np.float32)).ravel()
    array([0.999995, 0.999995], dtype=float32)
    """)
