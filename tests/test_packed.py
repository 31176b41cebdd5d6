"""Packed rows compute what the padded batch computes, member by member, on fewer positions."""

import pytest
import torch
from conftest import NAMES

from popgpt import ModelConfig, Population, TrainConfig
from popgpt.data import IGNORE, docs_to_tensor, inputs_targets, load_names
from popgpt.engine import Engine
from popgpt.evolution.virus import Virus
from popgpt.loss import losses_of, member_nll_sum
from popgpt.packed import (
    Plan,
    _attention,
    attention_parts,
    needed_lengths,
    packed_losses,
    packed_nll_sum,
    plan_round,
    plan_shared,
)
from popgpt.step import Batches

CONFIGS = [ModelConfig(), ModelConfig(n_layer=2), ModelConfig(n_layer=2, norm=False, mlp=False),
           ModelConfig(n_embd=16, n_head=2)]


@pytest.fixture(scope="module")
def rows():
    names = load_names(NAMES)[:2000]
    infected, _ = Virus("qx", "zzz").infect(names, 0.15, torch.Generator().manual_seed(0))
    return docs_to_tensor(infected, 21)


def batch(rows, P, B, seed):
    return inputs_targets(rows[torch.randint(len(rows), (P, B), generator=torch.Generator().manual_seed(seed))])


def test_needed_lengths_count_up_to_the_last_real_target():
    y = torch.tensor([[3, 4, 0, IGNORE, IGNORE], [IGNORE, 5, IGNORE, IGNORE, IGNORE], [IGNORE] * 5])
    assert needed_lengths(y).tolist() == [3, 2, 0]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"L{c.n_layer}-C{c.n_embd}-norm{c.norm}-mlp{c.mlp}")
@pytest.mark.parametrize("groups", [1, 3, 8])
def test_packed_loss_and_gradients_equal_the_padded_ones_member_by_member(rows, config, groups):
    pop = Population.from_seeds(config, [1, 2, 3, 4, 5])
    x, y = batch(rows, 5, 12, groups)
    y[1, :, 2:4] = IGNORE  # targets missing inside rows: those positions are still read by later ones
    plan = plan_round(y, groups)
    assert plan.positions < 12 * 21 and sum(plan.rows) == 12
    leaves = {k: v.clone().requires_grad_(True) for k, v in pop.params.items()}
    padded = losses_of(pop.base, leaves, x, y)
    packed = packed_losses(leaves, config, x, y, plan)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=0)
    g_padded = torch.autograd.grad(padded.sum(), list(leaves.values()))
    g_packed = torch.autograd.grad(packed_losses(leaves, config, x, y, plan).sum(), list(leaves.values()))
    for name, a, b in zip(leaves, g_packed, g_padded):
        scale = b.flatten(1).abs().amax(1).clamp(min=1e-12)  # per member: float32 rounding of its gradient
        assert bool(((a - b).flatten(1).abs().amax(1) <= 1e-4 * scale).all()), name


def test_shared_rows_in_groups_of_one_length_equal_the_padded_sum(rows):
    pop = Population.from_seeds(ModelConfig(n_layer=2), [7, 8, 9])
    x, y = inputs_targets(rows[:300])
    order = needed_lengths(y).sort(descending=True, stable=True).indices
    x, y = x[order], y[order]
    plan = plan_shared(needed_lengths(y).tolist())
    assert plan.positions == int((y != IGNORE).sum())  # no padding at all
    total, count = packed_nll_sum(pop.params, pop.config, x, y, plan)
    torch.testing.assert_close(total, member_nll_sum(pop.logits(x), y), rtol=1e-5, atol=0)
    assert count.tolist() == [int((y != IGNORE).sum())]


