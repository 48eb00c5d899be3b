"""Modules, MegEngine compat, functional forms and state_dict against PyTorch's CPU build."""
import numpy as np
import pytest
import torch

import numba_bn as nbn
from numba_bn import megengine

from . import reference as ref

SHAPES = {
    nbn.BatchNorm1d: [(16, 5), (6, 5, 7)],
    nbn.BatchNorm2d: [(4, 5, 6, 7)],
    nbn.BatchNorm3d: [(2, 5, 3, 4, 5)],
}
TORCH = {nbn.BatchNorm1d: torch.nn.BatchNorm1d,
         nbn.BatchNorm2d: torch.nn.BatchNorm2d,
         nbn.BatchNorm3d: torch.nn.BatchNorm3d}
RTOL = {np.float32: 1e-4, np.float64: 1e-10}


def cases():
    for cls, shapes in SHAPES.items():
        for shape in shapes:
            yield cls, shape


def assert_close(ours, theirs, dtype):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    np.testing.assert_allclose(np.asarray(ours, np.float64),
                               np.asarray(theirs, np.float64),
                               rtol=RTOL[dtype], atol=RTOL[dtype])


def torch_step(module, x, dy):
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    if module.weight is not None:
        module.weight.grad = None
        module.bias.grad = None
    y = module(xt)
    y.backward(torch.from_numpy(dy))
    return y, xt.grad


def compare_states(ours, theirs, dtype):
    for key, value in theirs.state_dict().items():
        if key in ours.state_dict():
            assert_close(ours.state_dict()[key], value, dtype)
    if ours.num_batches_tracked is not None:
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@pytest.mark.parametrize("cls, shape", list(cases()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.1, None, 1.0])
@pytest.mark.parametrize("affine, track", [(True, True), (False, True),
                                           (True, False), (False, False)])
def test_module_matches_torch(cls, shape, dtype, momentum, affine, track, rng):
    C = shape[1]
    ours = cls(C, momentum=momentum, affine=affine, track_running_stats=track,
               dtype=dtype)
    theirs = TORCH[cls](C, momentum=momentum, affine=affine,
                        track_running_stats=track, dtype=torch.from_numpy(
                            np.zeros(0, dtype)).dtype)
    if affine:  # non-trivial parameters, identical on both sides
        w, b = rng.normal(1, 0.5, C).astype(dtype), rng.normal(0, 1, C).astype(dtype)
        ours.load_state_dict({"weight": w, "bias": b}, strict=False)
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(w))
            theirs.bias.copy_(torch.from_numpy(b))
    for step, mode in enumerate(["train", "train", "train", "eval", "train"]):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = rng.normal(3.0 * step, 2.0, shape).astype(dtype)
        dy = rng.normal(0, 1, shape).astype(dtype)
        y = ours(x)
        dx = ours.backward(dy)
        y_t, dx_t = torch_step(theirs, x, dy)
        assert y.dtype == dtype and dx.dtype == dtype
        assert_close(y, y_t, dtype)
        assert_close(dx, dx_t, dtype)
        if affine:
            assert_close(ours.grad_weight, theirs.weight.grad, dtype)
            assert_close(ours.grad_bias, theirs.bias.grad, dtype)
        else:
            assert ours.grad_weight is None and ours.grad_bias is None
        compare_states(ours, theirs, dtype)


@pytest.mark.parametrize("cls, shape", list(cases()))
def test_freeze_normalizes_with_running_stats_and_never_updates(cls, shape, rng):
    C = shape[1]
    state = {"weight": rng.normal(1, 0.3, C), "bias": rng.normal(0, 1, C),
             "running_mean": rng.normal(0, 1, C),
             "running_var": rng.uniform(0.5, 2, C),
             "num_batches_tracked": np.array(7)}
    ours = cls(C, freeze=True, dtype="float64")
    ours.load_state_dict(state)
    theirs = TORCH[cls](C, dtype=torch.float64).eval()  # frozen == eval maths
    theirs.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    x = rng.normal(2, 3, shape)
    dy = rng.normal(0, 1, shape)
    y, dx = ours(x), ours.backward(dy)  # training mode, yet frozen
    y_t, dx_t = torch_step(theirs, x, dy)
    assert_close(y, y_t, np.float64)
    assert_close(dx, dx_t, np.float64)
    assert ours.grad_weight is None and ours.grad_bias is None
    for key, value in state.items():
        np.testing.assert_array_equal(ours.state_dict()[key], value)


