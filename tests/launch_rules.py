"""Every kernel launch the CUDA simulator runs, checked against the hardware launcher.

The simulator runs a kernel as Python and accepts any argument; numba-cuda's
real launcher (``numba.cuda.dispatcher._Kernel._prepare_args``) marshals
arrays, numbers, booleans and tuples of them and raises on anything else,
``None`` included. Under the simulator the real dispatcher cannot be
imported, so :func:`recording` notes each launch's arguments and
:func:`refusals` hands them to a checker process started without the
simulator (``python -m tests.launch_rules``), which types each argument as
the hardware dispatcher does (``CUDADispatcher.typeof_pyval``) and runs
``_Kernel._prepare_args`` itself on it, so the rule cannot drift from
numba-cuda's.
"""
import atexit
import contextlib
import ctypes
import functools
import json
import os
import subprocess
import sys
import types

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_active = []  # the lists that launches are appended to now


def describe(arg):
    """A JSON-ready description of a kernel argument."""
    if arg is None:
        return {"kind": "none"}
    if isinstance(arg, tuple):
        return {"kind": "tuple", "items": [describe(a) for a in arg]}
    if isinstance(arg, (bool, int, float)):
        return {"kind": type(arg).__name__, "value": arg}
    if isinstance(arg, np.generic):
        return {"kind": "numpy", "dtype": arg.dtype.str, "value": arg.item()}
    array = getattr(arg, "_ary", arg)  # a simulator device array's data
    if isinstance(array, np.ndarray):
        return {"kind": "array", "dtype": array.dtype.str,
                "shape": list(array.shape), "strides": list(array.strides)}
    return {"kind": "object", "type": type(arg).__qualname__}


@contextlib.contextmanager
def recording():
    """Collect ``(kernel name, argument descriptions)`` of every launch the
    simulator runs inside the block."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    launches = []
    if not _active:
        original = FakeCUDAKernel.__call__

        def call(self, *args):
            if not self._device:
                for log in _active:
                    log.append((self.fn.__name__,
                                [describe(a) for a in args]))
            return original(self, *args)

        FakeCUDAKernel.__call__ = call
        FakeCUDAKernel._numba_bn_original = original
    _active.append(launches)
    try:
        yield launches
    finally:
        # By identity: another active list may hold equal launches.
        del _active[next(i for i, log in enumerate(_active)
                         if log is launches)]
        if not _active:
            FakeCUDAKernel.__call__ = FakeCUDAKernel._numba_bn_original


@functools.lru_cache(maxsize=1)
def _checker():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    checker = subprocess.Popen(
        [sys.executable, "-m", "tests.launch_rules"], cwd=_ROOT, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    atexit.register(_close, checker)
    return checker


def _close(checker):
    checker.stdin.close()  # its loop ends at the end of its input
    checker.wait()
    checker.stdout.close()


def refusals(launches):
    """What the hardware launcher would refuse among ``launches``.

    Returns
    -------
    list of str
        One line per refused argument; empty when all would launch.
    """
    if not launches:
        return []
    checker = _checker()
    checker.stdin.write(json.dumps(launches) + "\n")
    checker.stdin.flush()
    answer = checker.stdout.readline()
    if not answer:
        raise RuntimeError("the launch checker process died")
    return json.loads(answer)


# --------------------------------------------------------------------------
# the checker process (no simulator: numba-cuda's real dispatcher)

def _rebuild(desc):
    """A value the hardware dispatcher types as the described argument."""
    kind = desc["kind"]
    if kind == "none":
        return None
    if kind == "tuple":
        return tuple(_rebuild(d) for d in desc["items"])
    if kind in ("bool", "int", "float"):
        return {"bool": bool, "int": int, "float": float}[kind](desc["value"])
    if kind == "numpy":
        return np.dtype(desc["dtype"]).type(desc["value"])
    if kind == "array":
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        # A device array over no memory: the launcher reads its geometry
        # and address only.
        return DeviceNDArray(
            tuple(desc["shape"]), tuple(desc["strides"]),
            np.dtype(desc["dtype"]),
            gpu_data=types.SimpleNamespace(
                device_ctypes_pointer=ctypes.c_void_p(0)))
    return object()


def _check(launches):
    from numba.cuda import dispatcher
    stub = types.SimpleNamespace(extensions=[])
    stub._prepare_args = functools.partial(dispatcher._Kernel._prepare_args,
                                           stub)
    refused = []
    for kernel, args in launches:
        for i, desc in enumerate(args):
            value = _rebuild(desc)
            try:
                ty = dispatcher.CUDADispatcher.typeof_pyval(None, value)
                dispatcher._Kernel._prepare_args(stub, ty, value, 0, [], [])
            except Exception as exc:  # what the real launch would raise
                refused.append(f"{kernel}: argument {i} ({desc}): {exc!r}")
    return refused


def main():
    from numba.cuda.cudadrv import devices
    # Empty device arrays ask for a context, which needs no GPU here.
    devices.get_context = lambda *args, **kwargs: types.SimpleNamespace()
    for line in sys.stdin:
        print(json.dumps(_check(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
