"""In-block greedy tables, block allocations and alpha selection bookkeeping."""

import pytest
import torch

from vp_lightning.sparsity.allocation import FixedAllocation, UniformAllocation
from vp_lightning.sparsity.alpha import AlphaSelection
from vp_lightning.sparsity.greedy import GreedyTable, greedy_table


def _quadratic_error(costs):
    # additive block error: projection p at sparsity s costs costs[p] * s^2
    return lambda sparsities: sum(c * s * s for c, s in zip(costs, sparsities, strict=True))


def test_greedy_steps_are_parameter_scaled_and_monotone():
    params = [100, 100, 200]  # shares 1/4, 1/4, 1/2
    table = greedy_table(_quadratic_error([1.0, 4.0, 1.0]), ["a", "b", "c"], params, step=0.05, max_sparsity=0.5)
    rows = torch.tensor(table.sparsities)
    assert rows.shape == (11, 3)
    shares = torch.tensor(params, dtype=torch.float64) / sum(params)
    # every row raises the parameter-weighted block sparsity by exactly one step
    assert torch.allclose((rows.double() * shares).sum(1), torch.arange(11, dtype=torch.float64) * 0.05)
    assert bool((rows[1:] >= rows[:-1]).all())  # monotone in every column
    assert table.errors == sorted(table.errors)
    # the expensive projection b is raised least
    assert rows[-1, 1] < rows[-1, 0] and rows[-1, 1] < rows[-1, 2]


def test_greedy_first_steps_by_hand():
    # shares 1/2, 1/2 -> each step raises one projection by 0.1 (step 0.05)
    table = greedy_table(_quadratic_error([1.0, 2.0]), ["a", "b"], [10, 10], step=0.05, max_sparsity=0.15)
    # step 1: a 0 -> 0.1 adds 0.01, b 0 -> 0.1 adds 0.02: take a
    # step 2: a 0.1 -> 0.2 adds 0.03, b 0 -> 0.1 adds 0.02: take b
    # step 3: a 0.1 -> 0.2 adds 0.03, b 0.1 -> 0.2 adds 0.06: take a
    assert torch.allclose(torch.tensor(table.sparsities), torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.1, 0.1], [0.2, 0.1]]))
    assert table.errors == pytest.approx([0.0, 0.01, 0.03, 0.06])


def test_greedy_skips_projections_whose_step_is_too_large():
    # projection b holds 5 % of the parameters: one step of 0.05 would move it by 1.0 > 0.99
    table = greedy_table(_quadratic_error([5.0, 0.0]), ["a", "b"], [95, 5], step=0.05, max_sparsity=0.95)
    assert all(row[1] == 0.0 for row in table.sparsities)
    # a moves by 0.05 / 0.95 per step; its 19th step would reach 1.0 > 0.99, so the table stops at 0.9
    assert table.max_sparsity == pytest.approx(0.9)
    assert table.sparsities[-1][0] == pytest.approx(0.9 / 0.95)


def test_table_interpolation_and_range():
    table = GreedyTable(step=0.1, projections=["a", "b"], sparsities=[[0, 0], [0.2, 0], [0.2, 0.2]], errors=[0, 1, 2])
    assert table.at(0.05) == pytest.approx({"a": 0.1, "b": 0.0})
    assert table.at(0.15) == pytest.approx({"a": 0.2, "b": 0.1})
    assert table.at(0.2) == pytest.approx({"a": 0.2, "b": 0.2})
    with pytest.raises(ValueError, match="greedy_max_sparsity"):
        table.at(0.3)
    assert GreedyTable.from_json(table.to_json()) == table


def test_block_allocations():
    assert UniformAllocation().block_sparsities(0.4, [10, 20, 30]) == [0.4, 0.4, 0.4]
    assert FixedAllocation([0.3, 0.5]).block_sparsities(0.4, [10, 10]) == [0.3, 0.5]
    with pytest.raises(ValueError, match="averages"):
        FixedAllocation([0.3, 0.5]).block_sparsities(0.4, [10, 30])


def test_alpha_selection_picks_the_least_error_at_the_nearest_sparsity():
    errors = torch.tensor([[0.10, 0.30], [0.20, 0.25], [0.05, 0.40]])  # alphas x sparsities
    selection = AlphaSelection([0.0, 1.0, 1.5], [0.25, 0.5], {"p": errors})
    assert selection.best_alpha("p", 0.25) == 1.5
    assert selection.best_alpha("p", 0.5) == 1.0
    assert selection.best_alpha("p", 0.3) == 1.5  # nearest grid sparsity is 0.25
    assert selection.best_alpha("p", 0.45) == 1.0
    assert selection.error("p", 0.0, 0.5) == pytest.approx(0.30)
    again = AlphaSelection.from_json(selection.to_json())
    assert torch.equal(again.errors["p"], errors)
