"""The one place that maps an array type to a backend module.

NumPy arrays go to ``cpu``; CuPy arrays, anything with
``__cuda_array_interface__`` and the CUDA simulator's device arrays go to
``cuda``, which is imported only then, so importing numba_bn never imports
CuPy or touches CUDA.
"""
import sys

import numpy as np

from . import cpu

_SIMULATOR_ARRAY_MODULE = "numba.cuda.simulator.cudadrv.devicearray"


def is_gpu_array(a):
    """Whether ``a`` is an array of the GPU backend.

    Raises
    ------
    TypeError
        For a PyTorch CUDA tensor that requires grad, whose
        ``__cuda_array_interface__`` refuses to export it.
    """
    if "cupy" in sys.modules and isinstance(a, sys.modules["cupy"].ndarray):
        return True
    simulator = sys.modules.get(_SIMULATOR_ARRAY_MODULE)
    if simulator is not None and isinstance(a, simulator.FakeCUDAArray):
        return True
    try:
        return hasattr(a, "__cuda_array_interface__")
    except RuntimeError as exc:  # torch: "Can't export tensors that require gradient"
        raise TypeError(
            f"cannot read this CUDA array ({exc}); pass tensor.detach()"
        ) from exc


def device_of(a):
    """``"cpu"`` or ``"cuda"``: the device an array lives on.

    Raises
    ------
    TypeError
        When ``a`` is no array of either backend (lists, CPU tensors, ...).
    """
    if isinstance(a, np.ndarray):
        return "cpu"
    if is_gpu_array(a):
        return "cuda"
    if type(a).__module__.split(".")[0] == "torch":
        raise TypeError(
            f"expected a numpy.ndarray or a CUDA array, got a CPU "
            f"{type(a).__name__}: pass t.detach().numpy() (a view, no copy)")
    raise TypeError(
        f"expected a numpy.ndarray or a CUDA array, got {type(a).__name__}"
        " (convert it with numpy.asarray, or use a CuPy array)")


def backend_for(x):
    """The backend module for input ``x``, and ``x`` as that backend reads it.

    Parameters
    ----------
    x : array
        A NumPy array, a CuPy array, any object with
        ``__cuda_array_interface__``, or a CUDA-simulator device array.

    Returns
    -------
    backend : module
        ``numba_bn.cpu`` or ``numba_bn.cuda``.
    array
        ``x``, or a zero-copy Numba device array view of a foreign CUDA
        object (so that ``dtype``/``shape`` are NumPy's).

    Raises
    ------
    TypeError
        For anything else.
    """
    if device_of(x) == "cpu":
        return cpu, x
    from . import cuda
    return cuda, cuda.as_device_array(x)


def backend_named(device):
    """The backend module for a device name, ``"cpu"`` or ``"cuda"``."""
    if device == "cpu":
        return cpu
    if device == "cuda":
        return _cuda_backend()
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def _cuda_backend():
    """``numba_bn.cuda``, once a usable GPU and numba-cuda are known to be there.

    Raises
    ------
    RuntimeError
        numba_bn's own, naming the extras, instead of Numba's driver message.
    """
    try:
        from . import cuda
    except ImportError as exc:
        raise RuntimeError(
            "device='cuda' needs numba-cuda and CuPy: pip install "
            "'numba_bn[cuda12]' (CUDA 12) or 'numba_bn[cuda13]' (CUDA 13)"
        ) from exc
    cuda.require_gpu()
    return cuda
