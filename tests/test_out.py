"""out= on the functional forms and the modules: same values, no new array."""
import numpy as np
import pytest

import numba_bn as nbn
from numba_bn import cpu

from . import reference as ref
from .conftest import TOLERANCE


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced_3d"])
def test_module_out_matches_and_is_returned(dtype, layout, rng):
    if layout == "sliced_3d":
        x = rng.normal(1, 2, (3, 2, 4, 4, 4)).astype(dtype)[:, :, ::2, ::2, ::2]
        make = nbn.BatchNorm3d
    else:
        x = rng.normal(1, 2, (3, 4, 5, 6)).astype(dtype)
        if layout == "channels_last":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        make = nbn.BatchNorm2d
    params = "float32" if dtype == np.float16 else dtype
    plain, reusing = make(x.shape[1], dtype=params), make(x.shape[1], dtype=params)
    dy = rng.normal(size=x.shape).astype(dtype)
    y_out, dx_out = np.full(x.shape, np.nan, dtype), np.full(x.shape, np.nan, dtype)
    assert reusing(x, out=y_out) is y_out
    assert reusing.backward(dy, out=dx_out) is dx_out
    np.testing.assert_array_equal(y_out, plain(x))
    np.testing.assert_array_equal(dx_out, plain.backward(dy))
    np.testing.assert_array_equal(reusing.grad_weight, plain.grad_weight)
    for key, value in plain.state_dict().items():
        np.testing.assert_array_equal(reusing.state_dict()[key], value)


def test_functional_out(rng):
    x = rng.normal(size=(6, 3, 4))
    rm, rv = np.zeros(3), np.ones(3)
    out = np.empty_like(x)
    assert nbn.batch_norm(x, rm, rv, training=True, out=out) is out
    mean, var = ref.batch_stats(x)
    np.testing.assert_allclose(out, ref.forward(x, mean, var), rtol=1e-12, atol=1e-12)
    y_out = np.empty_like(x)
    y, save_mean, save_invstd = nbn.batch_norm_forward_training(x, None, None, out=y_out)
    assert y is y_out
    dy = rng.normal(size=x.shape)
    dx_out = np.empty_like(x)
    dx, _, _ = nbn.batch_norm_backward(dy, x, None, save_mean, save_invstd, out=dx_out)
    assert dx is dx_out
    np.testing.assert_allclose(dx, ref.backward_batch_stats(dy, x)[0], rtol=1e-10, atol=1e-12)


def test_out_errors_change_nothing(rng):
    bn = nbn.BatchNorm2d(3)
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    for out, error, words in [(np.empty((2, 3, 4, 5), np.float32), ValueError, "shape"),
                              (np.empty((2, 3, 4, 4), np.float64), TypeError, "dtype"),
                              (x, ValueError, "overlap"),
                              ([0.0], TypeError, "numpy.ndarray")]:
        with pytest.raises(error, match=words):
            bn(x, out=out)
        assert int(bn.num_batches_tracked) == 0
    bn(x)
    with pytest.raises(ValueError, match="overlap"):
        bn.backward(np.ones_like(x), out=x)


def test_empty_batch_with_out():
    out = np.empty((0, 2), np.float32)
    assert nbn.BatchNorm1d(2)(np.empty((0, 2), np.float32), out=out) is out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("per_channel", [True, False])
