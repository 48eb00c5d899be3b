"""Hard inputs: large means, NaN/inf, float16."""
import numpy as np
import pytest
import torch

import numba_bn as nbn

from . import reference as ref


def hard_input(rng, shape, mean=1e4, std=1.0):
    """Per-channel mean ``mean`` and std ``std``, float32."""
    c = shape[1]
    centers = mean * (1 + 0.1 * np.arange(c)).reshape((1, c) + (1,) * (len(shape) - 2))
    return (centers + rng.normal(0, std, shape)).astype(np.float32)


def max_rel_error(actual, expected):
    actual = np.asarray(actual, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_float32_no_worse_than_torch(rng, channels_last):
    x = hard_input(rng, (16, 8, 12, 12))
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    mean, var = ref.batch_stats(x)
    y_ref = ref.forward(x, mean, var)
    ours = max_rel_error(nbn.BatchNorm2d(8)(x), y_ref)
    xt = torch.from_numpy(x)
    if channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last)
    theirs = max_rel_error(torch.nn.BatchNorm2d(8)(xt).detach().numpy(), y_ref)
    assert ours <= max(theirs, 1e-6), (ours, theirs)
    assert ours <= 1e-6  # float32 output rounding, nothing more


@pytest.mark.parametrize("layout", ["nchw per-channel", "nchw two-pass",
                                    "channels_last", "rows"])
def test_large_mean_statistics_and_backward(rng, layout, monkeypatch):
    # float32 still holds std 1 at 1e6, where its mean rounds by up to 0.03:
    # each kernel family (planes per channel or in two passes, channels-last,
    # (N, C) rows) must not lose that in the forward's shift nor in the
    # backward's centering.
    from numba_bn import cpu
    if layout == "nchw two-pass":
        monkeypatch.setattr(cpu, "_PER_CHANNEL_BYTES", 0)
    if layout == "nchw per-channel":
        monkeypatch.setattr(cpu, "_PER_CHANNEL_SHORT_PLANE", 0)
    if layout == "rows":
        x = hard_input(rng, (4096, 4), mean=1e6)
    else:
        x = hard_input(rng, (32, 4, 9, 5), mean=1e6)
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    x[0] += np.float32(50.0)  # the first sample, an outlier
    dy = rng.normal(size=x.shape).astype(np.float32)
    bn = (nbn.BatchNorm1d if x.ndim == 2 else nbn.BatchNorm2d)(4)
    y = bn(x)
    mean, var = ref.batch_stats(x)
    np.testing.assert_allclose(bn.running_mean, 0.1 * mean, rtol=1e-6)
    n = x.size // 4
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * var * n / (n - 1), rtol=1e-6)
    assert max_rel_error(y, ref.forward(x, mean, var)) <= 1e-6
    dx_ref = ref.backward_batch_stats(dy, x)[0]
    assert max_rel_error(bn.backward(dy), dx_ref) <= 1e-5


def test_variance_of_float64_with_huge_offset(rng):
    x = 1e9 + rng.normal(0, 1e-3, (64, 3))
    _, _, invstd = nbn.batch_norm_forward_training(x, None, None, eps=1e-12)
    _, var = ref.batch_stats(x)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(var + 1e-12), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("training", [True, False])
def test_nan_and_inf_propagate_as_torch(bad, training, rng):
    x = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    x[1, 1, 0, 1] = bad
    ours = nbn.BatchNorm2d(3).train(training)
    theirs = torch.nn.BatchNorm2d(3).train(training)
    y = ours(x)
    y_t = theirs(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_t))
    finite = np.isfinite(y_t)
    np.testing.assert_allclose(y[finite], y_t[finite], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.isnan(ours.running_mean),
                                  np.isnan(theirs.running_mean.numpy()))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_infinite_running_mean_as_torch(layout, rng):
    # Eval with running statistics of inf, -inf and NaN, as PyTorch: an
    # element pass that folds or splits the mean (float32 coefficients with
    # a correction term) must not turn an infinite mean into NaN outputs.
    x = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    ours = nbn.BatchNorm2d(3).eval()
    theirs = torch.nn.BatchNorm2d(3).eval()
    bad = np.array([np.inf, -np.inf, np.nan], np.float32)
    ours.running_mean[:] = bad
    theirs.running_mean.copy_(torch.from_numpy(bad))
    y = ours(x)
    y_t = theirs(torch.from_numpy(x)).detach().numpy()
    assert np.isinf(y[:, :2]).all()
    np.testing.assert_array_equal(y, y_t)


def test_float16_statistics_accumulate_wide(rng):
    # 65536 values of ~1000 each: a float16 sum would overflow (max 65504).
    x = (1000 + rng.normal(0, 1, (256, 2, 16, 16))).astype(np.float16)
    bn = nbn.BatchNorm2d(2)
    y = bn(x)
    assert y.dtype == np.float16 and np.isfinite(y).all()
    mean, var = ref.batch_stats(x)
    np.testing.assert_allclose(y, ref.forward(x, mean, var), atol=1e-2)
    np.testing.assert_allclose(bn.running_mean, 0.1 * mean, rtol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
def test_message_sums_about_their_center(rng, layout):
    """The messages SyncBatchNorm exchanges hold float64 sums: forward about
    a sample of each channel, backward about the float64 center given, also
    one that float32 cannot hold."""
    from numba_bn import cpu
    x = hard_input(rng, (4096, 4) if layout == "rows" else (16, 4, 9, 5))
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    axes = (0,) + tuple(range(2, x.ndim))
    sample = x[(0, slice(None)) + (0,) * (x.ndim - 2)].astype(np.float64)
    center = x.astype(np.float64).mean(axis=axes) + 0.3 + 1e-9 * np.arange(4)
    dy = rng.normal(size=x.shape).astype(np.float32)
    for moments, k in ((True, sample), (False, center)):
        u = x.astype(np.float64) - k.reshape((1, 4) + (1,) * (x.ndim - 2))
        weight = u if moments else dy.astype(np.float64)
        gathered = np.full((3, 2 + (3 if moments else 2) * 4), np.nan)
        cpu.write_message(gathered, 1, x, x if moments else dy,
                          None if moments else center, moments)
        row = gathered[1]
        assert np.isnan(gathered[[0, 2]]).all()  # only its own row
        np.testing.assert_array_equal(row[:2], [1, x.size // 4])
        if moments:
            np.testing.assert_array_equal(row[2:6], sample)
        total, total_prod = row[-8:-4], row[-4:]
        np.testing.assert_allclose(total, weight.sum(axis=axes),
                                   rtol=1e-9, atol=1e-9 * x.size)
        # float64 sums: rounding far below float32's, relative to the
        # terms' magnitude (the total may cancel).
        terms = weight * u
        np.testing.assert_allclose(total_prod, terms.sum(axis=axes), rtol=0,
                                   atol=1e-12 * np.abs(terms).sum(axis=axes).max())
