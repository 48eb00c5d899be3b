"""Calls whose arrays mix NCHW and channels-last memory: every combination
against the float64 reference, outputs in the layout asked for, and the
transposed copy that brings the other arrays to x's layout."""
import itertools

import numpy as np
import pytest

import numba_bn as nbn
from numba_bn import cpu

from . import reference as ref
from .conftest import TOLERANCE

# Channels and positions that leave ragged edges around the transposed
# blocks (8 x 8 float32, 4 x 4 float64), one size for the parallel kernels,
# and 3-d and 5-d inputs.
SHAPES = [(3, 11, 5, 7), (4, 20, 30, 30), (5, 9, 13), (2, 6, 3, 4, 5)]


def in_layout(a, channels_last):
    """A copy of ``a`` in dense channels-last memory, or in C order."""
    if not channels_last:
        return a.copy()
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)).transpose(
        0, a.ndim - 1, *range(1, a.ndim - 1))


def is_channels_last(a):
    return np.moveaxis(a, 1, -1).flags.c_contiguous and not a.flags.c_contiguous


def empty(shape, dtype, channels_last):
    return in_layout(np.full(shape, np.nan, dtype), channels_last)


def close(ours, expected, dtype):
    tol = TOLERANCE[np.dtype(dtype).type]
    np.testing.assert_allclose(np.asarray(ours, np.float64), expected,
                               rtol=tol, atol=tol * 10)


