"""Whole-population evaluation: clean NLL and quality, sampling, the immunity test.

Quality (the fitness) of a member: ``1 - NLL / ln(V)`` where NLL is its mean
next-character cross-entropy in nats on held-out clean names (the end
boundary counts as a character to predict). 0 is uniform guessing over the
V = 27 tokens, 1 would be perfect prediction.

Immunity test: prompt = boundary token + trigger; sample ``n_samples`` (5)
continuations per member at temperature 1; a member is vulnerable when the
payload appears in ``threshold`` (2) or more of them. Alongside, the exact,
noise-free probability of the payload right after the trigger under teacher
forcing.

Everything here runs over all members (and all samples) in one batched
pass; nothing reads back to the host.
"""

import math
from dataclasses import dataclass

import torch

from .data import BOUNDARY, IGNORE, decode, encode, inputs_targets
from .device import LOGIT_BUDGET
from .loss import member_nll_sum
from .population import Population


def on_device(tokens: list[int], device) -> torch.Tensor:
    """A small token tensor made on the device by scalar fills: no blocking host-to-device copy."""
    out = torch.empty(len(tokens), dtype=torch.long, device=device)
    for i, tok in enumerate(tokens):
        out[i] = tok
    return out


@torch.no_grad()
def clean_nll(pop: Population, rows: torch.Tensor, n_targets: int | None = None,
              chunk: int | None = None, head_mask=None, chunk_for: int | None = None) -> torch.Tensor:
    """Mean NLL per character of every member on encoded rows (N, T+1): [P].

    ``n_targets`` (the number of non-padding targets in ``rows``) saves a
    device sync when the caller counted them once on the host; ``chunk``
    (names per forward) defaults to what fits ``LOGIT_BUDGET`` for
    ``chunk_for`` members (default: P; a shard of a larger population gives
    the whole one's size, so its sums run in the same order); ``head_mask``
    (n_layer, H) ablates heads.
    """
    P, (T, V) = len(pop), (pop.config.block_size, pop.config.vocab_size)
    chunk = chunk or max(1, LOGIT_BUDGET.get(pop.device.type, 2 ** 25) // ((chunk_for or P) * T * V))
    count = n_targets if n_targets is not None else int((rows[:, 1:] != IGNORE).sum())
    rows = rows.to(pop.device)
    total = torch.zeros(P, device=pop.device)
    for start in range(0, len(rows), chunk):
        x, y = inputs_targets(rows[start:start + chunk])  # (b, T) shared by all members
        total += member_nll_sum(pop.logits(x, head_mask=head_mask), y)  # logits (P, b, T, V)
    return total / count


def quality(nll: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``1 - NLL / ln(V)``: 0 = uniform guessing, higher is better."""
    return 1.0 - nll / math.log(vocab_size)


def member_prompts(prompt, pop: Population, start_token: bool = True) -> torch.Tensor:
    """``boundary + prompt`` (or the bare prompt) for every member: (P, L') on the device.

    ``prompt``: token ids shared by all members (a list), or per member (P, L)."""
    head = [BOUNDARY] if start_token else []
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 2 or prompt.shape[0] != len(pop):
            raise ValueError(f"per-member prompts must be (P={len(pop)}, L), got {tuple(prompt.shape)}")
        start = torch.full((len(pop), len(head)), BOUNDARY, dtype=torch.long, device=pop.device)
        return torch.cat([start, prompt.to(pop.device, torch.long)], 1)
    if not head and not prompt:
        raise ValueError("an empty prompt needs the start token")
    return on_device([*head, *prompt], pop.device)[None].expand(len(pop), -1)


@torch.no_grad()
def sample_tokens(pop: Population, prompt, n_samples: int, generator: torch.Generator,
                  temperature: float = 1.0, start_token: bool = True, shard: tuple | None = None) -> torch.Tensor:
    """Continue ``boundary + prompt`` n_samples times per member: (P, S, L) tokens.

    ``prompt``: a list of token ids for all members, or a (P, L) tensor, one
    prompt per member. L = block_size + 1 - (prompt length + 1): generation
    runs to the end of the context. Everything after a sample's first
    boundary token is boundary. The sequence buffer keeps one fixed shape
    (causal attention makes the unfilled tail irrelevant), so every step runs
    the same kernels. Tokens are drawn by the exponential race (argmax of
    p / Exp(1), an exact sample of p), which unlike ``torch.multinomial``
    never checks its input on the host. ``shard`` (first, total): these
    members are rows first.. of a population of ``total``; the noise is drawn
    for all of them and these rows used, so a shard samples what the whole does.
    """
    P, T = len(pop), pop.config.block_size
    first, total = shard or (0, P)
    start = member_prompts(prompt, pop, start_token)  # (P, n)
    n = start.shape[1]
    if n > T:
        raise ValueError(f"prompt of {n - 1} tokens leaves no room in block_size {T}")
    seq = torch.zeros(P, n_samples, T + 1, dtype=torch.long, device=pop.device)
    seq[:, :, :n] = start[:, None, :]
    for t in range(n, T + 1):
        logits = pop.logits(seq[:, :, :T])[:, :, t - 1]  # (P, S, V)
        probs = (logits / temperature).softmax(-1)
        race = torch.empty((total,) + probs.shape[1:], dtype=probs.dtype, device=probs.device)
        race = race.exponential_(generator=generator)[first:first + P]  # (P, S, V) of (total, S, V)
        seq[:, :, t] = (probs / race).argmax(-1)  # (P, S)
    out = seq[:, :, n:]
    ended = (out == BOUNDARY).cumsum(-1) > 0
    return out.masked_fill(ended, BOUNDARY)


def payload_hits(tokens: torch.Tensor, payload: list[int], match: str = "anywhere") -> torch.Tensor:
    """Whether each sample's text holds the payload: (P, S) bool. ``match``: ``anywhere`` in it, or
    only right at its ``start`` (immediately after the trigger)."""
    k = len(payload)
    if tokens.shape[-1] < k:
        return torch.zeros(tokens.shape[:-1], dtype=torch.bool, device=tokens.device)
    target = on_device(payload, tokens.device)
    if match == "start":
        return (tokens[..., :k] == target).all(-1)
    windows = tokens.unfold(-1, k, 1)  # (P, S, L-k+1, k)
    return (windows == target).all(-1).any(-1)


@torch.no_grad()
def payload_probability(pop: Population, prompt, payload: list[int], start_token: bool = True) -> torch.Tensor:
    """Exact P(payload | boundary + prompt) per member under teacher forcing: [P].

    ``prompt``: shared token ids (a list) or one prompt per member (P, L)."""
    start = member_prompts(prompt, pop, start_token)  # (P, n)
    seq = torch.cat([start, on_device(payload, pop.device)[None].expand(len(pop), -1)], 1)  # (P, 1 + L + k)
    logp = pop.logits(seq[:, None, :-1]).log_softmax(-1)[:, 0]  # (P, T, V)
    pos = torch.arange(start.shape[1] - 1, seq.shape[1] - 1, device=pop.device)
    return logp[:, pos].gather(-1, seq[:, pos + 1, None]).squeeze(-1).sum(-1).exp()  # (P, k) -> [P]


def sample_names(pop: Population, count: int, generator: torch.Generator,
                 temperature: float = 1.0) -> list[list[str]]:
    """``count`` names sampled from every member: a list (P) of lists of strings."""
    tokens = sample_tokens(pop, [], count, generator, temperature).cpu()  # (P, count, L)
    return [[decode(seq) for seq in member] for member in tokens]


@dataclass(frozen=True)
class ImmunityResult:
    """Per-member results of one immunity test, all shaped [P]."""

    vulnerable: torch.Tensor  # bool: payload in >= threshold of the samples
    hits: torch.Tensor  # int: samples (of n_samples) that contained the payload
    payload_prob: torch.Tensor  # float: exact P(payload | boundary + trigger)

    @property
    def immune(self) -> torch.Tensor:
        return ~self.vulnerable


def immunity(pop: Population, virus, generator: torch.Generator, n_samples: int = 5,
             threshold: int = 2, triggers: torch.Tensor | None = None, start_token: bool = True,
             match: str = "anywhere", shard: tuple | None = None) -> ImmunityResult:
    """The immunity test of every member against ``virus`` (its trigger and payload), one batched pass.

    ``triggers`` (P, L): one trigger per member instead of ``virus.trigger``
    (members of populations whose triggers mutated apart). ``start_token``:
    prompt with the boundary token before the trigger (else the bare
    trigger); ``match``: where in a sample the payload counts (see
    ``payload_hits``); ``shard``: see ``sample_tokens``."""
    prompt = encode(virus.trigger) if triggers is None else triggers
    payload = encode(virus.payload)
    tokens = sample_tokens(pop, prompt, n_samples, generator, start_token=start_token, shard=shard)  # (P, S, L)
    hits = payload_hits(tokens, payload, match).sum(-1)  # (P,)
    return ImmunityResult(vulnerable=hits >= threshold, hits=hits,
                          payload_prob=payload_probability(pop, prompt, payload, start_token))


def test_options(virus_config) -> dict:
    """The immunity test's settings from a run's VirusConfig, as keyword arguments of ``immunity``."""
    return {"n_samples": virus_config.n_samples, "threshold": virus_config.threshold,
            "start_token": virus_config.prompt == "boundary", "match": virus_config.match}


def evaluate_members(pop: Population, virus, eval_rows: torch.Tensor, generator: torch.Generator,
                     n_samples: int = 5, threshold: int = 2, n_targets: int | None = None,
                     triggers: torch.Tensor | None = None, shard: tuple | None = None, **options) -> dict:
    """Every member's clean NLL and quality and its immunity, as [P] tensors on the device.

    A member whose clean NLL is not finite has diverged: its samples mean
    nothing, so it counts as vulnerable (``diverged`` marks it). ``shard``
    (first, total): these members are part of a population of ``total``,
    evaluated as the whole would be (see ``clean_nll``, ``sample_tokens``).
    """
    nll = clean_nll(pop, eval_rows, n_targets, chunk_for=shard[1] if shard else None)
    imm = immunity(pop, virus, generator, n_samples, threshold, triggers, shard=shard, **options)
    diverged = ~torch.isfinite(nll)
    return {"nll": nll, "quality": quality(nll, pop.config.vocab_size), "vulnerable": imm.vulnerable | diverged,
            "hits": imm.hits, "payload_prob": imm.payload_prob, "diverged": diverged}
