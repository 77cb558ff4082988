import math

import pytest
import torch

from efficientml.data import CharTokenizer, SequenceTask, TokenBatches, split_tokens
from efficientml.train import LN2, evaluate, fit
from device_checks import implicit_device_trap, no_float64, package_device_trap
from efficientml.transformer import (DecoderLayer, EncoderLayer, FeedForward, LanguageModel, MatmulCounter,
                                     MultiHeadAttention, PositionalEncoding, Transformer, WordEmbedding,
                                     attention, causal_mask, generation_attention_macs, matmuls_per_inference,
                                     padding_mask, positional_shift_matrix, sinusoidal_encoding)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small(per_head=False, **kw):
    return Transformer(13, 11, d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.0, max_len=32,
                       per_head=per_head, **kw).eval()


# -- shapes through every module -----------------------------------------------------------

def test_shapes():
    x = torch.randn(3, 7, 32)
    tokens = torch.randint(1, 13, (3, 7))
    assert WordEmbedding(13, 32)(tokens).shape == (3, 7, 32)
    assert PositionalEncoding(32, 16)(x).shape == (3, 7, 32)
    mha = MultiHeadAttention(32, 4)
    assert mha(x).shape == (3, 7, 32) and mha.weights.shape == (3, 4, 7, 7)
    assert mha(x, context=torch.randn(3, 5, 32)).shape == (3, 7, 32) and mha.weights.shape == (3, 4, 7, 5)
    assert FeedForward(32, 64)(x).shape == (3, 7, 32)
    assert EncoderLayer(32, 4, 64)(x).shape == (3, 7, 32)
    assert DecoderLayer(32, 4, 64)(x, torch.randn(3, 5, 32)).shape == (3, 7, 32)
    model = small()
    assert model.encode(tokens).shape == (3, 7, 32)
    assert model(tokens, torch.randint(1, 11, (3, 4))).shape == (3, 4, 11)
    assert LanguageModel(20, 32, 4, 2, 64, max_len=16)(torch.randint(0, 20, (2, 9))).shape == (2, 9, 20)


def test_embedding_is_scaled_and_checks_dtype():
    emb = WordEmbedding(10, 16)
    tokens = torch.tensor([[1, 2]])
    torch.testing.assert_close(emb(tokens), emb.embed(tokens) * 4.0)
    with pytest.raises(TypeError):
        emb(torch.tensor([[1.0, 2.0]]))


def test_bad_configurations():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_encoding(10, 7)
    with pytest.raises(ValueError, match="max_len"):
        PositionalEncoding(8, 4)(torch.zeros(1, 5, 8))


# -- positional encoding -------------------------------------------------------------------

def test_positional_encoding_known_values():
    pe = sinusoidal_encoding(50, 8)
    assert torch.equal(pe[0], torch.tensor([0.0, 1.0] * 4))                 # sin 0 = 0, cos 0 = 1
    torch.testing.assert_close(pe[1, 0], torch.tensor(math.sin(1.0)))
    torch.testing.assert_close(pe[1, 1], torch.tensor(math.cos(1.0)))
    torch.testing.assert_close(pe[7, 2], torch.tensor(math.sin(7 / 10000 ** (2 / 8))))
    torch.testing.assert_close(pe[7, 7], torch.tensor(math.cos(7 / 10000 ** (6 / 8))))
    assert pe.abs().max() <= 1.0
    # each (sin, cos) pair has norm 1, so every row has squared norm d_model / 2
    torch.testing.assert_close(pe.square().sum(1), torch.full((50,), 4.0))


def test_positional_encoding_offset():
    enc = PositionalEncoding(8, 20)
    x = torch.zeros(1, 3, 8)
    torch.testing.assert_close(enc(x, start=5), enc.pe[5:8].unsqueeze(0))


@pytest.mark.parametrize("k", [1, 5, 37, -3, 0])
def test_a_shift_of_position_is_one_matrix_for_every_position(k):
    """M_k PE_p = PE_(p+k) for all p at once: one matrix, whatever p is."""
    pe = sinusoidal_encoding(300, 64)
    m = positional_shift_matrix(k, 64)
    lo, hi = max(0, -k), min(300, 300 - k)                  # p and p + k both in 0..299
    torch.testing.assert_close(pe[lo:hi] @ m.T, pe[lo + k:hi + k], rtol=0, atol=1e-5)
    # for each frequency, the angle from (sin, cos) at p to the pair at p + k is omega_i k, for every p
    angle = torch.atan2(pe[:, 0::2].double(), pe[:, 1::2].double())             # (300, 32): omega_i p
    step = torch.remainder(angle[lo + k:hi + k] - angle[lo:hi] + math.pi, 2 * math.pi) - math.pi
    omega = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    expected = torch.remainder(k * omega + math.pi, 2 * math.pi) - math.pi
    torch.testing.assert_close(step, expected.expand_as(step), rtol=0, atol=1e-5)


