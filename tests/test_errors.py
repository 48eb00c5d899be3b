"""Every row of API.md's error table: the error type, the words, and no state change."""
import re

import numpy as np
import pytest
import torch

import numba_bn as nbn

from . import reference as ref
from .conftest import TOLERANCE


def snapshot(bn):
    state = {k: v.copy() for k, v in bn.state_dict().items()}
    return state, bn.grad_weight, bn.grad_bias


def assert_unchanged(bn, before):
    state, grad_weight, grad_bias = before
    after = bn.state_dict()
    assert after.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(after[key], state[key])
    assert bn.grad_weight is grad_weight and bn.grad_bias is grad_bias


@pytest.fixture
def trained(rng):
    bn = nbn.BatchNorm2d(3, momentum=None)
    bn(rng.normal(size=(2, 3, 4, 4)).astype(np.float32))
    bn.backward(np.ones((2, 3, 4, 4), np.float32))
    return bn


BAD_FORWARD = [
    # (input, error, words)
    (np.zeros((2, 3, 4), np.float32), ValueError, r"expected 4D input \(got 3D input\)"),
    (np.zeros((2, 3, 4, 4, 1), np.float32), ValueError, r"expected 4D input \(got 5D input\)"),
    (np.zeros((2, 4, 4, 4), np.float32), ValueError, r"3 channels.*4 channels"),
    (np.zeros((1, 3, 1, 1), np.float32), ValueError, "Expected more than 1 value per channel when training"),
    (np.zeros((2, 3, 4, 4), np.int32), TypeError, "int32"),
    (np.zeros((2, 3, 4, 4), bool), TypeError, "bool"),
    (np.zeros((2, 3, 4, 4), np.complex64), TypeError, "complex64"),
    (np.zeros((2, 3, 4, 4), object), TypeError, "object"),
    (np.zeros((2, 3, 4, 4), np.float64), TypeError, "float64.*float32"),
    ([[[[1.0]]]], TypeError, "numpy.ndarray"),
    (torch.zeros(2, 3, 4, 4), TypeError, "numpy.ndarray"),
]


@pytest.mark.parametrize("x, error, words", BAD_FORWARD)
def test_bad_forward_input_raises_and_changes_nothing(trained, x, error, words):
    before = snapshot(trained)
    saved = trained._saved
    with pytest.raises(error, match=words):
        trained(x)
    assert_unchanged(trained, before)
    assert trained._saved is saved


def test_bn1d_rank_message():
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        nbn.BatchNorm1d(3)(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"expected 5D input \(got 4D input\)"):
        nbn.BatchNorm3d(3)(np.zeros((2, 3, 4, 4), np.float32))


