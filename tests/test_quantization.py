import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from efficientml import MLP
from efficientml.quantization import (QuantizedArray, dequantize, dequantized_model, dynamic_int8, load_quantized,
                                      pack_codes, quantize, quantize_state_dict, save_quantized, serialized_size,
                                      unpack_codes)


def _step(q: QuantizedArray, ndim: int) -> np.ndarray:
    """Each value's quantization step, broadcast against the array."""
    s = np.asarray(q.scale, dtype=np.float64)
    if q.axis is None:
        return s
    return s.reshape([-1 if d == q.axis else 1 for d in range(ndim)])


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
shapes = st.one_of(st.tuples(st.integers(1, 50)), st.tuples(st.integers(1, 12), st.integers(1, 12)))


@settings(max_examples=150, deadline=None)
@given(x=arrays(np.float32, shapes, elements=finite), bits=st.integers(1, 8), per_channel=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_round_trip_error_is_at_most_half_a_step(x, bits, per_channel, scale):
    x = x * np.float32(scale)
    q = quantize(x, bits, axis=0 if per_channel else None)
    x_hat = dequantize(q)
    assert x_hat.dtype == np.float32 and x_hat.shape == x.shape
    assert q.codes.dtype == np.uint8 and q.codes.max() <= 2 ** bits - 1
    err = np.abs(x.astype(np.float64) - x_hat)
    bound = _step(q, x.ndim) / 2
    assert (err <= bound * (1 + 1e-5) + 1e-6 * np.abs(x)).all()
    # codes round-trip exactly: quantize(dequantize(q)) == q, except where the dequantized
    # values of a channel are all equal (e.g. x = [0.006, 0.007] at 2 bits: both codes 3): such
    # a channel is constant, which quantize stores with its own exact encoding (code 1, scale =
    # the value), so there the values, not the codes, must round-trip
    q2 = quantize(x_hat, bits, axis=q.axis)
    flat = x_hat.reshape(x_hat.shape[0], -1) if per_channel else x_hat.reshape(1, -1)
    const = flat.min(1) == flat.max(1)
    codes, codes2 = (q.codes, q2.codes) if per_channel else (q.codes[None], q2.codes[None])
    back = dequantize(q2).reshape(flat.shape)
    np.testing.assert_array_equal(codes2.reshape(flat.shape)[~const], codes.reshape(flat.shape)[~const])
    np.testing.assert_array_equal(back[const], flat[const])
    if not const.any():
        np.testing.assert_array_equal(q2.zero_point, q.zero_point)


def test_round_trip_of_a_grid_that_dequantizes_to_one_value():
    x = np.array([0.006, 0.007], dtype=np.float32)   # found by Hypothesis: both round to code 3
    q = quantize(x, 2)
    x_hat = dequantize(q)
    assert q.codes.tolist() == [3, 3] and x_hat[0] == x_hat[1]
    np.testing.assert_array_equal(dequantize(quantize(x_hat, 2)), x_hat)


@pytest.mark.parametrize("shape", [(1000,), (100, 10), (7, 3, 5)])
def test_codes_take_four_times_less_memory(shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    q = quantize(x)
    assert x.nbytes == 4 * q.codes.nbytes
    assert q.nbytes == q.codes.nbytes + 4 + 1  # plus one float32 scale and one uint8 zero point
    assert all(a.flags.owndata for a in (q.codes, q.scale, q.zero_point, dequantize(q)))  # no views of torch memory


def test_hand_computed_example():
    x = np.array([-1.0, 0.0, 0.5, 3.0], dtype=np.float32)  # range [-1, 3], 2 bits: 3 steps of 4/3
    q = quantize(x, bits=2)
    assert q.scale == pytest.approx(4 / 3) and q.zero_point == 1  # round(1 / (4/3)) = round(0.75) = 1
    np.testing.assert_array_equal(q.codes, [0, 1, 1, 3])        # round(x / s) + 1, clamped to 0..3
    np.testing.assert_allclose(dequantize(q), [-4 / 3, 0, 0, 8 / 3], rtol=1e-6)


def test_zero_is_exact_and_positive_data_widen_to_zero():
    x = np.array([0.0, 2.0, 5.0, 0.0], dtype=np.float32)
    q = quantize(x, bits=4)
    assert q.zero_point == 0 and dequantize(q)[0] == 0.0 and dequantize(q)[3] == 0.0


@pytest.mark.parametrize("value", [0.0, 3.7, -2.1, 1e-30])
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_constant_arrays_round_trip_exactly(value, bits):
    x = np.full((4, 5), value, dtype=np.float32)
    for axis in (None, 0, 1):
        q = quantize(x, bits, axis)
        assert np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)
        np.testing.assert_array_equal(dequantize(q), x)


def test_per_channel_scales_are_shaped_per_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 20)).astype(np.float32) * np.logspace(-2, 2, 6, dtype=np.float32)[:, None]
    q0, q1, qt = quantize(w, 8, axis=0), quantize(w, 8, axis=1), quantize(w, 8)
    assert q0.scale.shape == q0.zero_point.shape == (6,)
    assert q1.scale.shape == (20,) and qt.scale.shape == ()
    for i in range(6):  # each row's own scale is what quantizing that row alone gives
        assert q0.scale[i] == quantize(w[i], 8).scale
    # rows of very different size: per-channel is far more accurate on the small rows
    err_t = np.abs(dequantize(qt) - w)[0].max()
    err_c = np.abs(dequantize(q0) - w)[0].max()
    assert err_c < err_t / 100
    assert quantize(w, 8, axis=-2).axis == 0