def test_positional_shift_matrix_is_block_diagonal_rotations():
    m = positional_shift_matrix(5, 8)
    c, s = math.cos(5), math.sin(5)                                             # omega_0 = 1
    torch.testing.assert_close(m[:2, :2], torch.tensor([[c, s], [-s, c]]))
    blocks = torch.block_diag(*(m[i:i + 2, i:i + 2] for i in range(0, 8, 2)))
    assert torch.equal(m, blocks)                                               # nothing off the 2x2 blocks
    torch.testing.assert_close(m @ m.T, torch.eye(8), rtol=0, atol=1e-6)         # a rotation
    torch.testing.assert_close(positional_shift_matrix(-5, 8), m.T)
    torch.testing.assert_close(positional_shift_matrix(3, 8) @ positional_shift_matrix(4, 8),
                               positional_shift_matrix(7, 8), rtol=0, atol=1e-6)
    assert torch.equal(positional_shift_matrix(0, 8), torch.eye(8))
    with pytest.raises(ValueError, match="even"):
        positional_shift_matrix(1, 7)
    with pytest.raises(TypeError):
        positional_shift_matrix(1.5, 8)


# -- attention and masks -------------------------------------------------------------------

def test_attention_weights_sum_to_one_and_match_formula():
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 3)
    out, w = attention(q, k, v)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
    expected_w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(w, expected_w)
    torch.testing.assert_close(out, expected_w @ v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_masked_keys_get_zero_weight():
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    _, w = attention(q, k, v, causal_mask(4))
    assert torch.equal(w.triu(1), torch.zeros_like(w))
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4))
    tokens = torch.tensor([[5, 6, 0, 0]])
    mask = padding_mask(tokens, pad=0)
    assert mask.shape == (1, 1, 1, 4) and mask.tolist() == [[[[True, True, False, False]]]]
    _, w = attention(q[:, None], k[:, None], v[:, None], mask)
    assert torch.equal(w[..., 2:], torch.zeros_like(w[..., 2:]))


def test_causal_mask_stops_the_future():
    """Changing a later token does not change any earlier output (decoder and language model)."""
    model = small()
    src = torch.randint(3, 13, (2, 6))
    tgt = torch.randint(3, 11, (2, 7))
    changed = tgt.clone()
    changed[:, 4] = (changed[:, 4] - 2) % 8 + 3
    a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    lm = LanguageModel(20, 32, 4, 2, 64, max_len=16).eval()
    x = torch.randint(0, 20, (2, 10))
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % 20
    torch.testing.assert_close(lm(x)[:, :6], lm(y)[:, :6])
    assert not torch.allclose(lm(x)[:, 6:], lm(y)[:, 6:])


def test_padding_in_the_source_is_ignored():
    model = small()
    src = torch.tensor([[4, 5, 6, 0, 0]])
    longer = torch.tensor([[4, 5, 6, 0, 0, 0, 0]])
    tgt = torch.tensor([[1, 7, 8]])
    torch.testing.assert_close(model(src, tgt), model(longer, tgt))


def test_padded_positions_cannot_change_real_positions():
    """Whatever the padding's embedding (or the vectors at padded positions), the encoder's outputs
    at real positions and the model's logits stay the same; without the mask they would not."""
    model = small()
    src = torch.tensor([[4, 5, 6, 7, 0, 0], [8, 9, 0, 0, 0, 0]])
    real = src != 0
    tgt = torch.tensor([[1, 7, 6, 5], [1, 9, 8, 0]])
    memory, logits = model.encode(src), model(src, tgt)
    with torch.no_grad():
        model.src_embed.embed.weight[0] = 10 * torch.randn(32)                 # another padding vector
    changed = model.encode(src)
    torch.testing.assert_close(changed[real], memory[real])
    assert not torch.allclose(changed[~real], memory[~real])                   # padded outputs did change
    torch.testing.assert_close(model(src, tgt), logits)
    # one layer, arbitrary vectors at the padded positions: with the mask nothing real changes
    layer = EncoderLayer(32, 4, 64, dropout=0.0).eval()
    x = torch.randn(2, 6, 32)
    y = torch.where(real[..., None], x, torch.randn(2, 6, 32))
    mask = padding_mask(src, 0)
    torch.testing.assert_close(layer(y, mask)[real], layer(x, mask)[real])
    assert not torch.allclose(layer(y)[real], layer(x)[real])                  # unmasked, they leak in


