"""numba_bn: batch normalization for NumPy and CuPy, with Numba kernels.

PyTorch's ``BatchNorm1d/2d/3d`` semantics (plus MegEngine's ``freeze``),
forward and backward, on the CPU (``@njit(parallel=True)``) and the GPU
(``@cuda.jit``); the input's array type picks the kernels.

Importing numba_bn neither imports CuPy nor touches CUDA, and never changes
Numba's global configuration.
"""
from . import megengine
from .functional import (batch_norm, batch_norm_backward,
                         batch_norm_forward_training)
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm",
           "batch_norm_forward_training", "batch_norm_backward", "megengine"]
