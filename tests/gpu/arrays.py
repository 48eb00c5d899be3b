"""Device arrays for the GPU tests: CuPy's where CuPy is installed (a lent
GPU machine), else Numba's (the simulator, or a GPU without CuPy)."""
import numpy as np


def to_device(a):
    """``a`` copied to the GPU in its memory order."""
    from numba_bn import cuda
    return cuda.from_host(a)


def host(a):
    """A device array (CuPy's or Numba's) copied to a NumPy array."""
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a.get())