# -- per-head and fused computation, and the matmul count ----------------------------------

def test_per_head_equals_fused():
    a, b = small(per_head=True), small()
    b.load_state_dict(a.state_dict())
    src, tgt = torch.randint(1, 13, (3, 6)), torch.randint(1, 11, (3, 5))
    src[0, 4:] = 0
    torch.testing.assert_close(a(src, tgt), b(src, tgt))


@pytest.mark.parametrize("n_layers, n_heads", [(1, 1), (1, 2), (2, 4), (3, 8), (6, 8)])
def test_matmul_count_is_the_formula(n_layers, n_heads):
    model = Transformer(20, 20, d_model=8 * n_heads, n_heads=n_heads, n_layers=n_layers, d_ff=16, per_head=True).eval()
    src, tgt = torch.randint(1, 20, (2, 5)), torch.randint(1, 20, (2, 4))
    with MatmulCounter() as count:
        model(src, tgt)
    assert count.calls == matmuls_per_inference(n_layers, n_heads) == n_layers * (15 * n_heads + 7) + 1
    fused = Transformer(20, 20, d_model=8 * n_heads, n_heads=n_heads, n_layers=n_layers, d_ff=16).eval()
    fused.load_state_dict(model.state_dict())
    with MatmulCounter() as fused_count:
        fused(src, tgt)
    assert fused_count.calls == 22 * n_layers + 1        # 3 projections + 2 products + 1 output per attention
    assert fused_count.macs == count.macs                 # the same arithmetic, in fewer, larger calls


def test_counter_counts_macs_of_each_kind():
    with MatmulCounter() as c:
        torch.nn.functional.linear(torch.randn(5, 3), torch.randn(4, 3))   # 5 * 3 * 4
        torch.randn(2, 6, 3) @ torch.randn(2, 3, 7)                          # 2 * 6 * 3 * 7
        torch.bmm(torch.randn(2, 6, 3), torch.randn(2, 3, 7))
        torch.relu(torch.randn(3))                                          # not a matmul
    assert c.calls == 3 and c.macs == 60 + 2 * 252


def test_generation_matmul_counts_with_and_without_cache():
    n, h, steps = 2, 4, 5
    model = Transformer(20, 20, d_model=32, n_heads=h, n_layers=n, d_ff=16, per_head=True).eval()
    src = torch.randint(3, 20, (2, 6))
    counts = {}
    for cache in (False, True):
        with MatmulCounter() as c:
            model.greedy_decode(src, steps, bos=1, use_cache=cache)
        counts[cache] = c
    encoder, decoder = n * (5 * h + 3), n * (10 * h + 4) + 1
    assert counts[False].calls == encoder + steps * decoder
    # with the cache, the encoder's keys and values (2h projections per decoder layer) are computed once
    assert counts[True].calls == encoder + decoder + (steps - 1) * (decoder - 2 * h * n)
    assert counts[True].macs < counts[False].macs


@pytest.mark.parametrize("per_head", [True, False])
def test_generation_attention_macs_are_the_formula(per_head):
    """The attention products' MACs of greedy decoding: O(T^3) without the cache, O(T^2) with it."""
    n, h, d, s, steps = 2, 4, 32, 6, 7
    model = Transformer(20, 20, d_model=d, n_heads=h, n_layers=n, d_ff=16, per_head=per_head).eval()
    src = torch.randint(3, 20, (1, s))
    for cache in (False, True):
        with MatmulCounter() as c:
            model.greedy_decode(src, steps, bos=1, use_cache=cache)
        assert c.macs_by_op["matmul"] == generation_attention_macs(n, d, s, steps, cache)
        assert sum(c.macs_by_op.values()) == c.macs and c.by_op.keys() == c.macs_by_op.keys()
    # by hand, one layer, d = 1, S = 1, T = 2: encoder 2; steps 1, 2 without cache 2+2 and 8+4,
    # with cache 2+2 and 4+2
    assert generation_attention_macs(1, 1, 1, 2, False) == 2 + 4 + 12
    assert generation_attention_macs(1, 1, 1, 2, True) == 2 + 4 + 6


