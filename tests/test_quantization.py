import io
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from device_checks import implicit_device_trap, no_float64

from efficientml import MLP
from efficientml.compression import save_compressed
from efficientml.quantization import (CodebookArray, QuantizedArray, array_entry, array_from_entry, cpu_state_dict,
                                      dequantize, dequantized_model, dynamic_int8, kmeans_quantize, load_quantized,
                                      pack_codes, quantize, quantize_state_dict, save_quantized, serialized_size,
                                      sqnr_db, unpack_codes)


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
@example(x=np.array([9998.0, -9998.0], dtype=np.float32), bits=3, per_channel=False, scale=1.0)  # found by Hypothesis
def test_round_trip_error_is_at_most_half_a_step(x, bits, per_channel, scale):
    x = x * np.float32(scale)
    q = quantize(x, bits, axis=0 if per_channel else None)
    x_hat = dequantize(q)
    assert x_hat.dtype == np.float32 and x_hat.shape == x.shape
    assert q.codes.dtype == np.uint8 and q.codes.max() <= 2 ** bits - 1
    err = np.abs(x.astype(np.float64) - x_hat)
    bound = _step(q, x.ndim) / 2
    assert (err <= bound * (1 + 1e-5) + 1e-6 * np.abs(x)).all()
    # codes round-trip exactly, quantize(dequantize(q)) == q, where a channel's codes reach both
    # ends of the grid (0 and 2**bits - 1; an end that is the zero point, 0.0, is in every range
    # quantize sees): its dequantized range is then the grid's, and quantize
    # finds the same scale and zero point. Not elsewhere: (1) a channel whose dequantized values
    # are all equal (e.g. x = [0.006, 0.007] at 2 bits: both codes 3) is constant, which quantize
    # stores with its own exact encoding (code 1, scale = the value), so there the values must
    # round-trip; (2) where the zero point rounds at a tie, the top code can go unused (x =
    # [9998, -9998] at 3 bits: -min / scale = 3.4999998, zero point 3, max on code 6 not 7), and
    # the narrower dequantized range gets a grid of its own (its error bound is checked above)
    q2 = quantize(x_hat, bits, axis=q.axis)
    flat = x_hat.reshape(x_hat.shape[0], -1) if per_channel else x_hat.reshape(1, -1)
    codes, codes2 = (q.codes, q2.codes) if per_channel else (q.codes[None], q2.codes[None])
    codes, codes2 = codes.reshape(flat.shape), codes2.reshape(flat.shape)
    const = flat.min(1) == flat.max(1)
    zero = np.broadcast_to(np.asarray(q.zero_point).reshape(-1), const.shape)  # per channel
    spans = ((codes.min(1) == 0) | (zero == 0)) & ((codes.max(1) == 2 ** bits - 1) | (zero == 2 ** bits - 1)) & ~const
    np.testing.assert_array_equal(codes2[spans], codes[spans])
    np.testing.assert_array_equal(dequantize(q2).reshape(flat.shape)[const], flat[const])
    if spans.all():
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


# -- SQNR ---------------------------------------------------------------------------------------

def test_sqnr_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    x_hat = np.array([1.0, 2.0, 3.0, 5.0])      # signal 1 + 4 + 9 + 16 = 30, noise 1
    assert sqnr_db(x, x_hat) == pytest.approx(10 * np.log10(30.0), rel=1e-12)
    assert sqnr_db(torch.tensor(x), x_hat) == sqnr_db(x, torch.tensor(x_hat, dtype=torch.float64))
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(np.zeros(2), np.ones(2)) == float("-inf")
    assert sqnr_db(x, 2 * x) == pytest.approx(0.0, abs=1e-12)  # noise x: as loud as the signal


def test_sqnr_gains_about_6_db_per_bit_on_uniform_data_and_less_on_gaussian():
    rng = np.random.default_rng(0)
    uniform = rng.uniform(-1, 1, 100_000).astype(np.float32)
    gaussian = rng.normal(size=100_000).astype(np.float32)
    s = {b: sqnr_db(uniform, dequantize(quantize(uniform, b))) for b in (4, 8)}
    assert 5.5 <= (s[8] - s[4]) / 4 <= 6.5
    assert abs(s[8] - 6.02 * 8) < 1.0        # full-scale uniform data: the rule of thumb 6.02 dB/bit
    g8 = sqnr_db(gaussian, dequantize(quantize(gaussian, 8)))
    assert g8 < s[8] - 3                     # Gaussian tails stretch the range: below the rule


