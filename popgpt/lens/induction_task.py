"""The induction task's rows: a string written twice, with every choice that decides what it pays.

A row is ``. u s g s .``: a random prefix u, a string s of ``min_len`` ..
``max_len`` tokens, a gap g of 0 .. ``gap_max`` tokens, s again. The length
of s, the prefix and the gap are drawn per row, so no positional rule
("attend k - 1 back") predicts the second copy; with ``distinct`` no token
occurs twice in u, s and g, so the only earlier occurrence of a second-copy
token is its twin in the first copy (26 letters make repeats common: 85% of
10-letter strings repeat a letter). Tokens are 1 .. ``vocab - 1`` (0 is the
boundary); a vocabulary beyond 27 adds synthetic tokens after the letters.

``loss="second"`` puts the training targets on the second copy's
predictable tokens only (s_1 .. s_k of the second copy); ``"first+second"``
trains on every next token of the row, as a language model does.

Scoring rows (``ScoringRows``) are drawn the same way with distinct tokens
always (so a perfect induction head scores 1.0, not the 0.82 ceiling of
repeated letters) and carry, for every predictable second-copy query, the
position of its twin in the first copy.
"""

from dataclasses import dataclass

import torch

from ..data import BOUNDARY, IGNORE

LOSSES = ("first+second", "second")


@dataclass(frozen=True)
class TaskSpec:
    """What a repeat row holds; see the module docstring."""

    min_len: int
    max_len: int
    gap_max: int
    distinct: bool
    vocab: int
    block_size: int

    def check(self) -> None:
        if self.vocab < 3:
            raise ValueError(f"--vocab must be >= 3 (a boundary and two tokens), got {self.vocab}")
        if self.min_len < 2 or self.max_len < self.min_len:
            raise ValueError(f"--min-len {self.min_len} .. --max-len {self.max_len}: need 2 <= min <= max")
        if self.gap_max < 0:
            raise ValueError(f"--gap-max must be >= 0, got {self.gap_max}")
        if 2 * self.max_len + self.gap_max + 1 > self.block_size:
            raise ValueError(f"--max-len {self.max_len} and --gap-max {self.gap_max}: a row needs "
                             f"2 * max-len + gap-max + 1 <= block size {self.block_size}")
        if self.max_len + self.gap_max > self.vocab - 1:
            raise ValueError(f"--vocab {self.vocab}: distinct tokens need max-len + gap-max <= vocab - 1 "
                             f"= {self.vocab - 1} (scoring rows always use distinct tokens)")


def _draw(spec: TaskSpec, n: int, distinct: bool, g: torch.Generator) -> list[tuple[list, list, list]]:
    """(u, s, gap) token lists per row."""
    k = torch.randint(spec.min_len, spec.max_len + 1, (n,), generator=g)
    gap = torch.randint(0, spec.gap_max + 1, (n,), generator=g)
    room = spec.block_size - 1 - 2 * k - gap
    if distinct:
        room = torch.minimum(room, spec.vocab - 1 - k - gap)
    prefix = (torch.rand(n, generator=g, dtype=torch.float64) * (room + 1)).long()
    out = []
    for i in range(n):
        total = int(prefix[i] + k[i] + gap[i])
        if distinct:
            tokens = (torch.randperm(spec.vocab - 1, generator=g)[:total] + 1).tolist()
        else:
            tokens = torch.randint(1, spec.vocab, (total,), generator=g).tolist()
        p, ki = int(prefix[i]), int(k[i])
        out.append((tokens[:p], tokens[p:p + ki], tokens[p + ki:]))
    return out


def task_rows(spec: TaskSpec, n: int, loss: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows: inputs and targets (n, block_size) each, IGNORE where nothing is trained."""
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    x = torch.zeros(n, spec.block_size, dtype=torch.long)
    y = torch.full((n, spec.block_size), IGNORE, dtype=torch.long)
    for i, (u, s, gap) in enumerate(_draw(spec, n, spec.distinct, g)):
        row = torch.tensor([BOUNDARY, *u, *s, *gap, *s, BOUNDARY])
        x[i, :len(row) - 1] = row[:-1]
        if loss == "first+second":
            y[i, :len(row) - 1] = row[1:]
        else:
            start = 1 + len(u) + len(s) + len(gap)  # the second copy's first token
            y[i, start:start + len(s) - 1] = row[start + 1:start + len(s)]
    return x, y


@dataclass(frozen=True)
class ScoringRows:
    """Rows ``. u s g s .`` with distinct tokens, and every predictable second-copy query.

    ``tokens`` (B, T); ``row``, ``query``, ``twin`` (Q,): query position in
    the second copy (tokens s_0 .. s_{k-2}), the position of the same token
    in the first copy (so ``twin + 1`` holds the token the query predicts;
    a first-copy query at ``twin`` predicts it too, but cannot copy it); ``ends`` (B,): the row's
    last input position + 1 (positions 1 .. ends - 1 are scored for the
    previous-token score)."""

    tokens: torch.Tensor
    row: torch.Tensor
    query: torch.Tensor
    twin: torch.Tensor
    ends: torch.Tensor

    def to(self, device) -> "ScoringRows":
        return ScoringRows(*(t.to(device) for t in (self.tokens, self.row, self.query, self.twin, self.ends)))

    @property
    def target(self) -> torch.Tensor:
        """The token each query should predict: (Q,)."""
        return self.tokens[self.row, self.twin + 1]


def scoring_rows(spec: TaskSpec, n: int, g: torch.Generator) -> ScoringRows:
    """``n`` scoring rows of random length, prefix and gap, distinct tokens."""
    tokens = torch.zeros(n, spec.block_size, dtype=torch.long)
    rows, queries, twins, ends = [], [], [], []
    for i, (u, s, gap) in enumerate(_draw(spec, n, True, g)):
        seq = [BOUNDARY, *u, *s, *gap, *s]
        tokens[i, :len(seq)] = torch.tensor(seq)
        first, second = 1 + len(u), 1 + len(u) + len(s) + len(gap)
        for j in range(len(s) - 1):
            rows.append(i)
            queries.append(second + j)
            twins.append(first + j)
        ends.append(len(seq))
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return ScoringRows(tokens, as_long(rows), as_long(queries), as_long(twins), as_long(ends))


def fixed_rows(n: int, length: int, vocab: int, g: torch.Generator) -> ScoringRows:
    """The old test set ``. r r`` (r: ``length`` distinct tokens, no prefix, no gap): a positional window
    of ``length - 1`` back scores as induction on it, which is why scores use ``scoring_rows``."""
    spec = TaskSpec(length, length, 0, True, vocab, 2 * length + 1)
    return scoring_rows(spec, n, g)