# -- decoding ------------------------------------------------------------------------------

@pytest.mark.parametrize("per_head", [False, True])
def test_greedy_decode_same_with_and_without_cache(per_head):
    model = small(per_head=per_head)
    src = torch.randint(3, 13, (4, 6))
    src[1, 3:] = 0
    a = model.greedy_decode(src, 8, bos=1, eos=2, use_cache=True)
    b = model.greedy_decode(src, 8, bos=1, eos=2, use_cache=False)
    assert torch.equal(a, b) and a[:, 0].eq(1).all()


def test_language_model_cache_equals_recomputation_past_the_context():
    lm = LanguageModel(30, 32, 4, 2, 64, max_len=12).eval()
    prompt = torch.randint(0, 30, (2, 5))
    a = lm.generate(prompt, 30, temperature=0, use_cache=True)     # runs past max_len: the window slides
    b = lm.generate(prompt, 30, temperature=0, use_cache=False)
    assert a.shape == (2, 35) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)


def test_sampling_is_seeded_and_top_k_restricts():
    lm = LanguageModel(30, 32, 4, 2, 64, max_len=12).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    draw = lambda **kw: lm.generate(prompt, 20, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(draw(temperature=1.0), draw(temperature=1.0))
    assert torch.equal(draw(temperature=1.0, top_k=1), lm.generate(prompt, 20, temperature=0))
    with pytest.raises(ValueError):
        lm.generate(prompt, 1, temperature=-1)


# -- training --------------------------------------------------------------------------------

def test_training_reduces_the_loss_on_the_reverse_task():
    task = SequenceTask("reverse", n_symbols=6, length=5, batch_size=32, steps=40, seed=0)
    test = SequenceTask("reverse", n_symbols=6, length=5, batch_size=200, steps=1, seed=1)
    model = Transformer(task.vocab_size, task.vocab_size, d_model=32, n_heads=4, n_layers=1, d_ff=64, dropout=0.0)
    hist = fit(model, task, test, epochs=3, lr=3e-3, optimizer="adam", weight_decay=0.0, scheduler="warmup-cosine",
               warmup=10, progress=False)
    assert hist.test_loss[-1] < 0.5 * hist.test_loss[0] and hist.test_acc[-1] > 0.5


def test_language_model_loss_decreases():
    text = "to be or not to be, that is the question. " * 40
    tok = CharTokenizer(text)
    batches = TokenBatches(tok.encode(text), block_size=16, batch_size=8, steps=30, seed=0)
    lm = LanguageModel(tok.vocab_size, 32, 4, 1, 64, max_len=16)
    hist = fit(lm, batches, None, epochs=2, lr=3e-3, optimizer="adamw", weight_decay=0.0, clip_grad_norm=1.0,
               progress=False)
    assert hist.train_loss[-1] < hist.train_loss[0] < math.log2(tok.vocab_size) + 1


# -- sequence data ---------------------------------------------------------------------------

def test_sequence_task_batches():
    task = SequenceTask("reverse", n_symbols=5, length=4, batch_size=3, steps=2, seed=0)
    (src, tgt_in), tgt_out = next(iter(task))
    assert src.shape == (3, 4) and tgt_in.shape == tgt_out.shape == (3, 5)
    assert torch.equal(tgt_in[:, 1:], tgt_out[:, :-1]) and tgt_in[:, 0].eq(1).all() and tgt_out[:, -1].eq(2).all()
    assert torch.equal(tgt_out[:, :-1], src.flip(1)) and src.min() >= 3 and src.max() < 8
    assert [b[1].tolist() for b in task] == [b[1].tolist() for b in task]   # an epoch repeats
    with pytest.raises(ValueError):
        SequenceTask("sort")


def test_sequence_task_variable_lengths_pad_and_ignore():
    task = SequenceTask("reverse", n_symbols=5, length=6, batch_size=400, steps=1, seed=0, min_length=3)
    (src, tgt_in), tgt_out = next(iter(task))
    lengths = task.lengths(src)
    assert set(lengths.tolist()) == {3, 4, 5, 6}
    j = torch.arange(6)
    assert torch.equal(src == task.PAD, j >= lengths[:, None])                # symbols, then padding
    assert src[src != task.PAD].min() >= 3
    for row, n in zip(range(len(src)), lengths.tolist()):
        assert tgt_in[row].tolist() == [1] + src[row, :n].flip(0).tolist() + [0] * (6 - n)
        assert tgt_out[row].tolist() == src[row, :n].flip(0).tolist() + [2] + [-100] * (6 - n)
    assert torch.equal(task.answer(src), tgt_in[:, 1:])
    copy = SequenceTask("copy", n_symbols=5, length=6, batch_size=50, steps=1, seed=0, min_length=2)
    (src, tgt_in), tgt_out = next(iter(copy))
    assert torch.equal(tgt_in[:, 1:], src)
    with pytest.raises(ValueError, match="min_length"):
        SequenceTask("reverse", length=4, min_length=5)


def test_token_metrics_count_only_real_positions():
    from efficientml.experiments.transformer import token_metrics
    task = SequenceTask("reverse", n_symbols=6, length=5, batch_size=40, steps=2, seed=0, min_length=2)
    model = Transformer(task.vocab_size, task.vocab_size, d_model=16, n_heads=2, n_layers=1, d_ff=32).eval()
    loss, acc = token_metrics(model, task)
    with torch.no_grad():
        logits = torch.cat([model(*x).flatten(0, 1) for x, _ in task])
    y = torch.cat([y.flatten() for _, y in task])
    assert (y == -100).any()
    assert math.isclose(loss, float(torch.nn.functional.cross_entropy(logits, y)) / LN2, rel_tol=1e-5)
    assert math.isclose(acc, float((logits.argmax(1) == y)[y != -100].float().mean()), rel_tol=1e-6)
    fixed = SequenceTask("reverse", n_symbols=6, length=5, batch_size=40, steps=2, seed=0)
    for ours, fits in zip(token_metrics(model, fixed), evaluate(model, fixed)):  # nothing to ignore: equal
        assert math.isclose(ours, fits, rel_tol=1e-5)


class _Oracle(torch.nn.Module):
    """Answers every source right (or with one symbol of the first source wrong), and stops as soon
    as every sequence has ended, as ``greedy_decode`` does."""

    def __init__(self, task, wrong=False):
        super().__init__()
        self.task, self.wrong = task, wrong

    def greedy_decode(self, src, max_len, bos, eos):
        ans = self.task.answer(src).clone()
        if self.wrong:
            ans[0, 0] = 3 if ans[0, 0] != 3 else 4
        n = self.task.lengths(src)
        out = torch.cat([torch.full((len(src), 1), bos), ans, torch.zeros(len(src), 1, dtype=torch.long)], 1)
        out[torch.arange(len(src)), n + 1] = eos
        return out[:, :int(n.max()) + 2]                                       # ends early if all are short


def test_sequence_accuracy_compares_whole_outputs():
    from efficientml.experiments.transformer import decoded_examples, sequence_accuracy, symbols
    test = SequenceTask("reverse", n_symbols=5, length=8, batch_size=4, steps=1, seed=3, min_length=2)
    (src, _), _ = next(iter(test))
    assert int(test.lengths(src).max()) < 8                                     # the oracle ends early
    assert sequence_accuracy(_Oracle(test), test) == 1.0
    assert sequence_accuracy(_Oracle(test, wrong=True), test) == 0.75
    rows = decoded_examples(_Oracle(test, wrong=True), test, n=2)
    assert [r[2] for r in rows] == [False, True] and rows[1][0] == " ".join(reversed(rows[1][1].split()))
    assert symbols(torch.tensor([1, 3, 5, 2, 0]), test) == "0 2"


def test_reversal_fraction_by_hand():
    from efficientml.experiments.transformer import reversal_fraction
    w = torch.zeros(1, 2, 4, 3)                       # one source of length 3 (padded to 3), 2 heads
    for t, pos in enumerate([2, 1, 0, 0]):            # step 3 is EOS: not counted
        w[0, 0, t, pos] = 1.0
    w[0, 1] = w[0, 0]
    assert reversal_fraction(w, torch.tensor([3])) == 1.0
    w[0, 1, 1] = torch.tensor([0.0, 0.0, 3.0])        # head 2 outweighs head 1 at step 1
    assert reversal_fraction(w, torch.tensor([3])) == pytest.approx(2 / 3)
    assert reversal_fraction(w[..., :2], torch.tensor([2])) == 0.0   # L = 2: 1 - t expected


def test_head_timings_time_the_same_model_both_ways():
    from efficientml.experiments.transformer import head_timings
    rows = head_timings(n_heads=(1, 2), d_model=16, n_layers=1, batch=2, seq_len=4, repeat=2)
    assert [r["h"] for r in rows] == [1, 2]
    for r in rows:
        assert r["per_head_ms"] > 0 and r["fused_ms"] > 0
        assert r["per_head_calls"] == matmuls_per_inference(1, r["h"]) and r["fused_calls"] == 22 + 1


def test_char_tokenizer_round_trip_and_errors():
    tok = CharTokenizer("hello, world\n")
    assert tok.vocab_size == len(set("hello, world\n"))
    ids = tok.encode("world, hello")
    assert ids.dtype == torch.int64 and tok.decode(ids) == "world, hello"
    with pytest.raises(ValueError, match="vocabulary"):
        tok.encode("xyz")
    with pytest.raises(ValueError):
        CharTokenizer("")


def test_split_is_deterministic_and_disjoint():
    tokens = torch.arange(1000)
    train, val = split_tokens(tokens, 0.1)
    assert len(train) == 900 and len(val) == 100 and torch.equal(torch.cat([train, val]), tokens)
    train2, val2 = split_tokens(tokens, 0.1)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    with pytest.raises(ValueError):
        split_tokens(tokens, 1.5)


def test_token_batches_are_shifted_windows():
    tokens = torch.arange(100)
    batches = TokenBatches(tokens, block_size=8, batch_size=4, steps=3, seed=0)
    for x, y in batches:
        assert x.shape == y.shape == (4, 8)
        assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)
    with pytest.raises(TypeError):
        TokenBatches(tokens.float(), 8, 4, 3)
    with pytest.raises(ValueError):
        TokenBatches(tokens[:5], 8, 4, 3)


