"""Fused ReLU and residual add against PyTorch's separate steps,
``F.relu(F.batch_norm(x, ...) + residual)``, and the float64 reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numba_bn as nbn
from numba_bn import functional as nbf
from numba_bn import megengine

from . import reference as ref
from .conftest import TOLERANCE

# The CPU's kernel families: NCHW planes, channels-last rows, (N, C) rows,
# the per-channel path (few channels, long planes) and the parallel sizes.
LAYOUTS = {
    "nchw": ((4, 3, 5, 6), False),
    "channels_last": ((4, 3, 5, 6), True),
    "rows": ((40, 3), False),
    "per_channel": ((3, 2, 40, 40), False),
    "parallel_nchw": ((16, 8, 32, 32), False),
    "parallel_channels_last": ((16, 8, 32, 32), True),
}


def layout(a, channels_last):
    if not channels_last:
        return a
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)).transpose(0, 3, 1, 2)


def inputs(rng, name, dtype, mean=0.5):
    shape, channels_last = LAYOUTS[name]
    x = layout(rng.normal(mean, 2.0, shape).astype(dtype), channels_last)
    residual = rng.normal(0.0, 1.0, shape).astype(dtype)  # NCHW: any layout
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    C = shape[1]
    weight = rng.normal(1.0, 0.5, C).astype(np.float32 if dtype == np.float16 else dtype)
    bias = rng.normal(0.0, 1.0, C).astype(weight.dtype)
    return x, residual, dy, weight, bias


def expected(x, residual, dy, weight, bias, relu, stats=None):
    """The reference's output and gradients of ``relu(bn(x) + residual)``:
    batch statistics, or the running ``stats`` given."""
    mean, var = ref.batch_stats(x) if stats is None else stats
    y = ref.forward(x, mean, var, weight, bias)
    if residual is not None:
        y = y + residual.astype(np.float64)
    if relu:
        y = np.maximum(y, 0.0)
    g = dy.astype(np.float64) * (y > 0) if relu else dy.astype(np.float64)
    if stats is None:
        grads = ref.backward_batch_stats(g, x, weight)
    else:
        grads = ref.backward_running_stats(g, x, *stats, weight)
    return y, grads, g


def close(ours, theirs, dtype, scale=1.0):
    tol = TOLERANCE[np.dtype(dtype).type] * scale
    np.testing.assert_allclose(np.asarray(ours, np.float64), theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_training_pair_matches_the_reference(rng, name, dtype, activation, with_residual):
    x, residual, dy, weight, bias = inputs(rng, name, dtype)
    residual = residual if with_residual else None
    y, save_mean, save_invstd = nbf.batch_norm_forward_training(
        x, weight, bias, activation=activation, residual=residual)
    grads = nbf.batch_norm_backward(
        dy, x, weight, save_mean, save_invstd, activation=activation,
        y=y, residual=with_residual)
    assert len(grads) == 3 + with_residual
    y_ref, grads_ref, g = expected(x, residual, dy, weight, bias, activation)
    assert y.dtype == grads[0].dtype == dtype
    close(y, y_ref, dtype)
    if dtype == np.float16:
        # y rounds near 0 can flip the ReLU's mask: take it from our y, as
        # the backward does (and PyTorch's).
        g = dy.astype(np.float64) * (y > 0) if activation else g
        grads_ref = ref.backward_batch_stats(g, x, weight)
    close(grads[0], grads_ref[0], dtype, scale=4)
    n = x.size // x.shape[1]
    close(grads[1], grads_ref[1], dtype, scale=n ** 0.5)
    close(grads[2], grads_ref[2], dtype, scale=n ** 0.5)
    if with_residual:
        assert grads[3].dtype == dtype
        np.testing.assert_array_equal(grads[3], g.astype(dtype))


@pytest.mark.parametrize("name", ["nchw", "channels_last", "rows", "parallel_nchw"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_forward_matches_torch(rng, name, dtype):
    x, residual, _, weight, bias = inputs(rng, name, dtype)
    C = x.shape[1]
    running_mean = rng.normal(0.3, 0.2, C).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, C).astype(dtype)
    y = nbf.batch_norm(x, running_mean, running_var, weight, bias,
                       activation="relu", residual=residual)
    t = torch.from_numpy
    y_torch = F.relu(F.batch_norm(t(x), t(running_mean), t(running_var),
                                  t(weight), t(bias)) + t(residual))
    close(y, y_torch.numpy(), dtype, scale=5)
    y_ref, _, _ = expected(x, residual, residual, weight, bias, True,
                           (running_mean, running_var))
    close(y, y_ref, dtype)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_residual", [False, True])
def test_module_steps_match_torch(rng, channels_last, dtype, with_residual):
    """Training steps, then eval and frozen-style running statistics: the
    outputs, every gradient and the state against PyTorch's module followed
    by ``+ residual`` and ``relu``."""
    C = 3
    ours = nbn.BatchNorm2d(C, activation="relu", dtype=dtype)
    theirs = torch.nn.BatchNorm2d(C, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
    w, b = rng.normal(1, 0.5, C).astype(dtype), rng.normal(0, 1, C).astype(dtype)
    ours.load_state_dict({"weight": w, "bias": b}, strict=False)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(w))
        theirs.bias.copy_(torch.from_numpy(b))
    for step, mode in enumerate(["train", "train", "eval", "train"]):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = layout(rng.normal(step, 2.0, (4, C, 5, 6)).astype(dtype), channels_last)
        residual = rng.normal(0, 1, x.shape).astype(dtype) if with_residual else None
        dy = rng.normal(0, 1, x.shape).astype(dtype)
        y = ours(x, residual=residual)
        grads = ours.backward(dy)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        rt = torch.from_numpy(np.zeros_like(x) if residual is None else residual).requires_grad_(True)
        theirs.weight.grad = theirs.bias.grad = None
        y_t = F.relu(theirs(xt) + rt)
        y_t.backward(torch.from_numpy(dy))
        tol = 1e-4 if dtype == np.float32 else 1e-10
        check = lambda a, b: np.testing.assert_allclose(a, b.detach().numpy(), rtol=tol, atol=tol)
        check(y, y_t)
        if with_residual:
            dx, d_residual = grads
            check(d_residual, rt.grad)
        else:
            dx = grads
        check(dx, xt.grad)
        check(ours.grad_weight, theirs.weight.grad)
        check(ours.grad_bias, theirs.bias.grad)
        check(ours.running_mean, theirs.running_mean)
        check(ours.running_var, theirs.running_var)
    assert set(ours.state_dict()) == set(nbn.BatchNorm2d(C).state_dict())


def test_relu_gradient_at_exactly_zero_is_zero_as_in_torch():
    # Row 1 holds each channel's mean: bn + residual is exactly 0 there,
    # not a clamped negative.
    x = np.array([[-1.0, 0.0, 1.0], [2.0, 4.0, 6.0]], np.float32).T.copy()  # (3, 2)
    residual = np.array([[0.5, 0.5], [0.0, 0.0], [0.0, 0.0]], np.float32)
    dy = np.ones_like(x)
    y, mean, invstd = nbf.batch_norm_forward_training(
        x, None, None, activation="relu", residual=residual)
    assert (y[1] == 0).all() and (y[2] > 0).all()
    dx, _, _, d_residual = nbf.batch_norm_backward(
        dy, x, None, mean, invstd, activation="relu", y=y, residual=True)
    xt = torch.from_numpy(x).requires_grad_(True)
    rt = torch.from_numpy(residual).requires_grad_(True)
    F.relu(F.batch_norm(xt, None, None, training=True) + rt).backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(d_residual, rt.grad.numpy())
    assert (d_residual[1] == 0).all() and (d_residual[2] == 1).all()
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("name", ["nchw", "channels_last", "rows"])
def test_nan_propagates_through_the_relu_as_in_torch(rng, name):
    x, residual, dy, weight, bias = inputs(rng, name, np.float32)
    residual[(0, 1) + (0,) * (x.ndim - 2)] = np.nan
    y = nbf.batch_norm(x, None, None, weight, bias, training=True,
                       activation="relu", residual=residual)
    t = torch.from_numpy
    y_t = F.relu(F.batch_norm(t(x), None, None, t(weight), t(bias), training=True) + t(residual))
    assert np.isnan(y).sum() == 1
    np.testing.assert_allclose(y, y_t.numpy(), rtol=1e-4, atol=1e-4)  # NaN == NaN
    _, mean, invstd = nbf.batch_norm_forward_training(x, weight, bias)
    dx, _, _, d_residual = nbf.batch_norm_backward(
        dy, x, weight, mean, invstd, activation="relu", y=y, residual=True)
    # PyTorch's threshold_backward lets dy through where y is NaN.
    assert d_residual[(0, 1) + (0,) * (x.ndim - 2)] == dy[(0, 1) + (0,) * (x.ndim - 2)]


@pytest.mark.parametrize("channels_last", [False, True])
def test_out_may_be_the_residual_itself(rng, channels_last):
    x, residual, _, weight, bias = inputs(rng, "nchw", np.float32)
    residual = layout(residual, channels_last)
    y_ref, _, _ = expected(x, residual, residual, weight, bias, True)
    y = nbf.batch_norm(x, None, None, weight, bias, training=True,
                       activation="relu", residual=residual, out=residual)
    assert y is residual
    close(residual, y_ref, np.float32)


def test_out_overlapping_the_residual_otherwise_is_refused(rng):
    x, residual, _, weight, bias = inputs(rng, "nchw", np.float32)
    before = residual.copy()
    base = np.zeros((5,) + x.shape[1:], np.float32)
    with pytest.raises(ValueError, match="overlap"):
        nbf.batch_norm(x, None, None, weight, bias, training=True,
                       residual=base[:4], out=base[1:])
    with pytest.raises(ValueError, match="overlap"):
        nbf.batch_norm(x, None, None, weight, bias, training=True,
                       residual=residual, out=x)
    np.testing.assert_array_equal(residual, before)


def test_bad_activation_and_residual_are_refused_and_change_nothing(rng):
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        nbn.BatchNorm2d(3, activation="gelu")
    x, residual, dy, weight, bias = inputs(rng, "nchw", np.float32)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        nbf.batch_norm(x, None, None, training=True, activation="sigmoid")
    bn = nbn.BatchNorm2d(3, activation="relu")
    state = {k: np.copy(v) for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match=r"residual has shape \(4, 3, 5, 5\)"):
        bn(x, residual=residual[..., :5])
    with pytest.raises(TypeError, match="residual dtype float64"):
        bn(x, residual=residual.astype(np.float64))
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    _, mean, invstd = nbf.batch_norm_forward_training(x, weight, bias)
    with pytest.raises(ValueError, match="needs y="):
        nbf.batch_norm_backward(dy, x, weight, mean, invstd, activation="relu")


def test_activation_goes_wherever_the_module_goes(rng):
    bn = nbn.BatchNorm2d(3, activation="relu")
    assert "activation='relu'" in repr(bn)
    assert "activation" not in repr(nbn.BatchNorm2d(3))
    assert bn.to("cpu").activation == "relu"
    frozen = megengine.BatchNorm2d(3, freeze=True, activation="relu")
    assert "activation='relu'" in repr(frozen)
    sync = nbn.convert_sync_batchnorm(bn)
    assert sync.activation == "relu" and "activation='relu'" in repr(sync)
    # A frozen module normalizes with its running statistics, then the ReLU.
    x, residual, _, _, _ = inputs(rng, "nchw", np.float32)
    frozen.running_mean[:] = [0.1, 0.2, 0.3]
    y = frozen(x, residual=residual)
    y_ref, _, _ = expected(x, residual, residual, None, None, True,
                           (frozen.running_mean, frozen.running_var))
    close(y, y_ref, np.float32)
    assert frozen.backward(np.ones_like(x))[1].shape == x.shape