def parameters(rng, shape, dtype):
    param_dtype = np.float32 if dtype == np.float16 else dtype
    weight = rng.normal(1.0, 0.3, shape[1]).astype(param_dtype)
    bias = rng.normal(0.0, 1.0, shape[1]).astype(param_dtype)
    return weight, bias


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_in_every_layout_combination(rng, shape, dtype):
    x_values = rng.normal(2.0, 3.0, shape).astype(dtype)
    dy_values = rng.normal(0.0, 1.0, shape).astype(dtype)
    weight, _ = parameters(rng, shape, dtype)
    mean, var = ref.batch_stats(x_values)
    save_mean = mean.astype(dtype)
    save_invstd = (1.0 / np.sqrt(var + 1e-5)).astype(dtype)
    expected = ref.backward_batch_stats(dy_values, x_values, weight)
    for x_cl, dy_cl, out_cl in itertools.product([False, True], repeat=3):
        x, dy = in_layout(x_values, x_cl), in_layout(dy_values, dy_cl)
        out = empty(shape, dtype, out_cl)
        dx, grad_weight, grad_bias = nbn.batch_norm_backward(
            dy, x, weight, save_mean, save_invstd, out=out)
        assert dx is out
        close(dx, expected[0], dtype)
        close(grad_weight, expected[1], dtype)
        close(grad_bias, expected[2], dtype)
        # The kernels run in x's layout: bit for bit the matched call.
        matched = nbn.batch_norm_backward(in_layout(dy_values, x_cl), x, weight,
                                          save_mean, save_invstd)
        np.testing.assert_array_equal(dx, matched[0])
        np.testing.assert_array_equal(grad_weight, matched[1])
        # Without out=, the gradient comes in x's layout.
        dx = nbn.batch_norm_backward(dy, x, weight, save_mean, save_invstd)[0]
        assert is_channels_last(dx) == x_cl
        close(dx, expected[0], dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_forward_in_every_layout_combination(rng, shape, dtype):
    x_values = rng.normal(2.0, 3.0, shape).astype(dtype)
    residual_values = rng.normal(0.0, 1.0, shape).astype(dtype)
    weight, bias = parameters(rng, shape, dtype)
    mean, var = ref.batch_stats(x_values)
    running = mean.astype(weight.dtype), (2 * var).astype(weight.dtype)
    trained = ref.forward(x_values, mean, var, weight, bias)
    evaluated = ref.forward(x_values, *running, weight, bias)
    fused = np.maximum(trained + residual_values.astype(np.float64), 0.0)
    for x_cl, residual_cl, out_cl in itertools.product([False, True],
                                                       repeat=3):
        x = in_layout(x_values, x_cl)
        residual = in_layout(residual_values, residual_cl)
        out = empty(shape, dtype, out_cl)
        y, _, _ = nbn.batch_norm_forward_training(x, weight, bias, out=out)
        assert y is out
        close(y, trained, dtype)
        # Whatever out's layout, the values of the call without it, which
        # runs in x's layout, bit for bit.
        np.testing.assert_array_equal(
            y, nbn.batch_norm_forward_training(x, weight, bias)[0])
        out = empty(shape, dtype, out_cl)
        assert nbn.batch_norm(x, *running, weight, bias, out=out) is out
        close(out, evaluated, dtype)
        np.testing.assert_array_equal(
            out, nbn.batch_norm(x, *running, weight, bias))
        y, _, _ = nbn.batch_norm_forward_training(
            x, weight, bias, activation="relu", residual=residual)
        assert is_channels_last(y) == x_cl
        close(y, fused, dtype)
        # ResNets write the sum into the residual itself.
        residual = in_layout(residual_values, residual_cl)
        y, _, _ = nbn.batch_norm_forward_training(
            x, weight, bias, activation="relu", residual=residual,
            out=residual)
        assert y is residual
        close(y, fused, dtype)


@pytest.mark.parametrize("shape", [(3, 11, 5, 7), (4, 20, 30, 30)])
def test_fused_backward_in_every_layout_combination(rng, shape):
    dtype = np.float32
    x_values = rng.normal(0.5, 2.0, shape).astype(dtype)
    dy_values = rng.normal(0.0, 1.0, shape).astype(dtype)
    weight, bias = parameters(rng, shape, dtype)
    y_values, save_mean, save_invstd = nbn.batch_norm_forward_training(
        x_values, weight, bias, activation="relu")
    g = dy_values.astype(np.float64) * (y_values > 0)
    expected = ref.backward_batch_stats(g, x_values, weight)
    for x_cl, dy_cl, y_cl in itertools.product([False, True], repeat=3):
        dx, grad_weight, _, d_residual = nbn.batch_norm_backward(
            in_layout(dy_values, dy_cl), in_layout(x_values, x_cl), weight,
            save_mean, save_invstd, activation="relu",
            y=in_layout(y_values, y_cl), residual=True)
        close(dx, expected[0], dtype)
        close(grad_weight, expected[1], dtype)
        close(d_residual, g, dtype)


# (channels, positions) of the transposing kernels' tests: whole blocks,
# ragged edges in either axis or both, tiles of one block and several.
TRANSPOSED_SHAPES = [(8, 8), (3, 130), (130, 3), (49, 512), (512, 49),
                     (64, 200), (67, 9), (200, 67)]


@pytest.fixture(params=[(serial, stream) for serial in (True, False)
                        for stream in (True, False)],
                ids=["serial-stream", "serial", "parallel-stream", "parallel"])
def transposing(request, monkeypatch):
    """Serial or parallel kernels, with nontemporal stores wherever the
    lines allow them or none."""
    serial, stream = request.param
    monkeypatch.setattr(cpu, "_SERIAL_BELOW", 2**62 if serial else 0)
    monkeypatch.setattr(cpu, "_STREAM_WORKING_SET", 0 if stream else 2**62)
    monkeypatch.setattr(cpu, "_STREAM_MIN_LINE", 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_copy_moves_every_element_once(rng, dtype, transposing):
    # In both directions; destinations starting anywhere in a cache line,
    # so that nontemporal stores begin after a lead (or are not used: lines
    # of 49 values); nothing written around the destination.
    for channels, length in [(1, 2), *TRANSPOSED_SHAPES]:
        for to_channels_last in (True, False):
            for offset in (0, 1, 5):
                src = in_layout(rng.normal(size=(3, channels, length)).astype(dtype),
                                not to_channels_last)
                size = src.size
                buffer = np.full(size + 16, np.nan, dtype)
                memory = (3, length, channels) if to_channels_last else src.shape
                dst = buffer[offset:offset + size].reshape(memory)
                if to_channels_last:
                    dst = dst.transpose(0, 2, 1)
                cpu._relayout_copy(src, dst)
                np.testing.assert_array_equal(dst, src)
                outside = np.concatenate([buffer[:offset], buffer[offset + size:]])
                assert np.isnan(outside).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_in_the_other_layout_is_written_directly(rng, dtype, transposing,
                                                     monkeypatch):
    # The element pass that writes an out= in the other layout through
    # tiles (``_affine_pass_transposed``), on the copy's shapes and at its
    # offsets: the values of the call without out=, bit for bit, nothing
    # written around out, and no copy.
    monkeypatch.setattr(cpu, "_relayout_copy", None)
    for channels, length in TRANSPOSED_SHAPES:
        mean, var = rng.normal(size=channels), rng.uniform(0.5, 2, channels)
        weight, bias = rng.normal(size=channels), rng.normal(size=channels)
        running = [a.astype(dtype) for a in (mean, var, weight, bias)]
        for x_cl in (True, False):
            x = in_layout(rng.normal(size=(3, channels, length)).astype(dtype),
                          x_cl)
            expected = nbn.batch_norm(x, *running)
            for offset in (0, 1, 5):
                buffer = np.full(x.size + 16, np.nan, dtype)
                memory = x.shape if x_cl else (3, length, channels)
                out = buffer[offset:offset + x.size].reshape(memory)
                if not x_cl:
                    out = out.transpose(0, 2, 1)
                assert nbn.batch_norm(x, *running, out=out) is out
                np.testing.assert_array_equal(out, expected)
                outside = np.concatenate([buffer[:offset], buffer[offset + x.size:]])
                assert np.isnan(outside).all()


def test_arrays_in_the_other_layout_are_copied_once_inputs_left_alone(rng,
                                                               monkeypatch):
    # One transposed copy per input in the other layout than x's, none
    # when the layouts match. An out= in the other layout is written
    # directly by the two-pass backward that channels-last x takes here
    # (``_affine_pass_transposed``), through a stand-in and a copy by the
    # one-kernel-per-channel backward that NCHW x takes at this size. The
    # caller's inputs are never written.
    copies = []
    real = cpu._relayout_copy
    monkeypatch.setattr(cpu, "_relayout_copy",
                        lambda src, dst: (copies.append(1), real(src, dst)))
    shape = (4, 20, 30, 30)
    x_values = rng.normal(size=shape).astype(np.float32)
    dy_values = rng.normal(size=shape).astype(np.float32)
    _, save_mean, save_invstd = nbn.batch_norm_forward_training(x_values, None, None)
    for layouts, expected in [("nnn", 0), ("ccc", 0), ("ncn", 1), ("nnc", 1),
                              ("cnn", 1), ("ccn", 0), ("ncc", 2), ("cnc", 1)]:
        x, dy, out = [in_layout(v, code == "c") for v, code
                      in zip((x_values, dy_values, np.empty(shape, np.float32)), layouts)]
        before = x.copy(), dy.copy()
        copies.clear()
        nbn.batch_norm_backward(dy, x, None, save_mean, save_invstd, out=out)
        assert len(copies) == expected, layouts
        np.testing.assert_array_equal(x, before[0])
        np.testing.assert_array_equal(dy, before[1])
    # The training forward writes an out= in the other layout directly
    # after either kind of sums (one kernel per channel for NCHW x here).
    for x_cl in (False, True):
        copies.clear()
        nbn.batch_norm_forward_training(in_layout(x_values, x_cl), None, None,
                                        out=empty(shape, np.float32, not x_cl))
        assert not copies, x_cl


def test_unmergeable_out_beside_mixed_layouts_copies_once_to_c_order(rng, monkeypatch):
    # An out= sliced in all three spatial axes of a 5-d input does not merge
    # into the kernels' (N, C, R, S) view, so every array goes to C order
    # first; an input in the other layout than x needs no second copy.
    copies = []
    real = cpu._relayout_copy
    monkeypatch.setattr(cpu, "_relayout_copy",
                        lambda src, dst: (copies.append(1), real(src, dst)))
    shape = (2, 3, 4, 5, 6)
    x_values = rng.normal(2.0, 3.0, shape)
    dy_values = rng.normal(size=shape)
    mean, var = ref.batch_stats(x_values)
    out = np.full((2, 3, 8, 10, 12), np.nan)[:, :, ::2, ::2, ::2]
    dx = nbn.batch_norm_backward(dy_values.copy(), in_layout(x_values, True), None,
                                 mean, 1.0 / np.sqrt(var + 1e-5), out=out)[0]
    assert dx is out and not copies
    close(dx, ref.backward_batch_stats(dy_values, x_values)[0], np.float64)
