"""The positions rule that training, evals and the service share (``training.positions``)."""

from __future__ import annotations

from typing import Any

import torch

from saescope.training import positions
from saescope.training.meta import CheckpointMeta
from saescope.training.positions import Rules
from saescope.training.sae import SAEConfig


def test_eligible_leaves_out_padding_special_tokens_and_the_first_positions() -> None:
    special = torch.tensor([[True, False, False, True, False], [False, False, False, False, False]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = positions.eligible(special, 1, attention)
    assert got.tolist() == [[False, True, True, False, True], [False, True, True, False, False]]


def test_the_median_is_taken_over_eligible_positions_only() -> None:
    """A short prompt: the sink and a special token with huge norms must not move the median,
    or a real outlier escapes (over all positions the median is 60, and 60 < 5 × 60)."""
    norms = torch.tensor([2000.0, 1000.0, 5.0, 6.0, 60.0])
    special = torch.tensor([False, True, False, False, False])
    among = positions.eligible(special, 1)
    assert among.tolist() == [False, False, True, True, True]
    assert positions.norm_outliers(norms, among, 5.0).tolist() == [True, True, False, False, True]
    assert not positions.norm_outliers(norms, among, None).any()
    assert not positions.norm_outliers(norms, torch.zeros(5, dtype=torch.bool), 5.0).any()


def test_out_of_distribution_for_a_served_prompt() -> None:
    x = torch.ones(5, 4)
    x[0] *= 2000.0  # the sink
    x[1] *= 1000.0  # a special token acting as a sink (a chat template's)
    x[4] *= 30.0
    special = torch.tensor([False, True, False, False, False])
    got = positions.out_of_distribution(x, special, Rules(skip_first=1, outlier_norm_factor=10.0))
    assert got.tolist() == [True, True, False, False, True]
    plain = positions.out_of_distribution(x, special, positions.rules_of(meta()))
    assert not plain.any()  # a checkpoint without the rules skips nothing


def meta(**facts: Any) -> CheckpointMeta:
    return CheckpointMeta(model="m", hookpoint="model.layers.0", sae=SAEConfig(4, 8), **facts)


def test_rules_from_checkpoint_metadata() -> None:
    got = positions.rules_of(meta(skip_first_positions=2, outlier_norm_factor=8.0))
    assert got == Rules(skip_first=2, outlier_norm_factor=8.0)
    assert positions.rules_of(meta(outlier_norm_factor=None)) == Rules(0, None)
