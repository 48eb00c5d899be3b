"""Property-based tests: shapes, dtypes, strides and flags against the float64 reference."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numba_bn as nbn
from numba_bn import cpu

from . import reference as ref
from .conftest import TOLERANCE

MODULES = {2: nbn.BatchNorm1d, 3: nbn.BatchNorm1d, 4: nbn.BatchNorm2d,
           5: nbn.BatchNorm3d}


@st.composite
def layouts(draw, ndim):
    """An input shape plus a way to lay it out in memory: a view of a larger array."""
    n = draw(st.integers(0, 4))
    c = draw(st.integers(1, 4))
    spatial = [draw(st.integers(1, 5)) for _ in range(ndim - 2)]
    shape = [n, c] + spatial
    order = list(range(ndim))
    if draw(st.booleans()):  # channels-last memory, or any other permutation
        order = draw(st.permutations(order))
    steps = [draw(st.sampled_from([1, 1, 2, -1])) for _ in range(ndim)]
    return shape, order, steps


def materialize(values, order, steps):
    """``values`` re-laid out in memory: permuted axes and (negative) steps."""
    big_shape = [s * abs(k) for s, k in zip(values.shape, steps)]
    base = np.zeros([big_shape[a] for a in order], values.dtype)
    view = base.transpose(np.argsort(order))
    view = view[tuple(slice(None, None, k) if k > 0 else slice(None, None, k)
                      for k in steps)]
    view[...] = values
    assert view.shape == values.shape
    return view


def close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                               rtol=tol, atol=tol * scale)


@pytest.fixture(params=["parallel", "serial", "parallel two-pass",
                        "serial streaming", "parallel two-pass streaming"])
def launch_policy(request, monkeypatch):
    """Small inputs run the serial kernel twins with ordinary stores; test
    the parallel kernels too, on planes both the one-channel-per-iteration
    and the two-pass (statistics, then normalization) kernels (small test
    planes would take the two passes only), and each family as on large
    inputs: nontemporal stores, and the walks of inputs read from memory
    (the sums of channel-innermost inputs, all but float64 sums of x, one
    position at a time, see ``cpu._partials``, and the float32 training
    forward in two passes)."""
    monkeypatch.setattr(cpu, "_SERIAL_BELOW",
                        2**62 if request.param.startswith("serial") else 0)
    if "two-pass" in request.param:
        monkeypatch.setattr(cpu, "_PER_CHANNEL_BYTES", 0)
    else:
        monkeypatch.setattr(cpu, "_PER_CHANNEL_SHORT_PLANE", 0)
    if request.param.endswith("streaming"):
        monkeypatch.setattr(cpu, "_STREAM_WORKING_SET", 0)
        monkeypatch.setattr(cpu, "_STREAM_MIN_LINE", 0)
        monkeypatch.setattr(cpu, "_FROM_MEMORY_BYTES", 0)
        monkeypatch.setattr(cpu, "_UNROLLED_GRADIENT_SUMS_BYTES", 0)
    return request.param


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), ndim=st.sampled_from([2, 3, 4, 5]),
       dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       affine=st.booleans(), bias=st.booleans(), track=st.booleans(),
       momentum=st.sampled_from([0.1, None, 0.0, 1.0]),
       training=st.booleans(), freeze=st.booleans())
def test_module_forward_backward_match_reference(launch_policy, data, ndim, dtype,
                                                 affine, bias, track, momentum,
                                                 training, freeze):
    freeze = freeze and track
    shape, order, steps = data.draw(layouts(ndim))
    c = shape[1]
    batch_stats = (training and not freeze) or not track
    per_channel = int(np.prod(shape)) // c
    if batch_stats and per_channel == 1:
        return  # an error case, covered in test_errors
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    param_dtype = np.float32 if dtype == np.float16 and data.draw(st.booleans()) else dtype
    bn = MODULES[ndim](c, momentum=momentum, affine=affine, bias=bias,
                       track_running_stats=track, freeze=freeze, dtype=param_dtype)
    state = {"weight": rng.normal(1, 0.5, c), "bias": rng.normal(0, 1, c),
             "running_mean": rng.normal(0, 1, c), "running_var": rng.uniform(0.5, 2, c),
             "num_batches_tracked": np.array(rng.integers(0, 5))}
    bn.load_state_dict(state, strict=False)
    bn.train(training)
    before = bn.state_dict()
    values = rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 3), shape).astype(dtype)
    x = materialize(values, order, steps)
    dy = materialize(rng.normal(0, 1, shape).astype(dtype), order[::-1], steps)
    y = bn(x)
    dx = bn.backward(dy)
    assert y.shape == x.shape and y.dtype == dtype and dx.dtype == dtype

    w = before.get("weight")
    b = before.get("bias")
    if per_channel == 0:
        for key, value in before.items():
            np.testing.assert_array_equal(bn.state_dict()[key], value)
        return
    if batch_stats:
        mean, var = ref.batch_stats(values)
        dx_ref, dw_ref, db_ref = ref.backward_batch_stats(dy, values, w, bn.eps)
    else:
        mean, var = before["running_mean"], before["running_var"]
        dx_ref, dw_ref, db_ref = ref.backward_running_stats(dy, values, mean, var, w, bn.eps)
    y_ref = ref.forward(values, mean, var, w, b, bn.eps)
    close(y, y_ref, dtype, scale=np.abs(y_ref).max())
    close(dx, dx_ref, dtype, scale=np.abs(dx_ref).max() + 1)
    grads_expected = affine and not freeze
    assert (bn.grad_weight is not None) == grads_expected
    assert (bn.grad_bias is not None) == (grads_expected and bias)
    if grads_expected:
        close(bn.grad_weight, dw_ref, param_dtype, scale=per_channel)
    if grads_expected and bias:
        close(bn.grad_bias, db_ref, param_dtype, scale=per_channel)

    updated = training and track and not freeze
    if updated:
        count = int(before["num_batches_tracked"]) + 1
        factor = 1.0 / count if momentum is None else momentum
        rm_ref, rv_ref = ref.running_update(before["running_mean"],
                                            before["running_var"], values, factor)
        close(bn.running_mean, rm_ref, param_dtype, scale=np.abs(rm_ref).max())
        close(bn.running_var, rv_ref, param_dtype, scale=np.abs(rv_ref).max())
        assert int(bn.num_batches_tracked) == count
    elif track:
        for key in ["running_mean", "running_var", "num_batches_tracked"]:
            np.testing.assert_array_equal(bn.state_dict()[key], before[key])


@given(data=st.data(), ndim=st.sampled_from([2, 4, 5]))
def test_strided_input_gives_the_contiguous_result(data, ndim):
    shape, order, steps = data.draw(layouts(ndim))
    shape[0] = max(shape[0], 2)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    values = rng.normal(2, 3, shape).astype(np.float32)
    x = materialize(values, order, steps)
    dy = rng.normal(size=shape).astype(np.float32)
    y, mean, invstd = nbn.batch_norm_forward_training(x, None, None)
    y_c, mean_c, invstd_c = nbn.batch_norm_forward_training(np.ascontiguousarray(values), None, None)
    np.testing.assert_allclose(y, y_c, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean, mean_c, rtol=1e-12)
    dx = nbn.batch_norm_backward(materialize(dy, order, steps), x, None, mean, invstd)[0]
    dx_c = nbn.batch_norm_backward(dy, values, None, mean_c, invstd_c)[0]
    np.testing.assert_allclose(dx, dx_c, rtol=1e-5, atol=1e-5)


def test_channels_last_output_keeps_memory_order(rng):
    nhwc = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    x = nhwc.transpose(0, 3, 1, 2)
    y = nbn.BatchNorm2d(3)(x)
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous
    np.testing.assert_allclose(y, nbn.BatchNorm2d(3)(np.ascontiguousarray(x)), rtol=1e-6)


def test_3d_input_sliced_in_every_spatial_axis(rng):
    x = rng.normal(size=(2, 3, 8, 8, 8))[:, :, ::2, ::3, ::2]
    y = nbn.BatchNorm3d(3, dtype="float64")(x)
    mean, var = ref.batch_stats(x)
    np.testing.assert_allclose(y, ref.forward(x, mean, var), rtol=1e-10, atol=1e-10)
