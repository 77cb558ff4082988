"""Chapter 6's baselines from the text's statistics: unigram and bigram models fitted to one text
and measured on another, with add-alpha smoothing."""
import math

import pytest
import torch

from device_checks import package_device_trap
from efficientml.experiments.language_model import baselines
from efficientml.ngram import bigram_cross_entropy, bigram_entropy, unigram_cross_entropy, unigram_entropy


def test_unigram_cross_entropy_by_hand():
    fit, ev = torch.tensor([0, 0, 1]), torch.tensor([0, 2])
    # add-one over V = 3: p = (2+1, 1+1, 0+1) / (3 + 3) = 1/2, 1/3, 1/6
    expected = -(math.log(1 / 2) + math.log(1 / 6)) / 2
    assert unigram_cross_entropy(fit, ev, 3) == pytest.approx(expected, rel=1e-12)


def test_bigram_cross_entropy_by_hand():
    fit = torch.tensor([0, 1, 0, 1, 1])      # pairs 01, 10, 01, 11
    ev = torch.tensor([0, 1, 1, 0, 2])       # pairs 01, 11, 10, 02
    v, alpha = 3, 1.0
    n = torch.zeros(v, v, dtype=torch.float64)
    for a, b in zip(fit[:-1].tolist(), fit[1:].tolist()):
        n[a, b] += 1
    p = lambda a, b: float((n[a, b] + alpha) / (n[a].sum() + alpha * v))  # noqa: E731
    expected = -sum(math.log(p(a, b)) for a, b in zip(ev[:-1].tolist(), ev[1:].tolist())) / 4
    assert bigram_cross_entropy(fit, ev, v, alpha) == pytest.approx(expected, rel=1e-12)
    assert p(0, 1) == pytest.approx(3 / 5)  # n(0,1) = 2 of the 2 pairs from 0, plus 1, over 2 + 3


def test_cross_entropies_tend_to_the_entropies_on_the_fitting_text():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 7, (5000,), generator=g)
    assert unigram_cross_entropy(text, text, 7, alpha=1e-9) == pytest.approx(unigram_entropy(text, 7),
                                                                             rel=1e-6)
    assert bigram_cross_entropy(text, text, 7, alpha=1e-9) == pytest.approx(bigram_entropy(text, 7),
                                                                           rel=1e-6)
    # smoothing moves probability to unseen pairs, so on the fitting text it costs a little
    assert bigram_cross_entropy(text, text, 7, alpha=1.0) > bigram_entropy(text, 7)


def test_held_out_text_costs_more_than_the_fitting_text():
    """A bigram model fitted to one half of a Markov chain's output pays more on the other half
    than the entropy of its own half, and less than the unigram model."""
    g = torch.Generator().manual_seed(1)
    v = 6
    trans = torch.softmax(3 * torch.randn(v, v, generator=g), 1)
    x = [0]
    for _ in range(20000):
        x.append(int(torch.multinomial(trans[x[-1]], 1, generator=g)))
    x = torch.tensor(x)
    fit, held = x[:10000], x[10000:]
    b = baselines(fit, held, v)
    assert b["bigram"]["val"] > b["bigram"]["train"]
    assert b["bigram"]["val"] < b["unigram"]["val"] < b["uniform"]["val"] == pytest.approx(math.log(v))


def test_unseen_tokens_cost_a_finite_amount_and_bad_input_is_rejected():
    fit, ev = torch.tensor([0, 1, 0, 1]), torch.tensor([2, 2, 2])
    assert math.isfinite(unigram_cross_entropy(fit, ev, 3))
    assert math.isfinite(bigram_cross_entropy(fit, ev, 3))
    assert bigram_cross_entropy(fit, ev, 3) == pytest.approx(math.log(3))  # row 2 unseen: uniform
    with pytest.raises(ValueError, match="alpha"):
        bigram_cross_entropy(fit, ev, 3, alpha=0.0)
    with pytest.raises(ValueError, match="outside"):
        unigram_cross_entropy(fit, torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="at least 2"):
        bigram_cross_entropy(fit, torch.tensor([1]), 3)
    with pytest.raises(TypeError, match="1-D integer"):
        unigram_cross_entropy(fit.float(), ev, 3)
    with pytest.raises(ValueError, match="outside"):
        unigram_entropy(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="at least 2"):
        bigram_entropy(torch.tensor([1]))
    with pytest.raises(TypeError, match="1-D integer"):
        bigram_entropy(torch.zeros(2, 3, dtype=torch.long))


def test_ngram_counts_name_their_device_and_check_the_vocabulary_size():
    fit, ev = torch.tensor([0, 1, 2, 1, 0, 2, 2]), torch.tensor([2, 1, 0, 0])
    expected = baselines(fit, ev, 3)
    with package_device_trap():
        assert baselines(fit, ev, 3) == expected
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_cross_entropy(fit, ev, 0)
    with pytest.raises(ValueError, match="vocab_size"):
        bigram_entropy(fit, 2.5)
