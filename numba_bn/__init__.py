"""numba_bn: batch normalization for NumPy and CuPy, with Numba kernels.

PyTorch's ``BatchNorm1d/2d/3d`` semantics (plus MegEngine's ``freeze``),
forward and backward, on the CPU (``@njit(parallel=True)``) and the GPU
(``@cuda.jit``); the input's array type picks the kernels.
``SyncBatchNorm`` shares batch statistics across MPI processes (mpi4py).

Importing numba_bn neither imports CuPy nor touches CUDA, and never changes
Numba's global configuration.
"""
from . import megengine
from .functional import (batch_norm, batch_norm_backward,
                         batch_norm_forward_training, fold_batch_norm_params)
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, fold_batch_norm
from .sync import SyncBatchNorm, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
           "convert_sync_batchnorm", "batch_norm",
           "batch_norm_forward_training", "batch_norm_backward",
           "fold_batch_norm", "fold_batch_norm_params", "megengine"]