@pytest.mark.parametrize("args, err", [
    ((np.ones(3), np.ones(4)), ValueError),
    ((np.ones((2, 3)), np.ones((3, 2))), ValueError),
    ((np.ones(0), np.ones(0)), ValueError),
    ((np.array([1.0, np.nan]), np.ones(2)), ValueError),
    (([1.0, 2.0], np.ones(2)), TypeError),
    ((np.array(["a", "b"]), np.ones(2)), TypeError),
])
def test_sqnr_rejects_bad_input(args, err):
    with pytest.raises(err):
        sqnr_db(*args)


# -- k-means (codebook) quantization ------------------------------------------------------------

def lloyd_reference(x: np.ndarray, bits: int, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain NumPy Lloyd's algorithm: linear init over [min, max], nearest centroid (argmin takes the
    first, i.e. lower, index on ties), each centroid to the mean of its values (an empty one stays),
    exactly ``iters`` iterations (no early stop: a converged state is a fixed point anyway)."""
    v, k = x.astype(np.float64).ravel(), 2 ** bits
    c = v.min() + (v.max() - v.min()) * np.arange(k) / (k - 1)
    codes = np.argmin(np.abs(v[:, None] - c[None, :]), axis=1)
    for _ in range(iters):
        for j in range(k):
            if (codes == j).any():
                c[j] = v[codes == j].mean()
        codes = np.argmin(np.abs(v[:, None] - c[None, :]), axis=1)
    return codes.reshape(x.shape), c


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("iters", [0, 1, 5, 30])
def test_kmeans_agrees_with_a_plain_numpy_lloyd(bits, iters):
    x = np.random.default_rng(bits + 10 * iters).normal(size=(30, 50)).astype(np.float32)
    q = kmeans_quantize(x, bits, iters=iters)
    codes, centroids = lloyd_reference(x, bits, iters)
    assert q.codes.dtype == np.uint8 and q.codes.shape == x.shape
    assert q.codebook.dtype == np.float32 and q.codebook.shape == (2 ** bits,)
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_allclose(q.codebook, centroids.astype(np.float32), rtol=1e-6, atol=0)
    assert np.all(np.diff(q.codebook) >= 0)
    np.testing.assert_array_equal(dequantize(q), q.codebook[q.codes])


def test_kmeans_ties_go_to_the_lower_centroid():
    x = np.array([0.0, 1.0, 2.0], dtype=np.float32)  # 1 bit: centroids 0 and 2, and 1 is on their midpoint
    assert kmeans_quantize(x, 1, iters=0).codes.tolist() == [0, 0, 1]
    q = kmeans_quantize(x, 1)                          # then means 0.5 and 2: 1 stays with 0
    assert q.codes.tolist() == [0, 0, 1] and q.codebook.tolist() == [0.5, 2.0]
    np.testing.assert_array_equal(q.codes, lloyd_reference(x, 1, 30)[0])


def test_kmeans_numpy_and_torch_give_the_same_answer():
    t = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    qt, qn = kmeans_quantize(t, 4), kmeans_quantize(t.numpy(), 4)
    assert isinstance(qt.codes, torch.Tensor) and isinstance(qt.dequantize(), torch.Tensor)
    assert isinstance(qn.codes, np.ndarray) and qn.codes.flags.owndata and qn.codebook.flags.owndata
    np.testing.assert_array_equal(qt.codes.numpy(), qn.codes)
    np.testing.assert_array_equal(qt.codebook.numpy(), qn.codebook)
    assert qt.dequantize().dtype == torch.float32


@pytest.mark.parametrize("bits", range(1, 9))
def test_kmeans_error_is_at_most_linear_on_gaussian_data(bits):
    x = np.random.default_rng(bits).normal(size=20_000).astype(np.float32)
    mse_kmeans = np.mean((dequantize(kmeans_quantize(x, bits)) - x) ** 2)
    mse_linear = np.mean((dequantize(quantize(x, bits)) - x) ** 2)
    assert mse_kmeans <= mse_linear
    if bits <= 4:  # centroids crowd where the values are: far better at few bits
        assert mse_kmeans < 0.7 * mse_linear


@pytest.mark.parametrize("value", [0.0, 3.7, -2.1, 1e-30])
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_kmeans_constant_arrays_round_trip_exactly(value, bits):
    x = np.full((4, 5), value, dtype=np.float32)
    np.testing.assert_array_equal(kmeans_quantize(x, bits).dequantize(), x)


def test_kmeans_with_fewer_distinct_values_than_centroids():
    x = np.tile(np.array([-1.5, 0.25, 2.0], dtype=np.float32), 40)
    q = kmeans_quantize(x, 8)
    assert q.codebook.shape == (256,) and len(np.unique(q.codes)) == 3
    np.testing.assert_array_equal(q.dequantize(), x)


def test_kmeans_nbytes_counts_packed_codes_and_the_codebook():
    q = kmeans_quantize(np.random.default_rng(0).normal(size=1001).astype(np.float32), 4)
    assert q.nbytes == 501 + 4 * 16 == len(pack_codes(q.codes, 4)) + q.codebook.nbytes
    assert kmeans_quantize(torch.randn(10, 10), 2).nbytes == 25 + 16


@pytest.mark.parametrize("x, kw, err", [
    (np.array([], dtype=np.float32), {}, ValueError),
    (np.array([1.0, np.nan], dtype=np.float32), {}, ValueError),
    (np.array([1.0, np.inf], dtype=np.float32), {}, ValueError),
    (np.array([0.0, 1e300]), {}, ValueError),
    (np.array([1, 2, 3]), {}, TypeError),
    (torch.tensor([1, 2]), {}, TypeError),
    ([1.0, 2.0], {}, TypeError),
    (np.array(2.0, dtype=np.float32), {}, ValueError),
    (np.array([1.0, 2.0], dtype=np.float32), {"bits": 0}, ValueError),
    (np.array([1.0, 2.0], dtype=np.float32), {"bits": 9}, ValueError),
    (np.array([1.0, 2.0], dtype=np.float32), {"bits": 4.0}, TypeError),
    (np.array([1.0, 2.0], dtype=np.float32), {"iters": -1}, ValueError),
    (np.array([1.0, 2.0], dtype=np.float32), {"iters": 2.5}, ValueError),
])
def test_kmeans_rejects_bad_input(x, kw, err):
    with pytest.raises(err):
        kmeans_quantize(x, **kw)


# -- methods and packed files -------------------------------------------------------------------

def _saved(model, **kw) -> io.BytesIO:
    buf = io.BytesIO()
    save_quantized(model, buf, **kw)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("method, per_channel", [("linear", False), ("linear", True), ("symmetric", False),
                                                 ("symmetric", True), ("kmeans", False)])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packed_file_loads_as_the_dequantized_model(method, per_channel, bits):
    torch.manual_seed(0)
    model = MLP(784, (256, 128), 10)
    buf = _saved(model, bits=bits, per_channel=per_channel, method=method)
    saved = torch.load(buf, weights_only=True)
    for name, t in model.state_dict().items():  # the codes really take `bits` bits each
        assert saved["tensors"][name]["packed"].numel() == -(-t.numel() * bits // 8)
    buf.seek(0)
    loaded = load_quantized(MLP(784, (256, 128), 10), buf).state_dict()
    ref = dequantized_model(model, bits, per_channel=per_channel, method=method).state_dict()
    assert loaded.keys() == ref.keys()
    for name in ref:
        assert torch.equal(loaded[name], ref[name]), name
    qsd = quantize_state_dict(model, bits, per_channel=per_channel, method=method)
    assert all(isinstance(q, CodebookArray if method == "kmeans" else QuantizedArray) for q in qsd.values())


@pytest.mark.parametrize("method", ["linear", "kmeans"])
def test_packed_files_shrink_with_the_bits(method):
    torch.manual_seed(0)
    model = MLP(784, (256, 128), 10)
    fp32 = serialized_size(model)
    ratio = {b: fp32 / _saved(model, bits=b, method=method).getbuffer().nbytes for b in (8, 4, 2)}
    assert ratio[8] > 3.5 and ratio[4] > 7 and ratio[2] > 13
    assert ratio[8] < 4 and ratio[4] < 8 and ratio[2] < 16  # at most the ratio of the bits


def test_files_of_another_kind_are_rejected():
    torch.manual_seed(0)
    model = MLP(784, (256, 128), 10)
    qsd = quantize_state_dict(model, 4, per_channel=True)
    buf = io.BytesIO()  # the unpacked layout of before the packed format: one uint8 per code, no "format"
    torch.save({"bits": 4, "per_channel": True,
                "tensors": {n: {"codes": q.codes, "scale": q.scale, "zero_point": q.zero_point, "axis": q.axis}
                            for n, q in qsd.items()}}, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match="save_quantized"):
        load_quantized(MLP(784, (256, 128), 10), buf)
    buf = io.BytesIO()
    save_compressed(model, buf, bits=4)
    buf.seek(0)
    with pytest.raises(ValueError, match="save_quantized"):
        load_quantized(MLP(784, (256, 128), 10), buf)
    with pytest.raises(ValueError, match="does not have"):
        load_quantized(MLP(784, (128,), 10), _saved(model, bits=4))
    with pytest.raises(ValueError, match="entry"):
        array_from_entry({"codes": torch.zeros(3, dtype=torch.uint8)}, 8)
    with pytest.raises(TypeError):
        array_entry(torch.zeros(3))


@pytest.mark.parametrize("q", [quantize(torch.linspace(-1, 2, 35).reshape(5, 7), 3, axis=0),
                               quantize(np.linspace(-1, 2, 12, dtype=np.float32), 5, symmetric=True),
                               kmeans_quantize(torch.linspace(-1, 2, 35), 2)], ids=["per-channel", "numpy", "kmeans"])
def test_array_entry_round_trip(q):
    entry = array_entry(q)
    assert entry["shape"] == tuple(q.codes.shape)
    assert entry["packed"].dtype == torch.uint8
    assert entry["packed"].numel() == -(-math.prod(entry["shape"]) * q.bits // 8)
    back = array_from_entry(entry, q.bits)
    assert type(back) is type(q)
    assert np.array_equal(np.asarray(dequantize(back)), np.asarray(dequantize(q)))


def test_methods_reject_bad_combinations():
    model = MLP(20, (8,), 3)
    for fn in (quantize_state_dict, dequantized_model):
        with pytest.raises(ValueError, match="per tensor"):
            fn(model, 4, per_channel=True, method="kmeans")
        with pytest.raises(ValueError, match="method"):
            fn(model, 4, method="huffman")
    with pytest.raises(ValueError, match="method"):
        save_quantized(model, io.BytesIO(), 4, method="log")
    with pytest.raises(ValueError, match="at least 2 bits"):
        save_quantized(model, io.BytesIO(), 1, method="symmetric")
    with pytest.raises(ValueError):
        save_quantized(model, io.BytesIO(), 9, method="kmeans")
    with pytest.raises(TypeError):
        dequantize(np.zeros(3, np.uint8))


# -- devices: what runs on the data's device, what runs on the CPU, and files that load anywhere -----

def test_kmeans_works_on_the_inputs_device():
    x = torch.randn(500)
    ref = kmeans_quantize(x, 3)
    with implicit_device_trap():  # a tensor made without a device would not be on x's
        q = kmeans_quantize(x, 3)
    assert q.codes.device == x.device and q.codebook.device == x.device and q.codebook.dtype == torch.float32
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.codebook, ref.codebook)


def test_uniform_quantization_makes_no_float64_and_no_stray_device():
    w = torch.randn(6, 10)
    with implicit_device_trap(), no_float64():  # the path QAT runs on the training device (MPS too)
        for axis, symmetric in [(None, False), (0, False), (0, True)]:
            q = quantize(w, 4, axis=axis, symmetric=symmetric)
            w_hat = dequantize(q)
            assert w_hat.dtype == torch.float32 and (w_hat - w).abs().max() <= q.scale.max() / 2 * (1 + 1e-5)


def test_dequantize_puts_scales_and_codebooks_on_the_codes_device():
    # parameters read from a file are CPU tensors; the codes may be on the device (meta stands for it)
    q = quantize(torch.randn(4, 5), 4, axis=0)
    out = dequantize(QuantizedArray(q.codes.to("meta"), q.scale, q.zero_point, 4, 0))
    assert out.device.type == "meta" and out.shape == (4, 5)
    c = kmeans_quantize(torch.randn(20), 2)
    out = dequantize(CodebookArray(c.codes.to("meta"), c.codebook, 2))
    assert out.device.type == "meta" and out.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, a GPU's file loads without map_location")
def test_the_stand_in_for_a_gpu_file_needs_map_location(written_on_cuda):
    """The fixture the GPU-file tests use writes what a GPU writes: read without map_location
    on a machine without CUDA, it raises."""
    buf = written_on_cuda(lambda f: torch.save({"w": torch.ones(2)}, f))
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(buf, weights_only=True)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True, map_location="cpu")["w"], torch.ones(2))


def test_a_file_written_on_a_gpu_loads_on_the_cpu(written_on_cuda):
    torch.manual_seed(0)
    model = MLP(20, (8,), 3)
    buf = written_on_cuda(lambda f: save_quantized(model, f, bits=4, per_channel=True))
    loaded = load_quantized(MLP(20, (8,), 3), buf).state_dict()
    ref = dequantized_model(model, 4, per_channel=True).state_dict()
    assert all(torch.equal(loaded[n], ref[n]) for n in ref)


@pytest.mark.parametrize("method", ["linear", "kmeans"])
def test_save_quantized_writes_cpu_tensors_and_loading_keeps_the_models_device(method):
    buf = _saved(MLP(20, (8,), 3), bits=4, method=method)
    saved = torch.load(buf, weights_only=True)
    tensors = [v for entry in saved["tensors"].values() for v in entry.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    buf.seek(0)
    target = MLP(20, (8,), 3).to("meta")  # stands for a model on a GPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # copying CPU values into meta parameters warns
        load_quantized(target, buf)
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in target.parameters())


def test_cpu_state_dict_and_serialized_size():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    state = cpu_state_dict(model)
    assert list(state) == list(model.state_dict()) and state._metadata == model.state_dict()._metadata
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert serialized_size(model) == serialized_size(model.state_dict()) == buf.getbuffer().nbytes


def test_dynamic_int8_leaves_the_callers_model_as_it_was():
    torch.manual_seed(0)
    model = MLP(20, (8,), 3).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qm = dynamic_int8(model)
    assert model.training and not qm.training
    assert all(torch.equal(v, model.state_dict()[k]) and v.device == model.state_dict()[k].device
               for k, v in state.items())
    assert not list(qm.parameters())  # packed CPU weights: a CPU model
    with pytest.raises(TypeError):
        dynamic_int8({"weight": torch.ones(2, 2)})


def test_grid_histogram_and_sqnr_table_on_the_weights_device():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from efficientml.experiments.quantization import plot_grid_histogram, sqnr_table
    w = torch.randn(8, 30, requires_grad=True)
    with implicit_device_trap():
        ax = plot_grid_histogram(w, 2, channel=3)
        table = sqnr_table({"w": w.detach()}, [8, 4])
    assert len(ax.get_lines()) == 2 ** 2 + 2 ** 2 and table["w"][8] > table["w"][4]
    plt.close(ax.figure)


def test_quantization_over_seeds_runs_seed_after_seed(monkeypatch):
    from efficientml.experiments import quantization as experiment
    calls = []

    def train_mlp(s, out_dir, device, progress, tag):
        calls.append(("train", s["seed"], tag))
        return f"model{s['seed']}", f"hist{s['seed']}", f"loader{s['seed']}"

    def sweep(model, test_loader, bits):
        calls.append(("sweep", model, test_loader, bits))
        return {"model": model}

    monkeypatch.setattr(experiment, "train_mlp", train_mlp)
    monkeypatch.setattr(experiment, "quantization_sweep", sweep)
    s = {"seeds": [2, 0], "bits": [8, 4]}
    models, hists, sweeps, loader = experiment.quantization_over_seeds(s)
    assert calls == [("train", 2, "quantization-mlp-seed2"), ("sweep", "model2", "loader2", [8, 4]),
                     ("train", 0, "quantization-mlp-seed0"), ("sweep", "model0", "loader0", [8, 4])]
    assert models == ["model2", "model0"] and hists == ["hist2", "hist0"] and loader == "loader0"
    assert sweeps == [{"model": "model2"}, {"model": "model0"}]
    with pytest.raises(ValueError, match="seeds"):
        experiment.quantization_over_seeds({"seeds": [], "bits": [8]})
