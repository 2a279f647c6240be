import math

import pytest
import torch
import torch.nn.functional as F

from modelpress.eval import ReferenceLogprobs, evaluate, kl_divergence, perplexity
from tests.conftest import tiny_model


@pytest.fixture
def ids():
    return torch.randint(0, 256, (6, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.usefixtures("float32_forwards")
def test_perplexity_matches_cross_entropy(ids):
    m = tiny_model("llama")
    with torch.no_grad():
        logits = m(ids).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert perplexity(m, ids, batch_size=4) == pytest.approx(math.exp(ce.item()), rel=1e-5)


def test_batch_size_does_not_matter(ids):
    m = tiny_model("gpt2")
    assert perplexity(m, ids, batch_size=1) == pytest.approx(perplexity(m, ids, batch_size=6), rel=1e-5)


def test_kl_zero_to_itself_positive_otherwise(ids):
    m = tiny_model("llama")
    other = tiny_model("llama", seed=1)
    assert kl_divergence(m, m, ids) == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(m, other, ids) > 1e-3


def test_cached_reference_equals_live_reference(ids):
    m, other = tiny_model("llama"), tiny_model("llama", seed=1)
    live = evaluate(other, ids, reference=m, batch_size=2)
    cached = evaluate(other, ids, reference=ReferenceLogprobs(m, ids, batch_size=2))
    assert cached.ppl == pytest.approx(live.ppl, rel=1e-6)
    assert cached.kl == pytest.approx(live.kl, rel=2e-3)
    own = ReferenceLogprobs(m, ids, batch_size=2).result  # the reference's own perplexity, same forwards
    assert own.ppl == pytest.approx(evaluate(m, ids, batch_size=2).ppl, rel=1e-6) and own.kl == 0.0
    assert own.n_tokens == live.n_tokens and own.ppl != pytest.approx(live.ppl, rel=1e-3)


def test_eval_leaves_training_flag(ids):
    m = tiny_model("llama").train()
    evaluate(m, ids)
    assert m.training
