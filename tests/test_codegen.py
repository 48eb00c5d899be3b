"""The CPU element passes compile to vector code.

A pass that LLVM leaves scalar still gives the right numbers, several times
slower, so no other test notices: the channel-innermost affine pass's serial
twin (every input under 32768 elements, and every pass of a forked child)
once ran 4x slower for it. This reads the machine code instead of timing it.
The transposed copy of mixed layouts, and the element pass that writes an
out= in the other layout, must likewise move whole vectors.
"""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

# Compiled afresh (a kernel loaded from Numba's cache has no assembly to
# show) for float32 inputs that take the serial twins: small ones.
SCRIPT = textwrap.dedent("""
    import numpy as np
    import numba_bn as nbn
    from numba_bn import cpu

    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(64, 256)),          # (N, C): rows
              rng.normal(size=(4, 16, 8, 8)),       # NCHW, short planes
              rng.normal(size=(2, 4, 32, 32))]      # NCHW, per channel
    inputs.append(np.ascontiguousarray(             # channels-last rows
        inputs[1].transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2))
    for x in inputs:
        x = x.astype(np.float32)
        assert x.size < cpu._SERIAL_BELOW
        ones = np.ones(x.shape[1], np.float32)
        y, mean, invstd = nbn.batch_norm_forward_training(x, ones, ones)
        nbn.batch_norm_backward(y, x, ones, mean, invstd)
        nbn.batch_norm(x, ones, ones, ones, ones)
    # dy in the other layout than x: a transposed copy.
    nbn.batch_norm_backward(inputs[3].astype(np.float32), inputs[1].astype(
        np.float32), None, np.zeros(16), np.ones(16))
    # out= in the other layout than x, both ways: the transposing pass.
    for x, out in [(inputs[1], inputs[3]), (inputs[3], inputs[1])]:
        ones = np.ones(16, np.float32)
        nbn.batch_norm(x.astype(np.float32), ones, ones, ones, ones,
                       out=np.empty_like(out, np.float32))
    for kernel, twin in cpu._SERIAL_TWINS.items():
        for signature in twin.signatures:
            asm = twin.inspect_asm(signature)
            # float32 -> float64 conversions of several values at once;
            # in-lane shuffles of whole vectors (the transposed blocks)
            print(twin.__name__, asm.count("cvtps2pd"), asm.count("vunpcklps"))
""")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="reads x86 instruction names")
def test_serial_passes_convert_float32_in_vectors(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True,
        timeout=300, env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    counts = {name: (int(conversions), int(shuffles)) for name, conversions,
              shuffles in (line.split() for line in done.stdout.splitlines())}
    copy = counts.pop("_transposed_copy_serial")
    transposing = counts.pop("_affine_pass_transposed_serial")
    assert set(counts) == {
        "_channel_partials_serial", "_channel_partials_rows_serial",
        "_affine_pass_serial", "_affine_pass_rows_serial",
        "_forward_per_channel_serial", "_backward_per_channel_serial"}
    scalar = [name for name, (conversions, _) in counts.items() if conversions == 0]
    assert not scalar, f"LLVM left these passes scalar: {scalar}"
    assert copy[1] > 0, "the transposed copy's blocks went through no vector shuffle"
    assert transposing[0] > 0, "LLVM left the transposing element pass scalar"
    assert transposing[1] > 0, "the transposing pass's blocks went through no vector shuffle"