def test_torch_tensors_in_torch_tensors_out():
    t = torch.randn(8, 4, 3, 3)
    q = quantize(t, 8, axis=0)
    assert isinstance(q.codes, torch.Tensor) and q.codes.dtype == torch.uint8 and q.scale.shape == (8,)
    back = dequantize(q)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
    assert (back - t).abs().max() <= q.scale.max() / 2 * (1 + 1e-5)
    np.testing.assert_array_equal(quantize(t.numpy(), 8, axis=0).codes, q.codes.numpy())  # same answer both ways


@pytest.mark.parametrize("x, kw, err", [
    (np.array([], dtype=np.float32), {}, ValueError),
    (np.zeros((0, 3), dtype=np.float32), {}, ValueError),
    (np.array([1.0, np.nan], dtype=np.float32), {}, ValueError),
    (np.array([1.0, np.inf], dtype=np.float32), {}, ValueError),
    (np.array([1, 2, 3]), {}, TypeError),
    (np.array([1.0, 2.0], dtype=np.float32), {"bits": 0}, ValueError),
    (np.array([1.0, 2.0], dtype=np.float32), {"bits": 9}, ValueError),
    (np.array([1.0, 2.0], dtype=np.float32), {"bits": 4.0}, TypeError),
    (np.array([1.0, 2.0], dtype=np.float32), {"bits": True}, TypeError),
    (np.array([1.0, 2.0], dtype=np.float32), {"axis": 1}, ValueError),
    (np.float32(2.0), {}, TypeError),
    (np.array(2.0, dtype=np.float32), {}, ValueError),
    ([1.0, 2.0], {}, TypeError),
    (torch.tensor([1, 2]), {}, TypeError),
])
def test_bad_input_is_rejected(x, kw, err):
    with pytest.raises(err):
        quantize(x, **kw)


@pytest.mark.parametrize("x, kw", [
    (np.array([0.0, 1e300]), {}),                                     # finite in float64, inf in float32
    (torch.tensor([-3e38, 3e38]), {}),                                # each fits float32, max - min does not
    (torch.tensor([[0.0, 1.0], [-3e38, 3e38]]), {"axis": 0}),         # one channel's range overflows
])
def test_ranges_beyond_float32_are_rejected_not_turned_into_nan(x, kw):
    with pytest.raises(ValueError, match="float32"):
        quantize(x, 8, **kw)


def test_dequantize_checks_its_input():
    with pytest.raises(TypeError):
        dequantize(np.zeros(3, np.uint8))
    q = quantize(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="uint8"):
        dequantize(QuantizedArray(q.codes.astype(np.int32), q.scale, q.zero_point, 8))


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_linear_layer_within_the_bound_from_its_scales(per_channel):
    torch.manual_seed(0)
    layer = nn.Linear(64, 16)
    x = torch.randn(32, 64)
    qw = quantize(layer.weight, 8, axis=0 if per_channel else None)
    qb = quantize(layer.bias, 8)
    y = layer(x)
    y_hat = x @ dequantize(qw).T + dequantize(qb)
    # |W_hat - W| <= s_w / 2 elementwise and |b_hat - b| <= s_b / 2, so for each output i:
    # |y_hat_i - y_i| <= (s_w,i / 2) * sum_j |x_j| + s_b / 2
    s_w = qw.scale.reshape(1, -1) if per_channel else qw.scale
    bound = s_w / 2 * x.abs().sum(1, keepdim=True) + qb.scale / 2
    assert ((y_hat - y).abs() <= bound * (1 + 1e-4) + 1e-5).all()
    assert (y_hat - y).abs().max() > 0  # it is an approximation, not the identity


