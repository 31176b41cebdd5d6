"""Intervals never leave the range of their quantity, and say when few values make them rough."""

import math

import torch

from popgpt.stats import ci_text, count_interval, mean_interval, wilson


def test_a_t_interval_is_clipped_to_the_possible_range():
    mean, lo, hi = mean_interval([0.02, 2.6], low=0.0)  # two losses: the raw t interval goes far below 0
    assert lo == 0.0 and hi > mean > lo
    raw = mean_interval([0.02, 2.6])
    assert raw[1] < 0  # the control: unclipped, it would have
    m, lo, hi = mean_interval([-3.0, 4.5], 0.0, 1.0)  # AUCs can only be in [0, 1]
    assert 0.0 <= lo <= hi <= 1.0


def test_a_share_gets_a_wilson_interval_inside_0_1():
    p, lo, hi = count_interval(torch.tensor([True] * 7 + [False]))
    assert p == 0.875 and (lo, hi) == wilson(0.875, 8) and 0 < lo < p < hi <= 1.0
    assert count_interval(torch.ones(5, dtype=torch.bool))[2] == 1.0


def test_small_samples_are_flagged():
    assert ci_text(*mean_interval([1.0, 2.0, 3.0]), 3).endswith("(n=3: rough)")
    assert ci_text(*mean_interval([1.0]), 1) == "1.000 (n=1: no interval)"
    assert "rough" not in ci_text(*mean_interval([1.0, 2.0, 3.0, 4.0]), 4)
    assert ci_text(math.nan, math.nan, math.nan, 0) == "-"
