"""The serving chapter's engine (efficientml.serving): tiled attention against naive attention and
PyTorch's scaled_dot_product_attention, the KV cache's bytes, speculative decoding's output and
distribution."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from efficientml import serving
from efficientml.transformer import LanguageModel, attention, causal_mask


@pytest.mark.parametrize("t_q,t_k,tile", [(1, 1, 64), (5, 5, 2), (13, 13, 4), (37, 37, 16), (3, 20, 7),
                                          (64, 64, 64), (65, 65, 64), (10, 100, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_attention_equals_naive(t_q, t_k, tile, causal):
    g = torch.Generator().manual_seed(t_q * 1000 + t_k)
    q, k, v = (torch.randn(2, 3, t, 8, generator=g) * 3 for t in (t_q, t_k, t_k))
    mask = None
    if causal:   # query i is position t_k - t_q + i: it sees keys up to there
        mask = torch.ones(t_q, t_k, dtype=torch.bool).tril(diagonal=t_k - t_q)
    want, _ = attention(q.double(), k.double(), v.double(), mask)
    # the algorithm is exact: in float64 the two agree to float64 rounding
    exact = serving.tiled_attention(q.double(), k.double(), v.double(), causal=causal, tile=tile)
    torch.testing.assert_close(exact, want, rtol=1e-12, atol=1e-12)
    # in float32 (scores up to about 100 here) both round; tiled stays within 1e-4 of float64
    got = serving.tiled_attention(q, k, v, causal=causal, tile=tile)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
    assert got.shape == (2, 3, t_q, 8) and got.dtype == torch.float32


def test_tiled_attention_agrees_with_scaled_dot_product_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 50, 16, generator=g) for _ in range(3))
    for causal in (False, True):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(serving.tiled_attention(q, k, v, causal=causal, tile=16), want,
                                   rtol=1e-5, atol=1e-5)
    v2 = torch.randn(4, 2, 50, 5, generator=g)      # d_v may differ from d_k
    torch.testing.assert_close(serving.tiled_attention(q, k, v2, tile=9),
                               attention(q, k, v2)[0], rtol=1e-5, atol=1e-5)


def test_tiled_attention_survives_large_scores():
    # scores of +-1000: a softmax without subtracting the running maximum would overflow to inf/nan
    q = torch.tensor([[[30.0, 0.0], [-30.0, 5.0]]])
    k = torch.tensor([[[30.0, 0.0], [0.0, 30.0], [-30.0, 0.0]]])
    v = torch.tensor([[[1.0], [2.0], [3.0]]])
    got = serving.tiled_attention(q, k, v, tile=1)
    torch.testing.assert_close(got, attention(q, k, v)[0])
    assert torch.isfinite(got).all()


def test_tiled_attention_rejects_bad_input():
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError):
        serving.tiled_attention(q, torch.randn(1, 4, 6), torch.randn(1, 4, 8))       # d_k differs
    with pytest.raises(ValueError):
        serving.tiled_attention(q, torch.randn(1, 4, 8), torch.randn(1, 5, 8))       # lengths differ
    with pytest.raises(ValueError):
        serving.tiled_attention(q, q, q, tile=0)
    with pytest.raises(ValueError):
        serving.tiled_attention(torch.randn(1, 5, 8), q, q, causal=True)             # T_q > T_k


def test_kv_cache_formula_equals_the_caches_the_model_fills():
    torch.manual_seed(0)
    model = LanguageModel(11, 24, 3, 2, 32, 0.0, max_len=40).eval()
    caches = [{} for _ in model.layers]
    with torch.no_grad():
        model(torch.randint(0, 11, (3, 9)), caches=caches)
        model(torch.randint(0, 11, (3, 1)), start=9, caches=caches)
    assert serving.cache_bytes(caches) == serving.kv_cache_bytes(2, 24, 10, batch=3) == 2 * 2 * 3 * 10 * 24 * 4
    with pytest.raises(ValueError):
        serving.kv_cache_bytes(2, 24, -1)


def _models(vocab=7, seed=0, max_len=64):
    torch.manual_seed(seed)
    target = LanguageModel(vocab, 32, 2, 2, 64, 0.0, max_len=max_len)
    draft = LanguageModel(vocab, 16, 2, 1, 32, 0.0, max_len=max_len)
    return target, draft


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_decoding_equals_the_targets_greedy_output(k):
    target, draft = _models()
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        prompt = torch.randint(0, 7, (1, int(torch.randint(1, 6, (1,), generator=g))), generator=g)
        want = target.generate(prompt, 12, temperature=0)
        got, stats = serving.speculative_generate(target, draft, prompt, 12, k=k)
        assert torch.equal(got, want)
        assert stats.rounds <= 12 and 0 <= stats.accepted <= stats.proposed
        assert stats.accepted + stats.rounds == 12     # each round: its accepted tokens + 1


def test_the_target_as_its_own_draft_accepts_everything():
    target, _ = _models()
    _, stats = serving.speculative_generate(target, target, torch.tensor([[1, 2]]), 13, k=4)
    assert stats.acceptance == 1.0 and stats.rounds == 3 and stats.tokens_per_round == 13 / 3  # 5 + 5 + 3


def _target_joint(target, prompt, n, vocab):
    """Exact probabilities of every continuation of n tokens under the target at temperature 1."""
    probs = {}
    with torch.no_grad():
        for cont in itertools.product(range(vocab), repeat=n):
            seq = torch.cat([prompt, torch.tensor([cont])], dim=1)
            logp = target(seq)[0, prompt.shape[1] - 1:-1].log_softmax(-1)
            probs[cont] = logp[torch.arange(n), torch.tensor(cont)].sum().exp().item()
    return probs


def _chi_square(counts, probs, n):
    return sum((counts.get(c, 0) - n * p) ** 2 / (n * p) for c, p in probs.items())


def test_sampled_speculative_decoding_follows_the_targets_distribution():
    vocab, n, samples = 3, 3, 2000
    target, draft = _models(vocab=vocab, seed=3)
    prompt = torch.tensor([[0, 1]])
    exact = _target_joint(target, prompt, n, vocab)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    counts, drafted = {}, {}
    accepted = proposed = 0
    for _ in range(samples):
        out, stats = serving.speculative_generate(target, draft, prompt, n, k=2, temperature=1.0, generator=g)
        c = tuple(out[0, 2:].tolist())
        counts[c] = counts.get(c, 0) + 1
        accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
        d = tuple(draft.generate(prompt, n, temperature=1.0, generator=g)[0, 2:].tolist())
        drafted[d] = drafted.get(d, 0) + 1
    # 27 cells, 26 degrees of freedom: chi-square above 54.1 has probability 0.001 under the target
    assert _chi_square(counts, exact, samples) < 54.1
    # and the test can fail: the draft's own samples, a different distribution, are rejected
    assert _chi_square(drafted, exact, samples) > 54.1
    assert 0 < accepted < proposed      # the draft is neither always right nor always wrong


def test_speculative_decoding_rejects_bad_input():
    target, draft = _models()
    other = LanguageModel(9, 16, 2, 1, 32, 0.0, max_len=64)
    p = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="vocabulary"):
        serving.speculative_generate(target, other, p, 4)
    with pytest.raises(ValueError):
        serving.speculative_generate(target, draft, torch.tensor([[1], [2]]), 4)      # two sequences
    with pytest.raises(ValueError):
        serving.speculative_generate(target, draft, p, 4, k=0)
    with pytest.raises(ValueError, match="context"):
        serving.speculative_generate(target, draft, p, 62, k=4)
    with pytest.raises(TypeError):
        serving.speculative_generate(target, draft, p.float(), 4)


def test_groupwise_codes_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 12, generator=g)
    q = serving.quantize_groupwise(w, 3, 4)
    back = serving.dequantize_groupwise(q, (6, 12))
    for r in range(6):
        for c0 in range(0, 12, 4):
            group = w[r, c0:c0 + 4]
            lo, hi = min(group.min().item(), 0.0), max(group.max().item(), 0.0)
            scale = (hi - lo) / 7
            zero = round(-lo / scale)
            for c in range(c0, c0 + 4):
                code = min(max(round(w[r, c].item() / scale) + zero, 0), 7)
                assert back[r, c].item() == pytest.approx((code - zero) * scale, abs=1e-6)
    assert (back - w).abs().max() <= 0.5 * q.scale.max() + 1e-6
    assert q.scale.shape == (18,)                              # one scale per group


def test_smaller_groups_and_more_bits_quantize_better():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    err = {(b, gs): (serving.rtn(w, b, gs) - w).pow(2).mean().item() for b in (2, 4, 8) for gs in (16, 128)}
    assert err[(8, 16)] < err[(4, 16)] < err[(2, 16)]
    assert all(err[(b, 16)] < err[(b, 128)] for b in (2, 4, 8))


def test_awq_never_loses_to_rtn_and_wins_on_a_salient_channel():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=g)
    x = torch.randn(256, 32, generator=g)
    x[:, 3] *= 50                     # one input channel carries large activations
    s, alpha, err = serving.awq_scales(w, x, 3, 32)
    rtn_err = ((x @ (serving.rtn(w, 3, 32) - w).T) ** 2).mean().item()
    assert err <= rtn_err and alpha > 0 and err < 0.7 * rtn_err
    assert s[3] == s.max()            # the salient channel is scaled up most
    s0, alpha0, err0 = serving.awq_scales(w, x, 3, 32, grid=(0.0,))
    assert alpha0 == 0 and err0 == pytest.approx(rtn_err) and torch.allclose(s0, torch.ones(32))


def test_quantize_weights_on_a_language_model():
    torch.manual_seed(0)
    model = LanguageModel(11, 16, 2, 1, 32, 0.0, max_len=16)
    tokens = [torch.randint(0, 11, (4, 16)) for _ in range(2)]
    calib = serving.linear_inputs(model, tokens)
    assert set(calib) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert calib["out"].shape == (128, 16)                    # 2 batches of 4 x 16 tokens, d = 16
    rtn_model, awq_model = copy.deepcopy(model), copy.deepcopy(model)
    r = serving.quantize_weights(rtn_model, 3, 8, "rtn", calib)
    a = serving.quantize_weights(awq_model, 3, 8, "awq", calib)
    assert all(a[n]["error"] <= r[n]["error"] + 1e-9 for n in r)
    for name, m in rtn_model.named_modules():
        if isinstance(m, torch.nn.Linear):   # at most 2^3 distinct values per group of 8
            groups = m.weight.reshape(-1, 8)
            assert max(len(set(row.tolist())) for row in groups) <= 8
    with pytest.raises(ValueError, match="divide"):
        serving.quantize_weights(copy.deepcopy(model), 4, 5)
    with pytest.raises(ValueError):
        serving.quantize_weights(copy.deepcopy(model), 1, 8)
    with pytest.raises(ValueError, match="calibration"):
        serving.quantize_weights(copy.deepcopy(model), 4, 8, "awq")


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_kernels_compute_the_dequantized_product(bits):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(2, 5, 64)
    if bits == 8:
        q = serving.Int8WeightLinear.from_linear(lin)
        w = q.dequantized_weight()
        assert (w - lin.weight).abs().max() <= q.scales.max() / 2 + 1e-6
    else:
        q = serving.Int4WeightLinear.from_linear(lin, group_size=32)
        w = serving.rtn(lin.weight, 4, 32)            # the book's group-wise 4-bit weights
    torch.testing.assert_close(q(x), x @ w.T + lin.bias, rtol=1e-4, atol=1e-4)


def test_weight_only_model_is_smaller_and_close():
    torch.manual_seed(0)
    model = LanguageModel(11, 64, 2, 1, 128, 0.0, max_len=16).eval()
    x = torch.randint(0, 11, (2, 16))
    with torch.no_grad():
        ref = model(x)
        m8, m4 = serving.weight_only_model(model, 8), serving.weight_only_model(model, 4, 32)
        assert not any(isinstance(m, torch.nn.Linear) for m in m8.modules())
        # at 4 bits the output layer (11 outputs, not a multiple of 16) stays float32
        assert isinstance(m4.out, torch.nn.Linear) and isinstance(m4.layers[0].ff.linear1, serving.Int4WeightLinear)
        assert (m8(x) - ref).abs().max() < 0.05 and (m4(x) - ref).abs().max() < 0.5
    b32, b8, b4 = (serving.weight_bytes(m) for m in (model, m8, m4))
    assert b4 < b8 < b32
    with pytest.raises(ValueError):
        serving.weight_only_model(model, 3)
    with pytest.raises(ValueError, match="multiple of 16"):
        serving.Int4WeightLinear.from_linear(torch.nn.Linear(64, 24))


# -- GPTQ -------------------------------------------------------------------------------------

def _obs_reference(w, x, bits, group, damp):
    """GPTQ written as the Optimal Brain Surgeon update with the inverse Hessian itself (no
    Cholesky factor), in float64: quantize column i, move the later columns by
    -(w_i - q_i) / Hinv_ii * Hinv_i,:, then remove i from Hinv (Frantar et al., 2023, eqs. 2-3)."""
    from efficientml.quantization import quantize
    x, w = x.double(), w.double().clone()
    h = 2 * x.T @ x / x.shape[0]
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    qmax = 2 ** bits - 1
    for i in range(w.shape[1]):
        if i % group == 0:
            qa = quantize(w[:, i:i + group].float(), bits, axis=0)
            scale, zero = qa.scale.double(), qa.zero_point.double()
        q = (torch.clamp(torch.round(w[:, i] / scale) + zero, 0, qmax) - zero) * scale
        d = hinv[i, i]
        w[:, i:] -= ((w[:, i] - q) / d)[:, None] * hinv[i, i:][None, :]
        w[:, i] = q                                                   # (equal already, to rounding)
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / d
    return w.float()


@pytest.mark.parametrize("bits,group", [(3, 8), (2, 16), (4, 4)])
def test_gptq_equals_the_optimal_brain_surgeon_update(bits, group):
    g = torch.Generator().manual_seed(bits * 100 + group)
    w = torch.randn(6, 16, generator=g)
    mix = torch.randn(16, 16, generator=g)
    x = torch.randn(200, 16, generator=g) @ mix                 # correlated inputs: errors move
    got = serving.gptq(w, x, bits, group)
    want = _obs_reference(w, x, bits, group, serving.GPTQ_DAMP)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, serving.rtn(w, bits, group))      # it is not round to nearest
    for i in range(0, 16, group):                                    # each group of a row: on a grid
        assert max(len(set(r.tolist())) for r in got[:, i:i + group]) <= 2 ** bits


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest_and_otherwise_beats_it():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g)
    x = torch.eye(32).repeat(4, 1) * 3.0                          # H a multiple of I: nothing to spread
    torch.testing.assert_close(serving.gptq(w, x, 3, 8), serving.rtn(w, 3, 8), rtol=0, atol=1e-6)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(16, 32, generator=g)
        x = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)
        err = lambda wq: ((x @ (wq - w).T) ** 2).mean().item()   # noqa: E731
        assert err(serving.gptq(w, x, 3, 8)) < err(serving.rtn(w, 3, 8))


def test_gptq_rejects_bad_input_and_handles_dead_inputs():
    w, x = torch.randn(4, 16), torch.randn(32, 16)
    for bad in (dict(bits=1), dict(bits=9), dict(group_size=5)):
        with pytest.raises(ValueError):
            serving.gptq(w, x, **({"bits": 3, "group_size": 8} | bad))
    with pytest.raises(ValueError, match="calibration"):
        serving.gptq(w, torch.randn(32, 8), 3, 8)
    x[:, 3] = 0                                                  # an input that is never nonzero
    q = serving.gptq(w, x, 3, 8)
    assert torch.isfinite(q).all() and (q[:, 3] == 0).all()


def test_quantize_weights_gptq_lowers_every_layers_error():
    torch.manual_seed(0)
    model = LanguageModel(11, 16, 2, 1, 32, 0.0, max_len=16)
    calib = serving.linear_inputs(model, [torch.randint(0, 11, (4, 16)) for _ in range(2)])
    r = serving.quantize_weights(copy.deepcopy(model), 3, 8, "rtn", calib)
    gq = serving.quantize_weights(copy.deepcopy(model), 3, 8, "gptq", calib)
    assert all(gq[n]["error"] <= r[n]["error"] + 1e-9 for n in r)
    with pytest.raises(ValueError, match="calibration"):
        serving.quantize_weights(copy.deepcopy(model), 3, 8, "gptq")
    with pytest.raises(ValueError, match="method"):
        serving.quantize_weights(copy.deepcopy(model), 3, 8, "gptq2", calib)


# -- The packed file --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_groupwise_file_round_trips_and_has_the_packed_size(bits, tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(11, 32, 2, 2, 64, 0.0, max_len=16)
    path = tmp_path / "model.pt"
    serving.save_groupwise(model, path, bits, 16)
    want = copy.deepcopy(model)
    serving.quantize_weights(want, bits, 16)
    back = serving.load_groupwise(LanguageModel(11, 32, 2, 2, 64, 0.0, max_len=16), path)
    for (name, a), b in zip(back.state_dict().items(), want.state_dict().values()):
        assert torch.equal(a, b), name
    saved = torch.load(path, weights_only=True)
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    codes = sum(e["packed"].numel() for e in saved["tensors"].values())
    assert codes == sum(-(-w.numel() * bits // 8) for w in linear)   # bits per weight, bytes rounded up
    groups = sum(w.numel() // 16 for w in linear)                     # a float32 scale, a uint8 zero each
    assert sum(e["scale"].numel() * 4 + e["zero_point"].numel() for e in saved["tensors"].values()) == 5 * groups


def test_groupwise_file_rejects_other_files_and_models(tmp_path):
    model = LanguageModel(11, 32, 2, 1, 64, 0.0, max_len=16)
    torch.save({"format": 2}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="save_groupwise"):
        serving.load_groupwise(model, tmp_path / "other.pt")
    serving.save_groupwise(LanguageModel(11, 32, 2, 2, 64, 0.0, max_len=16), tmp_path / "two.pt", 4, 16)
    with pytest.raises(ValueError, match="does not have"):
        serving.load_groupwise(model, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="divide"):
        serving.save_groupwise(model, tmp_path / "x.pt", 4, 5)


def test_weight_bytes_counts_dynamically_quantized_layers():
    from efficientml.quantization import dynamic_int8
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    q = dynamic_int8(model)
    # int8 weights, float32 biases, 16 bytes of scale and zero point per layer
    assert serving.weight_bytes(q) == (64 * 32 + 32 * 8) + 4 * (32 + 8) + 2 * 16
    assert serving.weight_bytes(model) == 4 * (64 * 32 + 32 * 8 + 32 + 8)


# -- The chapter's experiment (efficientml.experiments.serving), on tiny settings ---------------

def _tiny_settings():
    from efficientml.experiments import serving as ex
    return ex.serving_settings() | dict(bits=[8, 2], groups=[8, 16], calibrated_bits=[2], calibration_batches=1,
                                        calibration_batch_size=4, calibration_seeds=[0, 1], eval_batches=2,
                                        eval_batch_size=4, block_size=16, spec_ks=[1, 3], spec_prompts=3,
                                        spec_prompt_len=4, spec_tokens=8, attention_lengths=[16, 64],
                                        attention_heads=2, attention_d_head=8, attention_tile=16,
                                        speed_model=dict(d_model=32, n_heads=2, n_layers=1, d_ff=64),
                                        prompt_len=4, decode_tokens=3, int4_group=32)


def test_quantization_sweep_rows():
    from efficientml.experiments import serving as ex
    s = _tiny_settings()
    torch.manual_seed(0)
    model = LanguageModel(11, 16, 2, 1, 32, 0.0, max_len=16).eval()
    tokens = torch.randint(0, 11, (500,))
    windows = {"a": ex.eval_windows(tokens, s, 0), "b": ex.eval_windows(tokens, s, 1)}
    cal = [ex.calibration_inputs(model, tokens, s, i) for i in s["calibration_seeds"]]
    rows = ex.quantization_sweep(model, windows, cal, s)
    # per group: 2 RTN rows; at 2 bits, AWQ and GPTQ with each of 2 calibration sets
    assert len(rows) == 2 * (2 + 2 * 2)
    assert {(r["method"], r["seed"]) for r in rows if r["bits"] == 2} == {
        ("rtn", None), ("awq", 0), ("awq", 1), ("gptq", 0), ("gptq", 1)}
    fp32 = ex.loss_nats(model, windows["a"])
    eight = [r["a"] for r in rows if r["bits"] == 8]
    assert all(abs(v - fp32) < 0.01 for v in eight) and all(r["b"] > 0 for r in rows)
    sizes = ex.packed_sizes(model, [8, 2], 8)
    from efficientml.quantization import serialized_size
    assert sizes[2]["bytes"] < sizes[8]["bytes"] < serialized_size(model)
    assert all(v["round_trip"] for v in sizes.values())


def test_decode_timing_and_speed_variants():
    from efficientml.experiments import serving as ex
    s = _tiny_settings()
    model = ex.speed_model(s, 11)
    prompt = torch.randint(0, 11, (1, s["prompt_len"]))
    variants = ex.speed_variants(model, s["int4_group"])
    assert tuple(variants) == ex.SPEED_VARIANTS
    with torch.no_grad():
        ref = model(prompt)
        for name, m in variants.items():
            assert (m(prompt).float() - ref).abs().max() < 0.5, name
    t = ex.decode_timing(model, prompt, s["decode_tokens"], min_run_time=0.01)
    assert t["decode_s"] > 0 and t["prefill_tokens_per_s"] == pytest.approx(s["prompt_len"] / t["prefill_s"])
    with pytest.raises(ValueError, match="context"):
        ex.decode_timing(model, prompt, model.max_len)


def test_speculative_sweep_and_attention_memory():
    from efficientml.experiments import serving as ex
    s = _tiny_settings()
    torch.manual_seed(0)
    target = LanguageModel(11, 16, 2, 2, 32, 0.0, max_len=16).eval()
    draft = LanguageModel(11, 16, 2, 1, 32, 0.0, max_len=16).eval()
    prompts = ex.spec_prompts(torch.randint(0, 11, (100,)), s)
    assert len(prompts) == 3 and all(p.shape == (1, 4) for p in prompts)
    out = ex.speculative_sweep(target, draft, prompts, s)
    assert set(out["k"]) == {1, 3} and all(r["same_as_target"] for r in out["k"].values())
    assert all(0 <= r["acceptance"] <= 1 and 1 <= r["tokens_per_round"] <= k + 1 for k, r in out["k"].items())
    sampled = ex.speculative_sweep(target, draft, prompts, s, temperature=1.0)
    assert all(r["same_as_target"] is None for r in sampled["k"].values())
    mem = ex.attention_memory(s)
    assert [r["length"] for r in mem] == [16, 64] and all(r["max_diff"] < 1e-5 for r in mem)
    assert mem[1]["naive"] > mem[1]["tiled"]          # the 64 x 64 scores: 2 heads, 32 KiB, and softmax's copy


def test_check_tiled_attention_rejects_wrong_and_naive_versions(capsys):
    serving.check_tiled_attention(serving.tiled_attention)
    assert "equal to naive attention" in capsys.readouterr().out

    def naive(q, k, v, causal=False, tile=64):          # right values, but the whole matrix of scores
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(k.shape[-2] - q.shape[-2])
        return attention(q, k, v, mask if causal else None)[0]

    with pytest.raises(AssertionError, match="matrix of scores"):
        serving.check_tiled_attention(naive)

    def no_offset(q, k, v, causal=False, tile=64):       # causal mask from position 0: wrong when T_q < T_k
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        return attention(q, k, v, mask if causal else None)[0]

    with pytest.raises(AssertionError, match="T_q=3, T_k=20"):
        serving.check_tiled_attention(no_offset)
    with pytest.raises(AssertionError, match="shape"):
        serving.check_tiled_attention(lambda q, k, v, causal=False, tile=64: q[..., :1])


# -- An n-gram table as the draft -------------------------------------------------------------

def test_ngram_draft_gives_the_smoothed_counts():
    tokens = torch.tensor([0, 1, 2, 1, 2, 1, 0, 1, 2, 2])
    bigram = serving.NGramDraft.from_tokens(tokens, 3, n=2, alpha=0.5)
    # after token 1 came 2, 2, 0, 2: (count + 0.5) / (4 + 1.5)
    logp = bigram(torch.tensor([[0, 1]]))
    torch.testing.assert_close(logp[0, 1].exp(), torch.tensor([1.5, 0.5, 3.5]) / 5.5)
    # after token 0 came 1, 1: position 0's context is token 0
    torch.testing.assert_close(logp[0, 0].exp(), torch.tensor([0.5, 2.5, 0.5]) / 3.5)
    trigram = serving.NGramDraft.from_tokens(tokens, 3, n=3, alpha=1.0)
    # after (2, 1) came 2 and 0; at position 0 the context is (0 padded, token)
    logp = trigram(torch.tensor([[2, 1]]))
    torch.testing.assert_close(logp[0, 1].exp(), torch.tensor([2.0, 1.0, 2.0]) / 5)
    torch.testing.assert_close(logp[0, 0].exp(), torch.full((3,), 1 / 3))      # (0, 2): never seen
    assert logp.shape == (1, 2, 3) and torch.allclose(logp.exp().sum(-1), torch.ones(1, 2))
    for bad in (dict(n=0), dict(alpha=0.0)):
        with pytest.raises(ValueError):
            serving.NGramDraft.from_tokens(tokens, 3, **bad)
    with pytest.raises(ValueError):
        serving.NGramDraft.from_tokens(tokens, 2)                             # token 2 outside 0..1
    with pytest.raises(TypeError):
        serving.NGramDraft.from_tokens(tokens.float(), 3)


def test_speculative_decoding_with_an_ngram_draft():
    torch.manual_seed(0)
    target = LanguageModel(11, 16, 2, 2, 32, 0.0, max_len=40).eval()
    text = torch.randint(0, 11, (500,))
    draft = serving.NGramDraft.from_tokens(text, 11, n=3)
    prompt = text[:5][None]
    got, stats = serving.speculative_generate(target, draft, prompt, 20, k=3)
    assert torch.equal(got, target.generate(prompt, 20, temperature=0))
    assert stats.proposed > 0 and 1 <= stats.tokens_per_round <= 4
    sampled, _ = serving.speculative_generate(target, draft, prompt, 20, k=3, temperature=1.0,
                                              generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (1, 25)
    with pytest.raises(ValueError, match="vocabulary"):
        serving.speculative_generate(target, serving.NGramDraft.from_tokens(text, 12), prompt, 5)