def test_decoder_with_a_cache_equals_the_full_pass_for_several_new_tokens():
    model = small()
    src, tgt = torch.randint(3, 13, (2, 6)), torch.randint(3, 11, (2, 7))
    memory = model.encode(src)
    full = model.decode(tgt, memory, src)
    caches = [{} for _ in model.decoder]
    first = model.decode(tgt[:, :4], memory, src, start=0, caches=caches)
    rest = model.decode(tgt[:, 4:], memory, src, start=4, caches=caches)   # three new tokens at once
    torch.testing.assert_close(torch.cat([first, rest], 1), full)
    lm = LanguageModel(20, 32, 4, 2, 64, max_len=16).eval()
    x = torch.randint(0, 20, (2, 10))
    caches = [{} for _ in lm.layers]
    torch.testing.assert_close(torch.cat([lm(x[:, :6], caches=caches), lm(x[:, 6:], start=6, caches=caches)], 1), lm(x))


def test_generation_benchmark_reports_equal_tokens():
    from efficientml.bench import bench_generation, main
    lm = LanguageModel(30, 32, 4, 1, 64, max_len=16)
    r = bench_generation(lm, n_tokens=40, batch=2, repeat=1)
    assert r["same_tokens"] and r["cache_tokens_per_s"] > 0 and r["no_cache_tokens_per_s"] > 0
    assert main(["generation", "--tokens", "20"]) == 0


