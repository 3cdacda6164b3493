"""``val/perplexity`` is torchmetrics' Perplexity on the scored (response) positions: exp of the mean NLL over all
response tokens, the number the hand-written corpus perplexity gave."""

from __future__ import annotations

import torch
from torchmetrics.text import Perplexity

from fish_lightning.app.causal_lm import IGNORE_INDEX, response_nll, scored_predictions


def test_perplexity_is_exp_of_the_token_mean_nll_over_batches():
    g = torch.Generator().manual_seed(0)
    metric = Perplexity(ignore_index=IGNORE_INDEX)
    nll, tokens = torch.zeros((), dtype=torch.float64), 0
    for b, t in ((3, 9), (2, 5)):
        logits = torch.randn(b, t, 50, generator=g) * 3
        labels = torch.randint(0, 50, (b, t), generator=g)
        labels[:, :3] = IGNORE_INDEX  # the prompt
        labels[0, -2:] = IGNORE_INDEX  # padding
        sums, counts, _ = response_nll(logits, labels)
        nll, tokens = nll + sums.double().sum(), tokens + int(counts.sum())
        metric.update(*scored_predictions(logits, labels))
    assert torch.allclose(metric.compute().double(), torch.exp(nll / tokens), rtol=1e-5)