def test_single_value_per_channel_is_fine_with_running_stats():
    x = np.full((1, 3, 1, 1), 2.0, np.float32)
    np.testing.assert_allclose(nbn.BatchNorm2d(3).eval()(x), 2 / np.sqrt(1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(nbn.BatchNorm2d(3, freeze=True)(x), 2 / np.sqrt(1 + 1e-5), rtol=1e-6)
    with pytest.raises(ValueError, match="more than 1 value"):
        nbn.BatchNorm2d(3, track_running_stats=False).eval()(x)
    with pytest.raises(ValueError, match="more than 1 value"):
        nbn.BatchNorm1d(3)(np.zeros((1, 3), np.float32))


def test_float16_input_with_float32_parameters_is_mixed_precision(rng):
    x = rng.normal(size=(4, 3, 2, 2)).astype(np.float16)
    y = nbn.BatchNorm2d(3)(x)
    assert y.dtype == np.float16
    with pytest.raises(TypeError, match="float32.*float16|float16.*float64"):
        nbn.BatchNorm2d(3, dtype="float64")(x)
    with pytest.raises(TypeError, match="float32.*float16"):
        nbn.BatchNorm2d(3, dtype="float16")(x.astype(np.float32))


def test_module_without_parameters_accepts_any_float_dtype(rng):
    bn = nbn.BatchNorm2d(3, affine=False, track_running_stats=False)
    assert bn(rng.normal(size=(2, 3, 2, 2))).dtype == np.float64


def test_parameter_on_other_device_names_to():
    class CudaArray:  # any object with __cuda_array_interface__ is a GPU array
        __cuda_array_interface__ = {}
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=r"weight is on cuda.*\.to\('cpu'\)"):
        nbn.batch_norm(np.zeros((2, 3)), rm, rv, weight=CudaArray())


def test_backward_errors(trained, rng):
    fresh = nbn.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="before any forward"):
        fresh.backward(np.zeros((2, 3, 4, 4), np.float32))
    before = snapshot(trained)
    with pytest.raises(ValueError, match="shape"):
        trained.backward(np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        trained.backward(np.zeros((2, 3, 4, 4), np.float64))
    assert_unchanged(trained, before)


@pytest.mark.parametrize("kwargs, words", [
    ({"num_features": 0}, "num_features"),
    ({"num_features": -2}, "num_features"),
    ({"num_features": 3, "eps": 0.0}, "eps"),
    ({"num_features": 3, "eps": -1e-5}, "eps"),
    ({"num_features": 3, "momentum": -0.1}, "momentum"),
    ({"num_features": 3, "momentum": 1.5}, "momentum"),
    ({"num_features": 3, "device": "gpu"}, "device"),
])
def test_construction_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        nbn.BatchNorm2d(**kwargs)


def test_construction_type_errors():
    with pytest.raises(TypeError, match="num_features"):
        nbn.BatchNorm2d(3.5)
    with pytest.raises(TypeError, match="dtype"):
        nbn.BatchNorm2d(3, dtype="int32")


def test_momentum_bounds_are_inclusive():
    nbn.BatchNorm2d(3, momentum=0.0)
    nbn.BatchNorm2d(3, momentum=1.0)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"running_mean": np.zeros(4)}, ValueError, r"running_mean must have shape \(3,\)"),
    ({"running_var": np.ones(2)}, ValueError, r"running_var must have shape \(3,\)"),
    ({"weight": np.ones(4)}, ValueError, r"weight must have shape \(3,\)"),
    ({"bias": np.ones((3, 1))}, ValueError, r"bias must have shape \(3,\)"),
    ({"weight": np.ones(3, np.float32)}, TypeError, "float64.*float32"),
    ({"running_mean": None, "running_var": None}, ValueError, "required when training=False"),
    ({"running_var": None}, ValueError, "both"),
    ({"weight": [1.0, 1.0, 1.0]}, TypeError, "numpy.ndarray"),
])
def test_functional_errors_leave_buffers_alone(kwargs, error, words):
    args = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    args.update(kwargs)
    kept = {k: None if v is None else np.array(v, copy=True) for k, v in args.items()}
    with pytest.raises(error, match=words):
        nbn.batch_norm(np.ones((4, 3)), **args)
    for key, value in args.items():
        if value is not None:
            np.testing.assert_array_equal(value, kept[key])


def test_functional_training_single_value_per_channel():
    rm = np.zeros(3)
    with pytest.raises(ValueError, match="more than 1 value"):
        nbn.batch_norm(np.ones((1, 3)), rm, np.ones(3), training=True)
    np.testing.assert_array_equal(rm, 0)


def test_functional_does_not_range_check_momentum(rng):
    rm, rv = np.zeros(2), np.ones(2)
    x = rng.normal(size=(5, 2))
    nbn.batch_norm(x, rm, rv, training=True, momentum=2.0)
    rm_t, rv_t = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    torch.nn.functional.batch_norm(torch.from_numpy(x), rm_t, rv_t, training=True, momentum=2.0)
    np.testing.assert_allclose(rm, rm_t.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rv, rv_t.numpy(), rtol=1e-12)


def test_explicit_pair_errors(rng):
    x = rng.normal(size=(4, 3))
    y, mean, invstd = nbn.batch_norm_forward_training(x, None, None)
    with pytest.raises(ValueError, match="shape"):
        nbn.batch_norm_backward(np.ones((4, 2)), x, None, mean, invstd)
    with pytest.raises(ValueError, match="save_mean"):
        nbn.batch_norm_backward(np.ones((4, 3)), x, None, mean[:2], invstd)
    with pytest.raises(ValueError, match="more than 1 value"):
        nbn.batch_norm_forward_training(np.ones((1, 3)), None, None)