def test_a_plan_too_short_for_a_row_would_cut_it_so_plans_take_the_longest(rows):
    x, y = batch(rows, 4, 16, 0)
    plan = plan_round(y, 4)
    longest = needed_lengths(y).sort(dim=-1, descending=True).values  # (P, B)
    start = 0
    for size, length in zip(plan.rows, plan.lengths):
        assert int(longest[:, start].max()) <= length  # every row of the group fits
        start += size
    def per_row(p):  # each row's length, rows in packed order
        return [t for r, t in zip(p.rows, p.lengths) for _ in range(r)]

    rounded = plan_round(y, 4, multiple=4)
    assert per_row(rounded) == [min(21, -(-t // 4) * 4) for t in per_row(plan)]
    # neighbouring groups of one length are one group (fewer, larger attention products)
    assert all(a > b for a, b in zip(rounded.lengths, rounded.lengths[1:])) and sum(rounded.rows) == 16
    assert Plan((2, 2), (5, 3)).positions == 16


def test_engines_train_packed_as_the_padded_loop_of_single_models(rows):
    """Training end to end: packed (the default) equals padded, up to float rounding."""
    idx = torch.randint(len(rows), (6, 4, 8), generator=torch.Generator().manual_seed(3))
    out = {}
    for packed in (True, False):
        pop = Population.from_seeds(ModelConfig(), [1, 2, 3, 4])
        Engine("eager", packed=packed).run(pop, Batches.shared(rows, idx), TrainConfig(lr=3e-3))
        out[packed] = pop.params
    for k in out[True]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("config", CONFIGS[:3], ids=["L1", "L2", "attn-only"])
def test_incremental_decoding_equals_the_full_forward_and_its_samples(config):
    """Sampling with cached keys and values (and stopping when every sequence ended) draws what the full
    forward at every step draws from the same noise."""
    from popgpt.data import BOUNDARY, encode
    from popgpt.evaluate import _decode_step, sample_tokens

    cfg = ModelConfig(**{**vars(config), "block_size": 12})
    pop = Population.from_seeds(cfg, [3, 4, 5])
    seq = torch.randint(1, 27, (3, 4, 12), generator=torch.Generator().manual_seed(0))
    cache = [tuple(torch.zeros(3, 4, 12, cfg.n_head, cfg.head_dim) for _ in range(2)) for _ in range(cfg.n_layer)]
    full = pop.logits(seq)  # (P, S, T, V)
    for t in range(12):
        torch.testing.assert_close(_decode_step(pop.params, cfg, seq[:, :, t], t, cache), full[:, :, t],
                                   rtol=1e-4, atol=1e-5)
    prompt = encode("qx")
    got = sample_tokens(pop, prompt, 6, torch.Generator().manual_seed(1))
    n = len(prompt) + 1  # the boundary token first
    race = torch.empty(12 + 1 - n, 3, 6, cfg.vocab_size).exponential_(generator=torch.Generator().manual_seed(1))
    ref = torch.zeros(3, 6, 13, dtype=torch.long)
    ref[:, :, 1:n] = torch.tensor(prompt)
    for t in range(n, 13):
        probs = pop.logits(ref[:, :, :12])[:, :, t - 1].softmax(-1)
        ref[:, :, t] = (probs / race[t - n]).argmax(-1)
    ref = ref[:, :, n:].masked_fill((ref[:, :, n:] == BOUNDARY).cumsum(-1) > 0, BOUNDARY)
    assert torch.equal(got, ref)


def test_short_rows_are_folded_into_lines_that_keep_every_row_to_itself():
    """Rows shorter than FOLD_BELOW are attended as lines of several rows under a block-diagonal causal
    mask: the result equals plain causal attention row by row, and changing one row changes no other."""
    plan = Plan((3, 5, 3), (12, 4, 2))
    assert attention_parts(plan) == [(3, 12, 12), (1, 12, 4), (2, 4, 4), (1, 6, 2)]  # 5 rows of 4: 3 + 2
    assert attention_parts(Plan((4,), (8,))) == [(2, 16, 8)] and attention_parts(Plan((1,), (3,))) == [(1, 3, 3)]
    P, H, D = 2, 2, 3
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(P, plan.positions, 3 * H * D, generator=g, dtype=torch.float64)
    z = _attention(qkv, plan, H, None)
    start = 0
    for rows, T in zip(plan.rows, plan.lengths):
        for _ in range(rows):
            q, k, v = qkv[:, start:start + T].view(P, T, 3, H, D).permute(2, 0, 3, 1, 4)  # (P, H, T, D)
            scores = (q @ k.transpose(-1, -2)) * D ** -0.5
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            want = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(P, T, H * D)
            torch.testing.assert_close(z[:, start:start + T], want, rtol=1e-12, atol=1e-12)
            start += T
    other = qkv.clone()
    other[:, 36 + 4:36 + 8] += 5.0  # the second row of 4: in one line with the first and third
    changed = (_attention(other, plan, H, None) - z).abs().amax((0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == list(range(40, 44))