# -- Chapter 6: fine-tuning the trained model on new text ------------------------------------

def _ft_settings(**kw):
    from efficientml import experiments
    return experiments.settings("language-model", "quick") | dict(
        block_size=16, ft_epochs=3, ft_steps=20, ft_batch_size=8, ft_warmup=5, ft_eval_batches=2,
        ft_eval_batch_size=16, ft_ranks=[2], ft_seeds=[0], ft_lr_lora=1e-2) | kw


def test_new_text_split_takes_the_marked_slice_of_the_validation_text():
    from efficientml.experiments import new_text_split
    text = "a" * 900 + "bcb" + "c" * 97  # validation: the last 100 characters
    tok = CharTokenizer(text)
    s = _ft_settings(ft_marker="bcb", ft_fraction=0.6)
    ft, ev = new_text_split(text, tok, s)
    assert tok.decode(ft) + tok.decode(ev) == text[900:] and len(ft) == 60
    with pytest.raises(ValueError, match="marker"):
        new_text_split(text, tok, s | {"ft_marker": "zz"})
    with pytest.raises(ValueError, match="validation"):
        new_text_split(text, tok, s | {"ft_marker": "aaa"})
    with pytest.raises(ValueError, match="ft_fraction"):
        new_text_split(text, tok, s | {"ft_fraction": 1.0})


