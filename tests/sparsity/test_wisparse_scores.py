"""Scores, folded thresholds, log-spaced histograms and quantiles, checked on hand-computed examples."""

import math

import pytest
import torch

from vp_lightning.sparsity.scores import (
    LogBins,
    channel_scores,
    column_norms,
    fold_threshold,
    histogram_quantile,
    relative_output_errors,
    score_histograms,
)


def test_scores_hand_example():
    # W columns: (3, 4) -> norm 5, (0, 2) -> norm 2
    weight = torch.tensor([[3.0, 0.0], [4.0, 2.0]])
    norms = column_norms(weight)
    assert torch.allclose(norms, torch.tensor([5.0, 2.0]))
    x = torch.tensor([[1.0, -3.0]])
    assert torch.allclose(channel_scores(x, norms, 0.0), torch.tensor([[1.0, 3.0]]))
    assert torch.allclose(channel_scores(x, norms, 1.0), torch.tensor([[5.0, 6.0]]))
    assert torch.allclose(channel_scores(x, norms, 2.0), torch.tensor([[25.0, 12.0]]))
    # tau = 5.5 at alpha 1 keeps only channel 1 (6 > 5.5); folded: theta = (1.1, 2.75), |x| = (1, 3)
    theta = fold_threshold(5.5, norms, 1.0)
    assert torch.allclose(theta, torch.tensor([1.1, 2.75]))
    assert (x.abs() > theta).tolist() == [[False, True]]


def test_folded_threshold_gives_the_score_mask():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.rand(64) * 3
    norms = torch.rand(64) * 2 + 0.1
    for alpha in (0.0, 0.25, 1.0, 1.5):
        scores = channel_scores(x, norms, alpha)
        tau = float(scores.flatten().kthvalue(scores.numel() // 2).values) * 1.0001
        mask_score = scores > tau
        mask_folded = x.abs() > fold_threshold(tau, norms, alpha)
        assert torch.equal(mask_score, mask_folded), alpha


def test_alpha_zero_masks_are_magnitude_only():
    torch.manual_seed(1)
    x = torch.randn(8, 16)
    norms = torch.rand(16) * 5
    tau = 0.7
    assert torch.equal(x.abs() > fold_threshold(tau, norms, 0.0), x.abs() > tau)
    assert torch.equal(channel_scores(x, norms, 0.0), x.abs())


def test_zero_column_threshold():
    norms = torch.tensor([0.0, 1.0])
    assert fold_threshold(0.0, norms, 1.0).tolist() == [0.0, 0.0]  # sparsity 0 keeps everything non-zero
    assert fold_threshold(0.5, norms, 1.0)[0] == math.inf  # a zero column is always skipped
    assert fold_threshold(0.5, norms, 0.0).tolist() == [0.5, 0.5]


def test_log_bins_hand_example():
    # 4 bins over [1, 10^4): one decade each
    bins = LogBins(low=1.0, high=1e4, num_bins=4)
    scores = torch.tensor([0.0, 0.5, 2.0, 50.0, 500.0, 5000.0, 2e4])
    index = bins.index_from_log(torch.log(scores))
    assert index.tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert math.isclose(bins.lower_edge(3), 100.0)


def test_score_histograms_hand_example():
    bins = LogBins(low=1.0, high=1e4, num_bins=4)
    x = torch.tensor([[0.0, 2.0], [50.0, 3.0]])
    log_norm = torch.log(torch.tensor([1.0, 100.0]))
    counts = score_histograms(x, log_norm, torch.tensor([0.0, 1.0]), bins)
    # alpha 0: scores 0, 2, 50, 3 -> bins 0, 1, 2, 1
    assert counts[0].tolist() == [1, 2, 1, 0, 0, 0]
    # alpha 1: scores 0, 200, 50, 300 -> bins 0, 3, 2, 3
    assert counts[1].tolist() == [1, 0, 1, 2, 0, 0]


def test_histogram_quantile_hand_example():
    bins = LogBins(low=1.0, high=1e4, num_bins=4)
    counts = torch.tensor([0, 2, 2, 0, 0, 0])  # two scores in [1, 10), two in [10, 100)
    assert histogram_quantile(counts, 0.0, bins) == 0.0
    assert math.isclose(histogram_quantile(counts, 0.5, bins), 10.0)  # exactly the edge between the bins
    assert math.isclose(histogram_quantile(counts, 0.25, bins), 10**0.5)  # half way through bin 1 in log space
    assert math.isclose(histogram_quantile(counts, 0.75, bins), 10**1.5)
    with pytest.raises(ValueError):
        histogram_quantile(counts, 1.5, bins)
    with pytest.raises(ValueError, match="empty"):
        histogram_quantile(torch.zeros(6), 0.5, bins)


def test_histogram_thresholds_hit_the_target_sparsity():
    torch.manual_seed(2)
    # heavy-tailed activations with a few very large channels, like LLM hidden states
    x = torch.randn(4096, 48) * torch.exp(torch.randn(48))
    norms = torch.rand(48) + 0.2
    bins = LogBins()
    alphas = torch.tensor([0.0, 0.5, 1.5])
    counts = score_histograms(x, torch.log(norms), alphas, bins)
    assert counts.sum(1).tolist() == [x.numel()] * 3
    for i, alpha in enumerate(alphas.tolist()):
        for sparsity in (0.25, 0.4, 0.5, 0.9):
            theta = fold_threshold(histogram_quantile(counts[i], sparsity, bins), norms, alpha)
            realised = float((x.abs() <= theta).float().mean())
            assert abs(realised - sparsity) < 2e-3, (alpha, sparsity, realised)


def test_relative_output_error_hand_example():
    x = torch.tensor([[1.0, 2.0]])
    weight = torch.eye(2)
    # dropping channel 0 removes W[:, 0] * 1 -> error 1 / (1 + 4); dropping nothing -> 0; everything -> 1
    thresholds = torch.tensor([[1.5, 0.0], [0.0, 0.0], [5.0, 5.0]])
    errors = relative_output_errors(x, weight, thresholds)
    assert torch.allclose(errors, torch.tensor([0.2, 0.0, 1.0]))


def test_relative_output_error_wide_and_narrow_projections_agree_with_the_definition():
    torch.manual_seed(3)
    x = torch.randn(40, 6)
    thresholds = torch.rand(5, 6)
    for d_out in (3, 17):  # narrow (direct product) and wide (Gram matrix) paths
        weight = torch.randn(d_out, 6)
        errors = relative_output_errors(x, weight, thresholds, chunk_rows=64)
        for theta, error in zip(thresholds, errors, strict=True):
            masked = x * (x.abs() > theta)
            expected = (x @ weight.T - masked @ weight.T).square().sum() / (x @ weight.T).square().sum()
            assert torch.allclose(error, expected, rtol=1e-4), d_out