def test_load_state_dict_is_all_or_nothing():
    bn = nbn.BatchNorm1d(3)
    before = snapshot(bn)
    good = {"weight": [2, 2, 2], "bias": [1, 1, 1], "running_mean": [1, 1, 1],
            "running_var": [2, 2, 2], "num_batches_tracked": np.array(3)}
    for bad, words in [({**good, "running_var": [1, 1]}, "running_var must have shape"),
                       ({**good, "num_batches_tracked": [3]}, "num_batches_tracked must have shape"),
                       ({k: v for k, v in good.items() if k != "bias"}, "missing keys"),
                       ({**good, "stray": [0]}, "unexpected keys")]:
        with pytest.raises(ValueError, match=words):
            bn.load_state_dict(bad)
        assert_unchanged(bn, before)
    with pytest.raises(ValueError, match="must have shape"):
        bn.load_state_dict({**good, "running_var": [1, 1]}, strict=False)
    assert_unchanged(bn, before)


def test_empty_batch_returns_empty_and_changes_nothing(trained):
    before = snapshot(trained)
    x = np.zeros((0, 3, 4, 4), np.float32)
    y = trained(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert_unchanged(trained, before)
    dx = trained.backward(np.zeros_like(x))
    assert dx.shape == x.shape
    np.testing.assert_array_equal(trained.grad_weight, 0)
    np.testing.assert_array_equal(trained.grad_bias, 0)
    assert nbn.batch_norm(np.zeros((0, 2)), None, None, training=True).shape == (0, 2)


def test_cuda_tensor_requiring_grad_is_told_to_detach():
    class RequiresGrad:  # what torch.Tensor does for a CUDA tensor with requires_grad
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't export tensors that require gradient, use tensor.detach()")
    with pytest.raises(TypeError, match=r"detach\(\)"):
        nbn.BatchNorm2d(3)(RequiresGrad())


def test_cuda_without_a_gpu_raises_numba_bns_error(monkeypatch):
    """device='cuda' and .to('cuda') name the extras, not Numba's driver
    message, where no GPU is usable (this machine, unless a GPU is lent)."""
    from numba_bn import cuda as backend
    monkeypatch.setattr(backend, "_SIMULATOR", False)
    monkeypatch.setattr(backend, "_gpu_usable", lambda: False)
    with pytest.raises(RuntimeError, match=r"numba_bn\[cuda12\].*numba_bn\[cuda13\]"):
        nbn.BatchNorm2d(3, device="cuda")
    bn = nbn.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="cuda13"):
        bn.to("cuda")
    assert bn.device == "cpu" and isinstance(bn.weight, np.ndarray)


@pytest.mark.parametrize("module, torch_module, shape", [
    (nbn.BatchNorm1d, torch.nn.BatchNorm1d, (3,)),
    (nbn.BatchNorm1d, torch.nn.BatchNorm1d, (2, 3, 4, 5)),
    (nbn.BatchNorm2d, torch.nn.BatchNorm2d, (2, 3, 4)),
    (nbn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 4, 5)),
])
def test_wrong_rank_in_pytorchs_words(module, torch_module, shape):
    with pytest.raises(ValueError) as theirs:
        torch_module(3)(torch.ones(shape))
    with pytest.raises(ValueError) as ours:
        module(3)(np.ones(shape, np.float32))
    assert str(ours.value) == str(theirs.value)


def test_dtype_mismatch_names_both_dtypes_and_fixes_that_work():
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float64)
    with pytest.raises(TypeError) as error:
        nbn.BatchNorm1d(3)(x)
    message = str(error.value)
    assert "float64" in message and "float32" in message
    assert "dtype='float64'" in message and "x.astype(numpy.float32)" in message
    expected = torch.nn.BatchNorm1d(3)(torch.from_numpy(x).float()).detach().numpy()
    np.testing.assert_allclose(nbn.BatchNorm1d(3, dtype="float64")(x), expected, atol=1e-5)
    np.testing.assert_allclose(nbn.BatchNorm1d(3)(x.astype(np.float32)), expected, atol=1e-5)


@pytest.mark.parametrize("module, nhwc_shape, axes", [
    (nbn.BatchNorm1d, (4, 5, 3), (0, 2, 1)),
    (nbn.BatchNorm2d, (4, 5, 6, 3), (0, 3, 1, 2)),
    (nbn.BatchNorm3d, (2, 5, 6, 2, 3), (0, 4, 1, 2, 3)),
])
def test_channels_last_data_passed_as_is_gets_the_transpose(module, nhwc_shape, axes):
    nhwc = np.random.default_rng(0).normal(size=nhwc_shape).astype(np.float32)
    with pytest.raises(ValueError, match=re.escape(f"x.transpose{axes}")):
        module(3)(nhwc)
    y = module(3)(nhwc.transpose(axes))     # the advice, followed
    ncl = torch.from_numpy(np.ascontiguousarray(nhwc.transpose(axes)))
    torch_module = {nbn.BatchNorm1d: torch.nn.BatchNorm1d, nbn.BatchNorm2d: torch.nn.BatchNorm2d,
                    nbn.BatchNorm3d: torch.nn.BatchNorm3d}[module]
    np.testing.assert_allclose(y, torch_module(3)(ncl).detach().numpy(), atol=1e-5)