def test_finetune_models_train_what_they_say():
    from efficientml.experiments import finetune_model
    from efficientml.lora import LoRALinear, parameter_count
    torch.manual_seed(0)
    base = LanguageModel(10, 32, 4, 2, 64, 0.0, max_len=16)
    total = sum(p.numel() for p in base.parameters())
    assert parameter_count(finetune_model(base, "full")).trainable == total
    assert parameter_count(finetune_model(base, "none")).trainable == 0
    lora = finetune_model(base, "lora", r=2, alpha=4)
    assert parameter_count(lora).trainable == 2 * 4 * 2 * (32 + 32)  # 2 layers x 4 projections x r (in + out)
    assert sum(isinstance(m, LoRALinear) for m in lora.modules()) == 8
    assert all(p.requires_grad for p in base.parameters())  # a copy: the base is untouched
    x = torch.randint(0, 10, (2, 16))
    assert torch.equal(lora.eval()(x), base.eval()(x))
    for bad in (dict(method="half"), dict(method="lora"), dict(method="lora", r=2, alpha=4, targets=("nope",))):
        with pytest.raises(ValueError):
            finetune_model(base, **bad)


def test_finetuning_lowers_the_loss_on_the_new_text_and_lora_merges_exactly():
    from efficientml.experiments import finetune_runs
    from efficientml.lora import merge_lora
    torch.manual_seed(0)
    base = LanguageModel(6, 32, 4, 2, 64, 0.0, max_len=16)
    new = torch.tensor([0, 1, 2, 3, 4, 5] * 60)  # a pattern the untrained base cannot predict
    out = finetune_runs(base, new[:240], new[240:], _ft_settings(), device="cpu")
    loss = {k: h[0].test_loss[-1] for k, h in out["runs"].items()}
    assert set(loss) == {"none", "full", "lora r=2"}
    assert loss["full"] < 0.5 * loss["none"] and loss["lora r=2"] < 0.8 * loss["none"]
    cost = out["cost"]
    assert cost["none"]["optimizer_state_bytes"] == 0
    for k in ("full", "lora r=2"):  # AdamW: two fp32 moments per trainable parameter
        assert cost[k]["optimizer_state_bytes"] == 8 * cost[k]["trainable"]
    assert cost["lora r=2"]["trainable"] < 0.2 * cost["full"]["trainable"]
    model = out["models"]["lora r=2"].eval()
    x = new[None, :16]
    before, greedy = model(x), model.generate(x[:, :1], 30, temperature=0)
    assert merge_lora(model) == 8
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    assert torch.equal(model.generate(x[:, :1], 30, temperature=0), greedy)



# -- devices: what a CPU can show of mistakes that fail on a GPU (see tests/device_checks.py) -------

def test_encoding_tables_are_computed_on_the_cpu_and_the_buffer_follows_the_modules():
    expected_pe, expected_m = sinusoidal_encoding(12, 8), positional_shift_matrix(3, 8)
    with implicit_device_trap():                       # as under ``with torch.device("mps"):``
        pe, m = sinusoidal_encoding(12, 8), positional_shift_matrix(3, 8)
        pos = PositionalEncoding(8, 12)
    assert pe.device.type == m.device.type == "cpu" and pe.dtype == m.dtype == torch.float32
    assert torch.equal(pe, expected_pe) and torch.equal(m, expected_m)
    assert pos.pe.device.type == "meta" and pos.pe.dtype == torch.float32  # where modules are built
    pos, x = PositionalEncoding(8, 12), torch.zeros(1, 5, 8)
    with no_float64():
        torch.testing.assert_close(pos(x, start=2), expected_pe[2:7][None])


def test_attention_and_the_transformer_make_every_tensor_on_the_inputs_device():
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = causal_mask(5)[:, :5]
    mha, x, ctx = MultiHeadAttention(32, 4), torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    cached_mask = torch.ones(2, 5, dtype=torch.bool)
    models = [small(), small(per_head=True)]
    src, tgt = torch.randint(3, 13, (3, 6)), torch.randint(3, 11, (3, 4))
    src[1, 4:] = 0
    expected = [(m(src, tgt), m.greedy_decode(src, 3, bos=1, eos=2)) for m in models]
    with implicit_device_trap(), no_float64():
        attention(q, k[:, :5], v[:, :5], mask)
        mha(x), mha(x, context=ctx)
        cache = {}
        mha(x[:, :3], cache=cache), mha(x[:, 3:], cache=cache, mask=cached_mask)
        got = [(m(src, tgt), m.greedy_decode(src, 3, bos=1, eos=2), m.greedy_decode(src, 3, 1, 2, use_cache=False))
               for m in models]
    for (logits, tokens), (g_logits, g_tokens, g_no_cache) in zip(expected, got):
        assert torch.equal(logits, g_logits) and torch.equal(tokens, g_tokens) and torch.equal(tokens, g_no_cache)


