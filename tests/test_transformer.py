import math

import pytest
import torch

from efficientml.data import CharTokenizer, SequenceTask, TokenBatches, split_tokens
from efficientml.train import fit
from efficientml.transformer import (DecoderLayer, EncoderLayer, FeedForward, LanguageModel, MatmulCounter,
                                     MultiHeadAttention, PositionalEncoding, Transformer, WordEmbedding, attention,
                                     causal_mask, matmuls_per_inference, padding_mask, sinusoidal_encoding)


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
