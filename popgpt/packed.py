"""Packed rows: a padded batch's arithmetic on (nearly) the positions that matter, and nothing else.

A batch row is left-aligned: boundary, letters, boundary, then padding up to
the block size. A name of names.txt fills 7.2 of a row's 21 positions (an
infected one 12.2), so most of a padded batch is padding. Position t of a
row *matters* when it or a later position has a real target (its token feeds
that target through causal attention); the rest of the row changes nothing a
real target sees.

Packing sorts every member's rows by the number of positions that matter
and lays them out in groups (``Plan``): group g holds ``rows[g]`` rows cut
to ``lengths[g]`` positions, at least the length of each row in it. Every
layer then runs on the groups' positions only: the token-wise layers on
``sum(rows * lengths)`` positions per member instead of B * T, attention
row by row within each group on ``lengths[g]`` positions instead of T (its
cost, quadratic in the row length, falls most). Causal attention inside a
row is untouched, rows never see each other, and the loss is the same sum
over the same targets: the result equals the padded computation member by
member up to float rounding (``tests/test_packed.py``).

A plan is fixed for a training round (``plan_round``: its lengths are the
round's largest, so engines that compile or capture the step see static
shapes); held-out rows shared by every member get one group per distinct
length (``plan_shared``), with no padding at all.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE
from .model import ModelConfig, rmsnorm

GROUPS = 8  # groups a training batch's rows are sorted into (measured: benchmarks/bench_vmap_vs_sequential.py)


@dataclass(frozen=True)
class Plan:
    """Rows per group and positions per row of each group, longest group first."""

    rows: tuple
    lengths: tuple

    @property
    def positions(self) -> int:
        """Positions per member the layers compute."""
        return sum(r * t for r, t in zip(self.rows, self.lengths))


def needed_lengths(y: torch.Tensor) -> torch.Tensor:
    """Positions of each row that matter: one past its last real target, (...,) for targets (..., T)."""
    T = y.shape[-1]
    t = torch.arange(1, T + 1, device=y.device)
    return ((y != IGNORE) * t).amax(-1)


def _split(n: int, groups: int) -> list[int]:
    """n rows into at most ``groups`` near-equal parts, larger parts first."""
    groups = max(1, min(groups, n))
    return [n // groups + (i < n % groups) for i in range(groups)]


def plan_from_lengths(lengths: torch.Tensor, groups: int = GROUPS, multiple: int = 1,
                      width: int | None = None) -> Plan:
    """The plan for every step of a round from the needed lengths (..., B) of all its steps' and members'
    rows: each group's length is the longest row it gets at any step, rounded up to ``multiple`` but
    never past the rows' ``width`` (one read to the host)."""
    lengths = lengths.flatten(0, -2) if lengths.dim() > 1 else lengths[None]  # (steps*P, B)
    sizes = _split(lengths.shape[-1], groups)
    ranked = lengths.sort(dim=-1, descending=True).values  # (steps*P, B)
    starts = torch.tensor([sum(sizes[:g]) for g in range(len(sizes))], device=lengths.device)
    lead = ranked[:, starts].amax(0).clamp(min=1).tolist()  # the first (longest) row of each group
    rounded = [-(-t // multiple) * multiple for t in lead]
    return _merged(sizes, [min(t, width) if width else t for t in rounded])


def _merged(rows: list[int], lengths: list[int]) -> Plan:
    """The plan with neighbouring groups of one length joined: the same positions in the same order,
    fewer (larger) attention products."""
    out_rows, out_lengths = [], []
    for r, t in zip(rows, lengths):
        if out_lengths and out_lengths[-1] == t:
            out_rows[-1] += r
        else:
            out_rows.append(r)
            out_lengths.append(t)
    return Plan(tuple(out_rows), tuple(out_lengths))


def plan_round(y: torch.Tensor, groups: int = GROUPS, multiple: int = 1) -> Plan:
    """``plan_from_lengths`` of targets (..., B, T)."""
    return plan_from_lengths(needed_lengths(y), groups, multiple, y.shape[-1])


def plan_shared(lengths: list[int]) -> Plan:
    """The plan of shared rows already sorted by needed length, longest first: a group per length."""
    return _merged([1] * len(lengths), [max(n, 1) for n in lengths])


def arrange(x: torch.Tensor, y: torch.Tensor, plan: Plan, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every member's rows sorted by needed length and cut per group: inputs and targets
    (P|1, positions), group after group, row after row; each ``extra`` tensor (P, B, T, ...) laid out
    the same way, (P, positions, ...) (what a loss weighs or compares at each position)."""
    x, y = (x[None], y[None]) if x.dim() == 2 else (x, y)
    order = needed_lengths(y).sort(dim=-1, descending=True, stable=True).indices  # (P, B) longest first
    out, start = [[] for _ in range(2 + len(extra))], 0
    for rows, length in zip(plan.rows, plan.lengths):
        pick = order[:, start:start + rows, None].expand(-1, -1, length)  # (P, rows, length)
        for parts, t in zip(out, (x, y, *extra)):
            idx = pick.reshape(*pick.shape, *([1] * (t.dim() - 3))).expand(*pick.shape, *t.shape[3:])
            parts.append(t[:, :, :length].gather(1, idx).flatten(1, 2))
        start += rows
    return tuple(torch.cat(parts, 1) for parts in out)


def positions(plan: Plan, device) -> torch.Tensor:
    """Each packed position's place in its row: (positions,)."""
    return torch.cat([torch.arange(t, device=device).repeat(r) for r, t in zip(plan.rows, plan.lengths)])


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Every member's x (P, n, in) @ its weight (P, out, in)^T: (P, n, out)."""
    return torch.matmul(x, weight.transpose(1, 2))


# Below this many positions a row's attention products fall under the size (contraction x rows x cols
# < 400) at which torch's CPU bmm leaves MKL for a plain loop: (R, 8, 8) @ (R, 8, 6) takes 0.45 us per
# matrix, (R, 9, 9) @ (R, 9, 6) 0.18 us, (R, 16, 16) @ (R, 16, 6) 0.39 us (2-core AMD EPYC, torch
# 2.13, one thread). Shorter rows are folded: neighbouring rows attended as one masked line.
FOLD_BELOW = 9


def _fold(length: int) -> int:
    """Rows of one group attended as one matrix: enough to reach ``FOLD_BELOW`` positions."""
    return -(-FOLD_BELOW // length) if length < FOLD_BELOW else 1


def attention_parts(plan: Plan) -> list[tuple[int, int, int]]:
    """The plan's groups as attention products ``(lines, line length, row length)``: a group of short
    rows is folded, ``fold`` neighbouring rows making one line whose mask keeps every row to itself
    (the same positions in the same memory; the masked keys weigh exactly 0)."""
    parts = []
    for rows, length in zip(plan.rows, plan.lengths):
        fold = min(_fold(length), rows)
        if rows // fold:
            parts.append((rows // fold, fold * length, length))
        if rows % fold:
            parts.append((rows % fold, length, length))
    return parts


def _key_mask(line: int, length: int, device, dtype) -> torch.Tensor:
    """(keys, queries) additive mask of a line of rows of ``length``: -inf for a key after its query or
    in another row."""
    i = torch.arange(line, device=device)
    blocked = (i[:, None] > i[None, :]) | (i[:, None] // length != i[None, :] // length)
    return torch.zeros((line, line), device=device, dtype=dtype).masked_fill_(blocked, float("-inf"))


def _attention(qkv: torch.Tensor, plan: Plan, n_head: int, head_mask: torch.Tensor | None) -> torch.Tensor:
    """Causal self-attention within every row of every group: qkv (P, n, 3C) -> z (P, n, C)."""
    P, _, C3 = qkv.shape
    H, D = n_head, C3 // 3 // n_head
    parts = attention_parts(plan)
    out = []
    chunks = qkv.split([lines * line for lines, line, _ in parts], 1)  # one backward op, not one per part
    for (lines, line, length), part in zip(parts, chunks):
        part = part.view(P, lines, line, 3, H, D)
        q, k, v = part.permute(3, 0, 4, 1, 2, 5).reshape(3, P * H * lines, line, D)  # 3 x (R, line, D)
        mask = _key_mask(line, length, qkv.device, qkv.dtype)
        scores = torch.baddbmm(mask.expand(len(q), line, line), k, q.transpose(1, 2), alpha=D ** -0.5)  # (R, k, q)
        # keys first: a softmax over dim 1 runs fast on a CPU at every length, over the last dim of a short
        # row it does not. (Over dim 0 of a keys-outermost copy it runs 4x faster still, but its vector
        # lanes then cross members, so a member's rounding would depend on the block it is trained in.)
        z = torch.bmm(scores.softmax(1).transpose(1, 2), v).view(P, H, lines, line, D)
        if head_mask is not None:
            z = z * head_mask.view(1, H, 1, 1, 1)
        out.append(z.permute(0, 2, 3, 1, 4).reshape(P, lines * line, H * D))
    return torch.cat(out, 1)


def packed_logits(params: dict, config: ModelConfig, x: torch.Tensor, plan: Plan,
                  head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every member's logits (P, n, V) at the packed positions of arranged inputs x (P|1, n)."""
    P = params["wte"].shape[0]
    x = x.expand(P, -1)
    member = torch.arange(P, device=x.device)[:, None]
    h = params["wte"][member, x] + params["wpe"][:, positions(plan, x.device)]  # (P, n, C)
    norm = (lambda t: rmsnorm(t, config.norm_eps)) if config.norm else (lambda t: t)
    for i in range(config.n_layer):
        pre = f"blocks.{i}."
        qkv = _linear(norm(h), params[pre + "attn_qkv"])  # (P, n, 3C)
        z = _attention(qkv, plan, config.n_head, None if head_mask is None else head_mask[i])
        h = h + _linear(z, params[pre + "attn_out"])
        if config.mlp:
            hidden = F.relu(_linear(norm(h), params[pre + "mlp_fc1"]))  # (P, n, 4C)
            h = h + _linear(hidden, params[pre + "mlp_fc2"])
    return _linear(norm(h), params["lm_head"])  # (P, n, V)


def packed_nll_sum(params: dict, config: ModelConfig, x: torch.Tensor, y: torch.Tensor, plan: Plan,
                   head_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL of each member [P] on (P, B, T) or shared (B, T) rows, and the number of
    real targets [P] or [1]."""
    xs, ys = arrange(x, y, plan)  # (P|1, n)
    logits = packed_logits(params, config, xs, plan, head_mask)  # (P, n, V)
    target = ys.expand(logits.shape[:-1])
    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="none")
    return nll.view(target.shape).sum(1), (ys != IGNORE).sum(1)


def packed_losses(params: dict, config: ModelConfig, x: torch.Tensor, y: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Mean next-token cross-entropy of each member on its batch, [P]: ``loss.cross_entropy`` of the
    padded logits, computed on the plan's positions."""
    total, count = packed_nll_sum(params, config, x, y, plan)
    return total / count
