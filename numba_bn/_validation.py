"""Input checks, run once before dispatch (the kernels assume valid input).

Every check raises before any state changes, with the error type and words
of the contract's error table (``API.md``).
"""
import numbers

import numpy as np

from ._dispatch import device_of

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32),
                np.dtype(np.float64))


def check_float_input(x, name="input", ndims=None):
    """Raise ``TypeError`` unless ``x`` holds float16, float32 or float64,
    and ``ValueError`` unless it has ``ndims`` dimensions (PyTorch's words;
    at least 2 when None)."""
    dtype = np.dtype(x.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, float32 or float64, got {dtype}: "
            f"pass x.astype(numpy.float32) (or the module's dtype)")
    if ndims is not None and x.ndim not in ndims:
        names = [f"{n}D" for n in ndims]
        expected = " or ".join([", ".join(names[:-1]), names[-1]]
                               if len(names) > 1 else names)
        raise ValueError(f"expected {expected} input (got {x.ndim}D input)")
    if x.ndim < 2:
        raise ValueError(
            f"expected at least 2D input (got {x.ndim}D input): "
            f"{name} is (N, C, ...)")


def check_channels(x, num_features):
    """Channel count ``x.shape[1]`` is ``num_features``; channels-last data
    passed as is gets the transpose that views it as ``(N, C, ...)``."""
    if x.shape[1] == num_features:
        return
    hint = ""
    if x.ndim > 2 and x.shape[-1] == num_features:
        axes = (0, x.ndim - 1) + tuple(range(1, x.ndim - 1))
        hint = (f"; channels-last data (channels on the last axis) is read "
                f"as x.transpose{axes}, a view, not a copy")
    raise ValueError(
        f"expected input with {num_features} channels (num_features), "
        f"got {x.shape[1]} channels in input of shape {tuple(x.shape)}"
        + hint)


def check_values_per_channel(x):
    """Batch statistics need two values per channel (an empty batch passes)."""
    if x.size // x.shape[1] == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input"
            f" size {tuple(x.shape)}")


def check_dtype_match(input_dtype, param_dtype, what):
    """Input and parameter dtypes agree, or float16 input meets float32 ones."""
    input_dtype, param_dtype = np.dtype(input_dtype), np.dtype(param_dtype)
    if input_dtype == param_dtype or (input_dtype == np.float16
                                      and param_dtype == np.float32):
        return
    raise TypeError(
        f"input dtype {input_dtype} does not match {what} dtype {param_dtype}"
        f": build the module with dtype='{input_dtype}', or pass "
        f"x.astype(numpy.{param_dtype}) (float16 input may also meet float32 "
        "parameters)")


def check_device(a, device, what):
    found = device_of(a)
    if found != device:
        raise ValueError(
            f"{what} is on {found} but the input is on {device}: move it "
            f"with .to({device!r}) (nothing is moved implicitly)")


def check_vector(a, name, num_channels, device, input_dtype):
    """A per-channel parameter or buffer of the functional form."""
    if a is None:
        return
    # The common case in four reads: a small call otherwise spends as long
    # validating its vectors as normalizing ((8, 16, 32, 32): 1.8 us).
    if (type(a) is np.ndarray and device == "cpu"
            and a.shape == (num_channels,) and a.dtype == input_dtype):
        return
    check_device(a, device, name)
    if tuple(a.shape) != (num_channels,):
        raise ValueError(
            f"{name} must have shape ({num_channels},) for an input with "
            f"{num_channels} channels, got {tuple(a.shape)}")
    check_dtype_match(input_dtype, a.dtype, name)


def check_same_as_input(dy, x, name="dy"):
    """``dy`` of ``backward`` (or another array named ``name``) matches the
    forward's input (devices checked)."""
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(
            f"{name} has shape {tuple(dy.shape)}, expected the forward "
            f"input's shape {tuple(x.shape)}")
    if np.dtype(dy.dtype) != np.dtype(x.dtype):
        raise TypeError(
            f"{name} dtype {dy.dtype} does not match the input dtype "
            f"{x.dtype}")


ACTIVATIONS = (None, "relu")


def check_activation(activation):
    """Whether ``activation`` is the ReLU; ``ValueError`` unless it is one of
    ``ACTIVATIONS``."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def _memory(a):
    """``(address, shape, strides)`` of an array of either device."""
    face = getattr(a, "__array_interface__", None)
    if face is None:
        face = a.__cuda_array_interface__
    itemsize = np.dtype(a.dtype).itemsize
    strides = face.get("strides")
    if strides is None:  # C-contiguous
        strides = tuple(int(np.prod(face["shape"][i + 1:], dtype=np.int64))
                        * itemsize for i in range(len(face["shape"])))
    return face["data"][0], tuple(face["shape"]), tuple(strides)


def same_elements(a, b):
    """Whether arrays ``a`` and ``b`` are views of the same elements in the
    same order (``out=`` may be a residual in that way only)."""
    return a is b or _memory(a) == _memory(b)


def check_construction(num_features, eps, momentum, track_running_stats,
                       freeze, dtype):
    """Arguments of a module's constructor.

    Returns
    -------
    numpy.dtype
        The parameters' dtype.
    """
    if (not isinstance(num_features, numbers.Integral)
            or isinstance(num_features, bool)):
        raise TypeError(
            f"num_features must be an int, got {type(num_features).__name__}")
    if num_features <= 0:
        raise ValueError(f"num_features must be positive, got {num_features}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if momentum is not None and not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    if freeze and not track_running_stats:
        raise ValueError(
            "freeze=True normalizes with the running statistics, which "
            "track_running_stats=False does not keep")
    try:
        param_dtype = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must name a float dtype, got {dtype!r}") from exc
    if param_dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"dtype must be float16, float32 or float64, got {param_dtype}")
    return param_dtype


def check_out(out, like, inputs, backend):
    """``out=`` has the shape, dtype and device of ``like`` and overlaps no input."""
    check_device(out, backend.DEVICE, "out")
    if tuple(out.shape) != tuple(like.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected "
                         f"{tuple(like.shape)}")
    if np.dtype(out.dtype) != np.dtype(like.dtype):
        raise TypeError(f"out dtype {out.dtype} does not match {like.dtype}")
    if any(backend.may_share_memory(out, a) for a in inputs):
        raise ValueError("out must not overlap the input arrays (the module's "
                         "backward reads the forward's input)")