def test_freeze_requires_running_stats():
    with pytest.raises(ValueError, match="track_running_stats"):
        nbn.BatchNorm2d(3, track_running_stats=False, freeze=True)


def test_bias_false_keeps_weight_and_drops_bias(rng):
    ours = nbn.BatchNorm2d(3, bias=False, dtype="float64")
    assert ours.bias is None and ours.weight is not None
    assert sorted(ours.state_dict()) == ["num_batches_tracked", "running_mean",
                                         "running_var", "weight"]
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64)  # bias stays 0
    x, dy = rng.normal(size=(4, 3, 5, 5)), rng.normal(size=(4, 3, 5, 5))
    y, dx = ours(x), ours.backward(dy)
    y_t, dx_t = torch_step(theirs, x, dy)
    assert_close(y, y_t, np.float64)
    assert_close(dx, dx_t, np.float64)
    assert_close(ours.grad_weight, theirs.weight.grad, np.float64)
    assert ours.grad_bias is None


@pytest.mark.parametrize("cls", [megengine.BatchNorm1d, megengine.BatchNorm2d])
def test_megengine_momentum_is_torch_one_minus(cls, rng):
    shape = (8, 4) if cls is megengine.BatchNorm1d else (4, 4, 3, 3)
    ours = cls(4, momentum=0.75, dtype="float64")
    theirs = (torch.nn.BatchNorm1d if cls is megengine.BatchNorm1d
              else torch.nn.BatchNorm2d)(4, momentum=0.25, dtype=torch.float64)
    for _ in range(3):
        x = rng.normal(1, 2, shape)
        assert_close(ours(x), theirs(torch.from_numpy(x)), np.float64)
    compare_states(ours, theirs, np.float64)
    assert cls(4).momentum == 0.9  # MegEngine's default
    assert isinstance(cls(4), nbn.BatchNorm1d if cls is megengine.BatchNorm1d
                      else nbn.BatchNorm2d)


def test_megengine_freeze_is_positional_as_in_megengine():
    bn = megengine.BatchNorm2d(3, 1e-5, 0.9, True, True, True)
    assert bn.freeze


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_params", [True, False])
@pytest.mark.parametrize("shape", [(10, 3), (4, 3, 6), (3, 3, 4, 5)])
def test_functional_batch_norm_matches_torch(dtype, training, with_params, shape, rng):
    C = shape[1]
    x = rng.normal(5, 3, shape).astype(dtype)
    rm, rv = rng.normal(0, 1, C).astype(dtype), rng.uniform(1, 2, C).astype(dtype)
    w, b = (rng.normal(1, 1, C).astype(dtype), rng.normal(0, 1, C).astype(dtype)) \
        if with_params else (None, None)
    rm_t, rv_t = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    to_t = (lambda a: None if a is None else torch.from_numpy(a))
    y = nbn.batch_norm(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-3)
    y_t = torch.nn.functional.batch_norm(torch.from_numpy(x), rm_t, rv_t, to_t(w),
                                         to_t(b), training=training, momentum=0.3,
                                         eps=1e-3)
    assert_close(y, y_t, dtype)
    assert_close(rm, rm_t, dtype)
    assert_close(rv, rv_t, dtype)


def test_functional_training_without_buffers(rng):
    x = rng.normal(size=(5, 2, 3))
    y = nbn.batch_norm(x, None, None, training=True)
    y_t = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True)
    assert_close(y, y_t, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_explicit_training_pair_matches_torch_autograd(dtype, rng):
    shape = (4, 3, 5, 2)
    x = rng.normal(1, 2, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    w, b = rng.normal(1, 0.5, 3).astype(dtype), rng.normal(size=3).astype(dtype)
    y, mean, invstd = nbn.batch_norm_forward_training(x, w, b, 1e-5)
    dx, dw, db = nbn.batch_norm_backward(dy, x, w, mean, invstd)
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True)
    bt = torch.from_numpy(b).requires_grad_(True)
    y_t = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True)
    y_t.backward(torch.from_numpy(dy))
    for ours, theirs in [(y, y_t), (dx, xt.grad), (dw, wt.grad), (db, bt.grad)]:
        assert ours.dtype == dtype
        assert_close(ours, theirs, dtype)
    m_ref, v_ref = ref.batch_stats(x)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-6)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(v_ref + 1e-5), rtol=1e-6)
    _, dw_none, db_none = nbn.batch_norm_backward(dy, x, None, mean, invstd)
    assert dw_none is None and db_none is None