def test_model_round_trip_and_real_storage():
    torch.manual_seed(0)
    model = MLP(784, (256, 128), 10)
    x = torch.randn(5, 1, 28, 28)
    for bits in (8, 4):
        qsd = quantize_state_dict(model, bits)
        assert set(qsd) == set(model.state_dict())
        m = dequantized_model(model, bits)
        for name, p in m.state_dict().items():
            ref = model.state_dict()[name]
            assert (p - ref).abs().max() <= qsd[name].scale / 2 * (1 + 1e-5)
        assert m is not model and not torch.equal(m(x), model(x))
    buf = io.BytesIO()
    save_quantized(model, buf, bits=8, per_channel=True)
    size_q, size_fp = buf.getbuffer().nbytes, serialized_size(model)
    assert size_q < size_fp / 3.5  # the codes are a quarter; scales, zero points and headers add a little
    buf.seek(0)
    loaded = load_quantized(MLP(784, (256, 128), 10), buf)
    torch.testing.assert_close(loaded(x), dequantized_model(model, 8, per_channel=True)(x))


def test_dynamic_int8_agrees_with_fp32():
    torch.manual_seed(0)
    model = MLP(784, (256, 128), 10).eval()
    x = torch.randn(64, 1, 28, 28)
    qm = dynamic_int8(model)
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, dynamic_linear) for m in qm.modules()) == 3
    assert not any(isinstance(m, dynamic_linear) for m in model.modules())  # the original is untouched
    ref, out = model(x), qm(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.9


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_pack_codes_round_trip_and_size(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** bits, size=1001).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-1001 * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, 1001), codes)


def test_pack_codes_layout_by_hand():
    # 4 bits: two codes per byte, first code in the high nibble; 2 bits: four per byte
    assert pack_codes(np.array([1, 2, 15, 0]), 4).tolist() == [0x12, 0xF0]
    assert pack_codes(np.array([3, 0, 1, 2, 1]), 2).tolist() == [0b11000110, 0b01000000]
    q = quantize(torch.linspace(-1, 1, 64), bits=4)
    np.testing.assert_array_equal(unpack_codes(pack_codes(q.codes, 4), 4, 64), q.codes.numpy())


def test_pack_codes_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="0..3"):
        pack_codes(np.array([0, 4]), 2)
    with pytest.raises(TypeError):
        pack_codes(np.array([0.5]), 2)
    with pytest.raises(ValueError):
        unpack_codes(np.zeros(1, np.uint8), 4, 3)  # one byte holds two 4-bit codes


# -- symmetric quantization ----------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [None, 0])
def test_symmetric_codes_error_and_zero(bits, axis):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(6, 50)).astype(np.float32)
    x[0, 0] = 0.0
    q = quantize(x, bits, axis=axis, symmetric=True)
    half = 2 ** (bits - 1)
    assert np.all(q.zero_point == half) and q.codes.min() >= 1 and q.codes.max() <= 2 ** bits - 1
    x_hat = dequantize(q)
    assert x_hat[0, 0] == 0.0                                             # 0 is exact
    amax = np.abs(x).max(axis=1, keepdims=True) if axis == 0 else np.abs(x).max()
    np.testing.assert_allclose(q.scale.reshape(-1 if axis == 0 else ()), (amax / (half - 1)).reshape(-1 if axis == 0 else ()),
                               rtol=1e-6)
    scale = q.scale.reshape(-1, 1) if axis == 0 else q.scale
    assert np.all(np.abs(x_hat - x) <= scale / 2 * (1 + 1e-5))
    np.testing.assert_array_equal(-dequantize(quantize(-x, bits, axis=axis, symmetric=True)), x_hat)  # odd function


def test_symmetric_matches_torch_qint8():
    torch.manual_seed(0)
    x = torch.randn(300)
    q = quantize(x, 8, symmetric=True)
    ref = torch.quantize_per_tensor(x, float(q.scale), 0, torch.qint8)
    np.testing.assert_array_equal(q.codes.to(torch.int32) - 128, ref.int_repr().to(torch.int32))


def test_symmetric_one_sided_data_uses_half_the_codes():
    x = np.linspace(0, 1, 1001, dtype=np.float32)
    sym, aff = quantize(x, 4, symmetric=True), quantize(x, 4)
    assert len(np.unique(sym.codes)) == 8 and len(np.unique(aff.codes)) == 16
    assert np.abs(dequantize(sym) - x).max() > 1.8 * np.abs(dequantize(aff) - x).max()


def test_symmetric_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 bits"):
        quantize(np.ones(3, np.float32), 1, symmetric=True)
    with pytest.raises(TypeError, match="symmetric"):
        quantize(np.ones(3, np.float32), 4, symmetric="yes")
    q = quantize(np.zeros(4, np.float32), 4, symmetric=True)
    assert np.all(dequantize(q) == 0)
