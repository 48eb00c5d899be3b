"""Folding an eval-mode batch norm into the conv or linear layer before it,
against PyTorch's ``torch.nn.utils.fusion`` helpers and against running the
two layers one after the other."""
import numpy as np
import pytest
import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

import numba_bn as nbn


def conv2d(x, weight, bias):
    """A plain NumPy 'valid' convolution (cross-correlation, as PyTorch's),
    stride 1, float64."""
    kh, kw = weight.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(
        x.astype(np.float64), (kh, kw), axis=(2, 3))  # N, C, H', W', kh, kw
    y = np.einsum("nchwij,ocij->nohw", windows, weight.astype(np.float64))
    return y if bias is None else y + bias.astype(np.float64)[:, None, None]


def trained_bn(rng, channels, affine=True, dtype="float32"):
    bn = nbn.BatchNorm2d(channels, affine=affine, dtype=dtype)
    for _ in range(3):
        bn(rng.normal(2.0, 3.0, size=(4, channels, 5, 5)).astype(dtype))
    if affine:
        bn.weight[:] = rng.normal(size=channels)
        bn.bias[:] = rng.normal(size=channels)
    return bn.eval()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_matches_pytorchs_fuse_and_the_two_layers(rng, dtype, with_bias, affine):
    bn = trained_bn(rng, 4, affine, np.dtype(dtype).name)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(dtype)
    bias = rng.normal(size=4).astype(dtype) if with_bias else None
    folded_w, folded_b = nbn.fold_batch_norm(weight, bias, bn)
    assert folded_w.dtype == folded_b.dtype == dtype
    t = lambda a: None if a is None else torch.from_numpy(a)
    torch_w, torch_b = fuse_conv_bn_weights(
        t(weight), t(bias), t(bn.running_mean), t(bn.running_var), bn.eps,
        t(bn.weight), t(bn.bias))
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(folded_w, torch_w.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(folded_b, torch_b.detach().numpy(), rtol=tol, atol=tol)
    x = rng.normal(size=(2, 3, 7, 7)).astype(dtype)
    two_layers = bn(conv2d(x, weight, bias).astype(dtype))
    np.testing.assert_allclose(conv2d(x, folded_w, folded_b), two_layers,
                               rtol=20 * tol, atol=20 * tol)


def test_linear_matches_pytorchs_fuse(rng):
    bn = nbn.BatchNorm1d(5, dtype="float64").eval()
    bn.running_mean[:] = rng.normal(size=5)
    bn.running_var[:] = rng.random(5) + 0.5
    bn.weight[:] = rng.normal(size=5)
    weight, bias = rng.normal(size=(5, 3)), rng.normal(size=5)
    folded_w, folded_b = nbn.fold_batch_norm(weight, bias, bn)
    t = torch.from_numpy
    torch_w, torch_b = fuse_linear_bn_weights(
        t(weight), t(bias), t(bn.running_mean), t(bn.running_var), bn.eps,
        t(bn.weight), t(bn.bias))
    np.testing.assert_allclose(folded_w, torch_w.detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(folded_b, torch_b.detach().numpy(), rtol=1e-13)
    x = rng.normal(size=(6, 3))
    np.testing.assert_allclose(x @ folded_w.T + folded_b, bn(x @ weight.T + bias), rtol=1e-12)


def test_float16_weight_is_folded_in_float64(rng):
    bn = trained_bn(rng, 4)
    bn.running_var[:] = 1e-4  # a large scale: float16 arithmetic would round twice
    weight = rng.normal(size=(4, 2)).astype(np.float16)
    folded_w, folded_b = nbn.fold_batch_norm(weight, None, bn)
    assert folded_w.dtype == folded_b.dtype == np.float16
    exact = weight.astype(np.float64) * (bn.weight / np.sqrt(bn.running_var.astype(np.float64) + bn.eps))[:, None]
    np.testing.assert_array_equal(folded_w, exact.astype(np.float16))


def test_fold_leaves_the_module_alone_and_refuses_what_cannot_fold(rng):
    bn = trained_bn(rng, 4).train()
    state = {k: v.copy() for k, v in bn.state_dict().items()}
    nbn.fold_batch_norm(np.ones((4, 2), np.float32), None, bn)  # any mode
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    with pytest.raises(ValueError, match="track_running_stats=False"):
        nbn.fold_batch_norm(np.ones((4, 2), np.float32), None,
                            nbn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        nbn.fold_batch_norm(np.ones((3, 2), np.float32), None, bn)
    with pytest.raises(ValueError, match="bias must have shape"):
        nbn.fold_batch_norm(np.ones((4, 2), np.float32), np.ones(3, np.float32), bn)
    with pytest.raises(TypeError, match="batch norm"):
        nbn.fold_batch_norm(np.ones((4, 2), np.float32), None, object())
    with pytest.raises(TypeError, match="int64"):
        nbn.fold_batch_norm(np.ones((4, 2), np.int64), None, bn)