def test_streaming_stores_fill_out_exactly(dtype, layout, offset, per_channel,
                                           rng, monkeypatch):
    # Large outputs are written with nontemporal stores from each line's
    # first cache line to its last full one; an out= view starting
    # ``offset`` elements into its buffer moves those bounds. Every element
    # must be right and nothing around the view touched.
    monkeypatch.setattr(cpu, "_STREAM_WORKING_SET", 0)
    monkeypatch.setattr(cpu, "_STREAM_MIN_LINE", 0)
    if per_channel:
        monkeypatch.setattr(cpu, "_PER_CHANNEL_SHORT_PLANE", 0)
    else:
        monkeypatch.setattr(cpu, "_PER_CHANNEL_BYTES", 0)
    shape = (50, 70) if layout == "rows" else (3, 4, 10, 13)
    x = rng.normal(2, 3, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    memory_shape = shape
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        memory_shape = (3, 10, 13, 4)
    size = x.size
    weight = rng.normal(1, 0.2, shape[1]).astype(dtype)
    bias = rng.normal(0, 1, shape[1]).astype(dtype)

    def guarded_out():
        buffer = np.full(size + 40, np.nan, dtype)
        view = buffer[offset:offset + size].reshape(memory_shape)
        if layout == "channels_last":
            view = view.transpose(0, 3, 1, 2)
        return buffer, view

    y_buffer, y = guarded_out()
    _, save_mean, save_invstd = nbn.batch_norm_forward_training(x, weight, bias, out=y)
    dx_buffer, dx = guarded_out()
    nbn.batch_norm_backward(dy, x, weight, save_mean, save_invstd, out=dx)
    eval_buffer, y_eval = guarded_out()
    mean, var = ref.batch_stats(x)
    running_mean, running_var = mean.astype(dtype), (2 * var).astype(dtype)
    nbn.batch_norm(x, running_mean, running_var, weight, bias, out=y_eval)

    tol = TOLERANCE[dtype]
    for buffer, actual, expected in [
            (y_buffer, y, ref.forward(x, mean, var, weight, bias)),
            (dx_buffer, dx, ref.backward_batch_stats(dy, x, weight)[0]),
            (eval_buffer, y_eval, ref.forward(x, running_mean, running_var, weight, bias))]:
        np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * 10)
        outside = np.concatenate([buffer[:offset], buffer[offset + size:]])
        assert np.isnan(outside).all()


@pytest.mark.parametrize("serial", [True, False])
@pytest.mark.parametrize("boundary", ["mid-sample", "between samples"])
def test_plane_chunks_cover_every_plane_once(serial, boundary, rng, monkeypatch):
    # The plane kernels split the (n, c) planes into chunks of consecutive
    # planes; a chunk may end inside a sample. Three or more chunks here,
    # each boundary between two channels of one sample or between samples,
    # and every value checked against the reference (two-pass statistics).
    monkeypatch.setattr(cpu, "_SERIAL_BELOW", 2**62 if serial else 0)
    monkeypatch.setattr(cpu, "_PER_CHANNEL_BYTES", 0)
    rows, cols = 9, 10
    per_chunk = cpu._PLANE_CHUNK_ELEMENTS // (rows * cols)
    channels = 11 if boundary == "mid-sample" else per_chunk
    assert (per_chunk % channels != 0) == (boundary == "mid-sample")
    samples = -(-(2 * per_chunk + 1) // channels)
    x = rng.normal(2, 3, (samples, channels, rows, cols))
    dy = rng.normal(size=x.shape)
    y, save_mean, save_invstd = nbn.batch_norm_forward_training(x, None, None)
    mean, var = ref.batch_stats(x)
    np.testing.assert_allclose(y, ref.forward(x, mean, var), rtol=1e-10, atol=1e-10)
    dx, _, _ = nbn.batch_norm_backward(dy, x, None, save_mean, save_invstd)
    np.testing.assert_allclose(dx, ref.backward_batch_stats(dy, x)[0], rtol=1e-10,
                               atol=1e-10)
    running_var = 2 * var
    np.testing.assert_allclose(nbn.batch_norm(x, mean, running_var),
                               ref.forward(x, mean, running_var), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kept", [1024, 2])
def test_view_plans_tell_memory_orders_of_one_shape_apart(kept, rng,
                                                          monkeypatch):
    # cpu._views works out its views once per dtype, shape and strides;
    # arrays of one shape in other memory orders, with and without out=,
    # in turn, must each get their own (and so must a plan cache that
    # overflows and starts afresh).
    monkeypatch.setattr(cpu, "_VIEW_PLANS", {})
    monkeypatch.setattr(cpu, "_VIEW_PLANS_KEPT", kept)
    nchw = rng.normal(2, 3, (2, 3, 4, 5))
    orders = {"nchw": lambda a: a,
              "channels_last": lambda a: np.ascontiguousarray(
                  a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
              "sliced": lambda a: np.pad(a, ((0, 0), (0, 0), (0, 0), (0, 3)))[..., :5]}
    mean, var = ref.batch_stats(nchw)
    expected = ref.forward(nchw, mean, var)
    for _ in range(2):
        for x_order, make_x in orders.items():
            for out_order in [None, *orders]:
                x = make_x(nchw)
                out = None if out_order is None else orders[out_order](
                    np.full(x.shape, np.nan))
                y = nbn.batch_norm(x, None, None, training=True, out=out)
                np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
                if out is None:
                    assert (y.strides == x.strides) == (x_order != "sliced")
    assert len(cpu._VIEW_PLANS) <= kept
