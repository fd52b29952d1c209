import math

import pytest
import torch

from vp_lightning.metrics import TokenUsage, usage_statistics


def test_hand_computed_statistics():
    # counts [2, 1, 1, 0]: p = [1/2, 1/4, 1/4, 0]; H = 1.5 ln 2; perplexity = 2^1.5
    stats = usage_statistics(torch.tensor([2, 1, 1, 0]))
    assert stats["perplexity"].item() == pytest.approx(2**1.5, rel=1e-6)
    assert stats["cvu"].item() == pytest.approx(2**1.5 / 4, rel=1e-6)
    assert stats["utilization"].item() == pytest.approx(0.75)
    assert stats["dead_codes"].item() == 1
    assert stats["tokens"].item() == 4


def test_uniform_and_collapsed():
    assert usage_statistics(torch.ones(10, dtype=torch.long))["cvu"].item() == pytest.approx(1.0)
    collapsed = usage_statistics(torch.tensor([7, 0, 0, 0]))
    assert collapsed["perplexity"].item() == pytest.approx(1.0)
    assert collapsed["dead_codes"].item() == 3


def test_nominal_size_reported_when_different():
    stats = usage_statistics(torch.ones(1000, dtype=torch.long), nominal_size=1024)
    assert stats["cvu_nominal"].item() == pytest.approx(1000 / 1024)
    assert "cvu_nominal" not in usage_statistics(torch.ones(8, dtype=torch.long))


def test_metric_accumulates_counts_not_batch_averages():
    metric = TokenUsage(4)
    metric.update(torch.tensor([0, 0, 0, 0]))  # one batch all code 0
    metric.update(torch.tensor([1, 2, 3, 1]))
    assert metric.counts.tolist() == [4, 2, 1, 1]
    p = torch.tensor([4, 2, 1, 1]) / 8
    assert metric.compute()["perplexity"].item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)


def test_mask_excludes_padding_and_range_is_checked():
    metric = TokenUsage(3)
    metric.update(torch.tensor([[0, 1, 2]]), mask=torch.tensor([[True, True, False]]))
    assert metric.counts.tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        metric.update(torch.tensor([3]))