def test_state_dict_round_trips_with_torch(rng):
    theirs = torch.nn.BatchNorm2d(4)
    for _ in range(3):
        theirs(torch.randn(5, 4, 3, 3) * 2 + 1)
    ours = nbn.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())  # torch tensors, loaded directly
    for key, value in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[key], value.numpy())
    assert int(ours.num_batches_tracked) == 3
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    x = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
    ours.eval(), back.eval()
    assert_close(ours(x), back(torch.from_numpy(x)), np.float32)


def test_state_dict_keys_types_and_copies():
    bn = nbn.BatchNorm2d(3)
    state = bn.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var",
                          "num_batches_tracked"}
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert state["num_batches_tracked"].shape == () and state["num_batches_tracked"].dtype == np.int64
    state["weight"][:] = 5  # a copy: the module is unaffected
    np.testing.assert_array_equal(bn.weight, 1)
    assert "weight" not in nbn.BatchNorm2d(3, affine=False).state_dict()
    assert nbn.BatchNorm2d(3, track_running_stats=False).state_dict().keys() == {"weight", "bias"}


def test_old_checkpoint_without_num_batches_tracked_keeps_count(rng):
    bn = nbn.BatchNorm1d(2)
    bn(rng.normal(size=(4, 2)).astype(np.float32))
    state = bn.state_dict()
    del state["num_batches_tracked"]
    state["running_mean"] = np.array([7.0, 8.0])
    bn.load_state_dict(state)
    assert int(bn.num_batches_tracked) == 1
    np.testing.assert_array_equal(bn.running_mean, [7, 8])


def test_non_strict_load_ignores_unexpected_and_missing():
    bn = nbn.BatchNorm1d(2)
    bn.load_state_dict({"weight": [3, 4], "extra": [1]}, strict=False)
    np.testing.assert_array_equal(bn.weight, [3, 4])
    np.testing.assert_array_equal(bn.bias, [0, 0])


def test_resets_match_torch_defaults(rng):
    bn = nbn.BatchNorm2d(3)
    bn.load_state_dict({"weight": [2, 2, 2], "bias": [1, 1, 1],
                        "running_mean": [1, 1, 1], "running_var": [3, 3, 3],
                        "num_batches_tracked": np.array(4)})
    weight = bn.weight
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.weight, 2)
    bn.reset_parameters()
    assert bn.weight is weight  # in place, as PyTorch
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)


def test_attributes_and_modes_as_torch():
    bn = nbn.BatchNorm3d(6, eps=1e-3, momentum=None)
    theirs = torch.nn.BatchNorm3d(6, eps=1e-3, momentum=None)
    for name in ["num_features", "eps", "momentum", "affine",
                 "track_running_stats", "training"]:
        assert getattr(bn, name) == getattr(theirs, name), name
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.grad_weight is None and bn.grad_bias is None
    assert bn.freeze is False
    # PyTorch's fields, then where the parameters live.
    assert repr(bn) == repr(theirs)[:-1] + ", dtype=float32, device='cpu')"
    assert (repr(nbn.BatchNorm2d(3, affine=False))
            == repr(torch.nn.BatchNorm2d(3, affine=False))[:-1]
            + ", dtype=float32, device='cpu')")
    assert bn.running_mean.dtype == np.float32 and bn.num_batches_tracked.dtype == np.int64


def test_to_cpu_is_identity():
    bn = nbn.BatchNorm2d(2)
    assert bn.to("cpu") is bn and bn.device == "cpu"
    with pytest.raises(ValueError, match="device"):
        bn.to("tpu")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eval_backward_reads_no_x(layout):
    """With running statistics dx = dy * weight / sqrt(running_var + eps):
    NaN and inf in x reach grad_weight, as in PyTorch, never dx."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    x[0, 0, 1, 1], x[2, 1, 0, 3] = np.nan, np.inf
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = rng.normal(size=x.shape).astype(np.float32)
    ours = nbn.BatchNorm2d(3).eval()
    theirs = torch.nn.BatchNorm2d(3).eval()
    xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    theirs(xt).backward(torch.from_numpy(np.ascontiguousarray(dy)))
    ours(x)
    dx = ours.backward(dy)
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(np.isnan(ours.grad_weight),
                                  np.isnan(theirs.weight.grad.numpy()))