def test_torch_tensors_get_advice_that_works():
    t = torch.randn(4, 3, 2, 2, requires_grad=True)
    with pytest.raises(TypeError, match=r"t\.detach\(\)\.numpy\(\)"):
        nbn.BatchNorm2d(3)(t)
    y = nbn.BatchNorm2d(3)(t.detach().numpy())
    np.testing.assert_allclose(y, torch.nn.BatchNorm2d(3)(t).detach().numpy(), atol=1e-5)


def test_repr_shows_pytorchs_fields_dtype_and_device():
    text = repr(nbn.BatchNorm2d(8, dtype="float64"))
    assert text.startswith(repr(torch.nn.BatchNorm2d(8))[:-1] + ", ")
    assert text.endswith(", dtype=float64, device='cpu')")


# (shape, channels-last, dtype) reaching each way the CPU backward sums x:
# planes of small inputs, one kernel per channel (long planes in the
# cache), channel-innermost rows, rows of several positions ((N, C)), and
# the parallel kernels of larger inputs in both layouts.
CHANGED_INPUTS = [((4, 3, 5, 6), False, np.float32),
                  ((3, 2, 40, 40), False, np.float64),
                  ((4, 6, 5, 7), True, np.float32),
                  ((64, 5), False, np.float16),
                  ((8, 4, 64, 64), False, np.float32),
                  ((8, 4, 64, 64), True, np.float64)]


def _layout(x, channels_last):
    if not channels_last:
        return x
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("shape, channels_last, dtype", CHANGED_INPUTS)
def test_input_changed_between_forward_and_backward_raises(rng, shape, channels_last, dtype):
    x = _layout(rng.normal(1e3, 2.0, size=shape).astype(dtype), channels_last)
    dy = rng.normal(size=shape).astype(dtype)
    module = nbn.BatchNorm1d if len(shape) == 2 else nbn.BatchNorm2d
    bn = module(shape[1], dtype=np.float32 if dtype == np.float16 else dtype)
    bn.weight[:] = rng.normal(size=shape[1])
    # The first value of a channel (the forward sums about it), one in the
    # middle and the last, each changed by an ordinary amount (a quarter of
    # the spread) and put back.
    positions = [(0, 1) + (0,) * (len(shape) - 2), tuple(s // 2 for s in shape),
                 tuple(s - 1 for s in shape)]
    for index in positions:
        bn(x)
        before = snapshot(bn)
        value = x[index]
        x[index] = value + dtype(0.5)
        with pytest.raises(RuntimeError, match="changed in place before backward"):
            bn.backward(dy)
        assert_unchanged(bn, before)
        x[index] = value
    bn(x)
    dx = bn.backward(dy)  # unchanged: no error, the reference's gradient
    expected = ref.backward_batch_stats(dy, x, bn.weight)
    np.testing.assert_allclose(dx, expected[0], rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype] * np.abs(expected[0]).max())


def test_pytorch_refuses_an_input_changed_in_place_too(rng):
    x = torch.from_numpy(rng.normal(size=(4, 3, 2, 2)).astype(np.float32))
    leaf = torch.ones(3, requires_grad=True)
    y = torch.nn.functional.batch_norm(x, None, None, leaf, None, training=True)
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_nothing_to_detect_with_running_statistics_or_the_functional_pair(rng):
    x = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    bn = nbn.BatchNorm2d(3).eval()
    bn(x)
    x[0, 0, 0, 0] += 10  # eval-mode dx does not depend on x
    np.testing.assert_allclose(bn.backward(dy), dy / np.sqrt(1 + 1e-5), rtol=1e-6)
    # The functional backward takes the caller's statistics as they are.
    mean = np.zeros(3)
    dx, _, _ = nbn.batch_norm_backward(dy, x, None, mean, np.ones(3))
    assert np.isfinite(dx).all()