def test_language_model_forward_and_generation_make_every_tensor_on_the_prompts_device():
    lm = LanguageModel(30, 32, 4, 1, 64, max_len=6).eval()
    prompt = torch.randint(0, 30, (2, 3))
    expected = lm.generate(prompt, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(4))
    with implicit_device_trap(), no_float64():
        lm(prompt)
        greedy = [lm.generate(prompt, 8, temperature=0, use_cache=c) for c in (True, False)]  # past max_len
        sampled = [lm.generate(prompt, 8, temperature=0.8, top_k=5, use_cache=c,
                               generator=torch.Generator(device="cpu").manual_seed(4)) for c in (True, False)]
        lm.generate(prompt, 2, temperature=1.0)                                # the global generator
    assert torch.equal(greedy[0], greedy[1])
    assert torch.equal(sampled[0], expected) and torch.equal(sampled[1], expected)


def test_sampling_with_a_cpu_generator_draws_from_the_cpu_probabilities():
    from efficientml.transformer import sample_tokens
    lm = LanguageModel(30, 32, 4, 2, 64, max_len=16).eval()
    prompt = torch.randint(0, 30, (3, 2))
    out = lm.generate(prompt, 6, temperature=0.7, use_cache=False, generator=torch.Generator().manual_seed(9))
    g, ref = torch.Generator().manual_seed(9), prompt
    with torch.no_grad():
        for _ in range(6):   # the documented draw: multinomial of the CPU probabilities, one per row
            probs = (lm(ref)[:, -1] / 0.7).softmax(-1).cpu()
            ref = torch.cat([ref, torch.multinomial(probs, 1, generator=g)], 1)
    assert torch.equal(out, ref)
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert sample_tokens(probs).tolist() == sample_tokens(probs, torch.Generator()).tolist() == [[1], [2]]


def test_generation_checks_its_tokens():
    lm, model = LanguageModel(30, 32, 4, 1, 64, max_len=8).eval(), small()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="integer"):
        lm.generate(prompt.float(), 2)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        lm.generate(prompt[0], 2)
    with pytest.raises(ValueError, match="n_tokens"):
        lm.generate(prompt, -1)
    assert torch.equal(lm.generate(prompt, 0), prompt)
    lm.to("meta"), model.to("meta")                                   # as a model on a GPU
    with pytest.raises(ValueError, match="prompt is on cpu but the model is on meta"):
        lm.generate(prompt, 2)
    with pytest.raises(ValueError, match="src is on cpu but the model is on meta"):
        model.greedy_decode(prompt, 2, bos=1)


def test_chapter_5_helpers_make_every_tensor_on_the_tasks_device():
    from efficientml.experiments.transformer import (cross_attention, decoded_examples, generation_counts,
                                                     greedy_answers, reversal_fraction, sequence_accuracy,
                                                     token_metrics)
    test = SequenceTask("reverse", n_symbols=5, length=6, batch_size=8, steps=1, seed=3, min_length=2)
    model = Transformer(test.vocab_size, test.vocab_size, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                        dropout=0.0, max_len=10).eval()
    (src, _), _ = next(iter(test))
    expected = (token_metrics(model, test), sequence_accuracy(model, test), greedy_answers(model, test, src))
    with implicit_device_trap(), no_float64():
        got = (token_metrics(model, test), sequence_accuracy(model, test), greedy_answers(model, test, src))
        decoded_examples(model, test, n=2)
        weights = cross_attention(model, test, src)
        reversal_fraction(weights, test.lengths(src))
        generation_counts(model, src[:2], 3)
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_cost_rows_and_head_timings_make_their_inputs_beside_their_models():
    from efficientml.experiments.transformer import cost_rows, head_timings
    configs = {"tiny": (1, 2, 8, 16, 11, 11)}
    rows, built = cost_rows(configs, n=4)
    with package_device_trap():
        assert cost_rows(configs, n=4) == (rows, built)
        head_timings(n_heads=(2,), d_model=8, n_layers=1, batch=1, seq_len=3, repeat=1)
