"""Metric values against hand-computed cases, and the bootstrap interval."""
import math

import pytest
import torch

from train.metrics import bootstrap_interval, classification_metrics, natix_reward


def test_metrics_match_hand_computed_confusion_counts():
    # 5 roadwork, 5 none; predictions: TP=4 FN=1 TN=3 FP=2, with one prob exactly 0.5 (counts as "None")
    probs = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.55, 0.95])
    target = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    tp, fn, tn, fp = 4, 1, 3, 2
    metrics = classification_metrics()
    metrics.update(probs, target)
    out = {k: float(v) for k, v in metrics.compute().items()}
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    acc = (tp + tn) / 10
    assert out["mcc"] == pytest.approx(mcc, abs=1e-6)
    assert out["acc"] == pytest.approx(acc)
    assert out["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert out["reward"] == pytest.approx((0.5 * mcc + 0.5 * acc) ** 3, abs=1e-6)
    # AUROC: fraction of (positive, negative) pairs ranked correctly = 17/25 here
    pairs = sum(float(p > n) for p in probs[:5] for n in probs[5:])
    assert out["auroc"] == pytest.approx(pairs / 25)


def test_reward_clamps_negative_mcc_at_zero():
    assert float(natix_reward(torch.tensor(-0.4), torch.tensor(0.3))) == pytest.approx(0.15 ** 3)
    metrics = classification_metrics()
    metrics.update(torch.tensor([0.9, 0.1]), torch.tensor([0, 1]))  # all wrong: MCC -1, accuracy 0
    assert float(metrics.compute()["reward"]) == 0.0


def test_bootstrap_interval_covers_the_estimate_and_shrinks_with_more_samples():
    g = torch.Generator().manual_seed(0)
    def sample(n):
        target = torch.randint(0, 2, (n,), generator=g)
        probs = (target.float() * 0.4 + torch.rand(n, generator=g) * 0.6).clamp(0, 1)
        return probs, target
    small, big = sample(300), sample(3000)
    point = float(classification_metrics()["mcc"](*small))
    low, high = bootstrap_interval(*small, num_bootstraps=300)
    assert low < point < high
    assert bootstrap_interval(*small, num_bootstraps=300) == (low, high)  # reproducible by seed
    b_low, b_high = bootstrap_interval(*big, num_bootstraps=300)
    assert (b_high - b_low) < 0.6 * (high - low)  # ~ 1/sqrt(10) narrower


def test_bootstrap_leaves_the_global_random_stream_alone():
    probs, target = torch.rand(50), torch.randint(0, 2, (50,))
    state = torch.get_rng_state()
    bootstrap_interval(probs, target, num_bootstraps=20)
    assert torch.equal(torch.get_rng_state(), state)
