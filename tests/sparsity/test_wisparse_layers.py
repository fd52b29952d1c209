"""SparseLinear, module swapping, plan files, on a tiny random Llama (no download)."""

import pytest
import torch
from torch import nn

from vp_lightning.sparsity import SparseLinear, load_plan, save_plan, sparsify
from vp_lightning.sparsity.allocation import build_plan, fixed_alpha
from vp_lightning.sparsity.correction import correct_thresholds, measure_layer_sparsity
from vp_lightning.sparsity.layers import realised_sparsity, set_sparsity_enabled, sparse_layers
from vp_lightning.sparsity.loading import LLAMA_LAYOUT, projection_sites, tiny_llama
from vp_lightning.sparsity.plan import plans_equal
from vp_lightning.sparsity.reference import capture_inputs
from vp_lightning.sparsity.scores import LogBins
from vp_lightning.sparsity.statistics import ScoreStatistics, collect_statistics


def test_sparse_linear_hand_example():
    linear = nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        linear.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = SparseLinear.from_linear(linear, torch.tensor([0.5, 0.5, 2.0]))
    assert layer.weight is linear.weight  # shared, not copied
    layer.track_sparsity = True
    x = torch.tensor([[1.0, 0.25, -3.0]])  # keeps channels 0 and 2
    expected = torch.tensor([[1.0 - 9.0 + 0.5, 4.0 - 18.0 - 0.5]])
    assert torch.allclose(layer(x), expected)
    assert (int(layer.dropped), int(layer.seen)) == (1, 3)
    layer.enabled = False
    assert torch.equal(layer(x), linear(x))


def test_sparse_linear_dense_prefix():
    linear = nn.Linear(2, 1, bias=False)
    layer = SparseLinear.from_linear(linear, torch.tensor([10.0, 10.0]))
    layer.dense_prefix = 1
    layer.track_sparsity = True
    x = torch.ones(1, 3, 2)  # positions 1 and 2 fall below the threshold, position 0 stays dense
    out = layer(x)
    assert torch.equal(out[0, 0], linear(x)[0, 0])
    assert torch.equal(out[0, 1:], torch.zeros(2, 1))
    assert (int(layer.dropped), int(layer.seen)) == (4, 4)  # only sparsified positions are counted


def test_threshold_shape_is_checked():
    with pytest.raises(ValueError, match="in_features"):
        SparseLinear.from_linear(nn.Linear(4, 2), torch.zeros(3))


def _stats_and_sites(model, ids):
    sites = projection_sites(model, LLAMA_LAYOUT)
    stats = ScoreStatistics.for_model(model, sites, [0.0, 1.0], LogBins(num_bins=512))
    collect_statistics(model, stats, [ids])
    return stats, sites


def test_sparsity_zero_reproduces_dense_logits_exactly():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    dense = model(input_ids=ids).logits
    stats, sites = _stats_and_sites(model, ids)
    plan = build_plan(stats, sites, [0.0, 0.0], fixed_alpha(1.0), None, "tiny", 0.0)
    sparsify(model, plan)
    assert sum(1 for _ in sparse_layers(model)) == len(sites) == 14
    assert torch.equal(model(input_ids=ids).logits, dense)


def test_plan_round_trip_and_reapply(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    stats, sites = _stats_and_sites(model, ids)
    plan = build_plan(stats, sites, [0.5, 0.3], fixed_alpha(1.0), None, "tiny", 0.4, metadata={"method": "x"})
    path = save_plan(plan, tmp_path / "p.json")
    assert path.with_suffix(".safetensors").is_file()
    loaded = load_plan(path)
    assert plans_equal(plan, loaded)
    assert plans_equal(plan, load_plan(path.with_suffix(".safetensors")))
    assert plan.block_sparsities() == pytest.approx([0.5, 0.3])

    sparsify(model, plan)
    first = model(input_ids=ids).logits
    other = build_plan(stats, sites, [0.1, 0.1], fixed_alpha(0.0), None, "tiny", 0.1)
    sparsify(model, other)  # already sparse: only thresholds change
    assert not torch.equal(model(input_ids=ids).logits, first)
    sparsify(model, loaded)
    assert torch.equal(model(input_ids=ids).logits, first)


def test_thresholds_hit_the_target_on_calibration_tokens():
    model = tiny_llama()
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))
    stats, sites = _stats_and_sites(model, ids)
    modules = {site.name: model.get_submodule(site.name) for site in sites}
    with capture_inputs(modules) as dense_inputs:
        model(input_ids=ids)
    for alpha in (0.0, 1.0):
        plan = build_plan(stats, sites, [0.5, 0.25], fixed_alpha(alpha), None, "tiny", 0.375)
        sparsify(model, plan)
        # each projection's threshold, applied to the dense inputs it was calibrated on, drops its share
        for site in sites:
            layer = model.get_submodule(site.name)
            dropped = 1.0 - float(layer.keep_mask(dense_inputs[site.name]).float().mean())
            assert abs(dropped - plan.layers[site.name].sparsity) < 0.01, (site.name, alpha, dropped)


def test_realised_sparsity_counts_parameter_weighted():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    stats, sites = _stats_and_sites(model, ids)
    sparsify(model, build_plan(stats, sites, [0.5, 0.5], fixed_alpha(0.0), None, "tiny", 0.5))
    for _, layer in sparse_layers(model):
        layer.track_sparsity = True
    model(input_ids=ids)
    layers = [layer for _, layer in sparse_layers(model)]
    expected = sum(float(lay.dropped) * lay.out_features for lay in layers) / sum(
        float(lay.seen) * lay.out_features for lay in layers
    )
    assert realised_sparsity(model) == pytest.approx(expected)
    assert 0.3 < realised_sparsity(model) < 0.7
    set_sparsity_enabled(model, False)
    assert all(not layer.enabled for layer in layers)


def test_plan_for_another_model_is_rejected(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 16))
    stats, sites = _stats_and_sites(model, ids)
    plan = build_plan(stats, sites, [0.5, 0.5], fixed_alpha(0.0), None, "tiny", 0.5)
    smaller = tiny_llama(num_hidden_layers=1)
    with pytest.raises(ValueError, match="does not have"):
        sparsify(smaller, plan)
    with pytest.raises(FileNotFoundError):
        load_plan(tmp_path / "missing.json")


def test_threshold_correction_realises_the_planned_sparsity_in_the_sparse_model():
    model = tiny_llama(num_hidden_layers=4)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(4))
    stats, sites = _stats_and_sites(model, ids)
    plan = build_plan(stats, sites, [0.6] * 4, fixed_alpha(1.0), None, "tiny", 0.6)
    before = measure_layer_sparsity(model, plan, ids)
    corrected = correct_thresholds(model, plan, stats, ids, iterations=2)
    after = measure_layer_sparsity(model, corrected, ids)
    assert [layer.sparsity for layer in corrected.layers.values()] == [layer.sparsity for layer in plan.layers.values()]
    worst_before = max(abs(before[name] - 0.6) for name in plan.layers)
    worst_after = max(abs(after[name] - 0.6) for name in plan.layers)
    assert worst_after < 0.01 <= worst_before
    quantiles = corrected.metadata["threshold_quantiles"]
    for name in plan.layers:  # a projection that dropped too much gets a lower quantile, and vice versa
        if abs(before[name] - 0.6) > 0.01:
            assert (quantiles[name] - 0.6) * (before[name] - 0.6) < 0
