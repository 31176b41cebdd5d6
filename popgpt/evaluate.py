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
import torch.nn.functional as F

from .data import BOUNDARY, IGNORE, decode, encode, inputs_targets
from .device import LOGIT_BUDGET, to_device
from .model import rmsnorm
from .packed import Plan, needed_lengths, packed_nll_sum, plan_shared
from .population import Population


def on_device(tokens: list[int], device) -> torch.Tensor:
    """A small token tensor made on the device by scalar fills: no blocking host-to-device copy."""
    out = torch.empty(len(tokens), dtype=torch.long, device=device)
    for i, tok in enumerate(tokens):
        out[i] = tok
    return out


@dataclass(frozen=True)
class EvalRows:
    """Held-out rows ready to score: sorted by needed length (longest first) on the host, on a device,
    with their plan (one group per length: no padding) and their number of real targets."""

    rows: torch.Tensor  # (N, T+1)
    n_targets: int
    plan: Plan

    @classmethod
    def of(cls, rows: torch.Tensor, device=None) -> "EvalRows":
        """Sorted where ``rows`` are (a host read if they are on a GPU), then moved to ``device``."""
        host = rows.cpu()
        lengths = needed_lengths(host[:, 1:].long())
        order = lengths.sort(descending=True, stable=True).indices
        return cls(to_device(host[order], device or rows.device), int((host[:, 1:] != IGNORE).sum()),
                   plan_shared(lengths[order].tolist()))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)


def _chunks(plan: Plan, positions: int) -> list[tuple[int, int, Plan]]:
    """(first row, end row, sub-plan) of consecutive chunks of rows holding at most ``positions``
    positions each (a row longer than that makes a chunk of its own)."""
    out, rows, lengths, start, used = [], [], [], 0, 0

    def close():
        nonlocal rows, lengths, start, used
        out.append((start, start + sum(rows), Plan(tuple(rows), tuple(lengths))))
        start, rows, lengths, used = start + sum(rows), [], [], 0

    for n_rows, length in zip(plan.rows, plan.lengths):
        while n_rows:
            room = (positions - used) // length
            if room == 0 and rows:
                close()
                continue
            take = min(n_rows, max(room, 1))
            rows.append(take)
            lengths.append(length)
            used, n_rows = used + take * length, n_rows - take
    if rows:
        close()
    return out


@torch.no_grad()
def clean_nll(pop: Population, rows, n_targets: int | None = None, head_mask=None,
              chunk_for: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """Mean NLL per character of every member on encoded rows (N, T+1) or ``EvalRows``: [P].

    Computed on packed rows (``packed.py``: rows sorted by length, one group per length, no padding;
    an ``EvalRows`` is sorted once, a tensor of rows at every call). Chunks hold what fits
    ``LOGIT_BUDGET`` logits for ``chunk_for`` members (default: P; a shard of a larger population gives
    the whole one's size, so its sums run in the same order), or ``chunk`` positions; ``head_mask``
    (n_layer, H) ablates heads.
    """
    data = rows if isinstance(rows, EvalRows) else EvalRows.of(rows, pop.device)
    P, V = len(pop), pop.config.vocab_size
    budget = chunk or max(1, LOGIT_BUDGET.get(pop.device.type, 2 ** 25) // ((chunk_for or P) * V))
    total = torch.zeros(P, device=pop.device)
    for a, b, plan in _chunks(data.plan, budget):
        x, y = inputs_targets(data.rows[a:b])  # (b - a, T) shared by all members
        total += packed_nll_sum(pop.params, pop.config, x, y, plan, head_mask)[0]
    return total / (n_targets if n_targets is not None else data.n_targets)


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


def _decode_step(params: dict, config, tok: torch.Tensor, t: int, cache: list) -> torch.Tensor:
    """Logits (P, S, V) at position t of every sequence, given its token there (P, S) and the keys and
    values of positions < t in ``cache`` (per layer, (P, S, T, H, D) each; position t is written)."""
    P, S = tok.shape
    C, H = config.n_embd, config.n_head
    D = C // H
    norm = (lambda x: rmsnorm(x, config.norm_eps)) if config.norm else (lambda x: x)
    h = params["wte"][torch.arange(P, device=tok.device)[:, None], tok] + params["wpe"][:, t, None]  # (P, S, C)
    for i, (keys, values) in enumerate(cache):
        pre = f"blocks.{i}."
        q, k, v = torch.bmm(norm(h), params[pre + "attn_qkv"].transpose(1, 2)).view(P, S, 3, H, D).unbind(2)
        keys[:, :, t], values[:, :, t] = k, v
        scores = torch.einsum("pshd,psjhd->pshj", q, keys[:, :, :t + 1]) * D ** -0.5  # (P, S, H, t+1)
        z = torch.einsum("pshj,psjhd->pshd", scores.softmax(-1), values[:, :, :t + 1]).reshape(P, S, C)
        h = h + torch.bmm(z, params[pre + "attn_out"].transpose(1, 2))
        if config.mlp:
            hidden = F.relu(torch.bmm(norm(h), params[pre + "mlp_fc1"].transpose(1, 2)))
            h = h + torch.bmm(hidden, params[pre + "mlp_fc2"].transpose(1, 2))
    return torch.bmm(norm(h), params["lm_head"].transpose(1, 2))  # (P, S, V)


@torch.no_grad()
def sample_tokens(pop: Population, prompt, n_samples: int, generator: torch.Generator,
                  temperature: float = 1.0, start_token: bool = True, shard: tuple | None = None) -> torch.Tensor:
    """Continue ``boundary + prompt`` n_samples times per member: (P, S, L) tokens.

    ``prompt``: a list of token ids for all members, or a (P, L) tensor, one
    prompt per member. L = block_size + 1 - (prompt length + 1): generation
    runs to the end of the context. Everything after a sample's first
    boundary token is boundary. Decoding is incremental: each step runs one
    position per sequence against cached keys and values (the logits of the
    full forward, up to float rounding). On a CPU it stops once every
    sequence has ended (a check per step, free there; a GPU would wait for
    it, so there it runs to the end). Tokens are drawn by the exponential
    race (argmax of p / Exp(1), an exact sample of p), which unlike
    ``torch.multinomial`` never checks its input on the host; the noise of
    every step is drawn up front (on a CPU the same numbers as step by step),
    so stopping early leaves the generator where running on would. ``shard``
    (first, total): these members are rows first.. of a population of
    ``total``; the noise is drawn for all of them and these rows used, so a
    shard samples what the whole does.
    """
    cfg, P = pop.config, len(pop)
    T, first, total = cfg.block_size, *(shard or (0, P))
    start = member_prompts(prompt, pop, start_token)  # (P, n)
    n = start.shape[1]
    if n > T:
        raise ValueError(f"prompt of {n - 1} tokens leaves no room in block_size {T}")
    seq = torch.zeros(P, n_samples, T + 1, dtype=torch.long, device=pop.device)
    seq[:, :, :n] = start[:, None, :]
    dtype = pop.params["wte"].dtype
    race = torch.empty((T + 1 - n, total, n_samples, cfg.vocab_size), dtype=dtype, device=pop.device)
    race = race.exponential_(generator=generator)[:, first:first + P]  # (steps, P, S, V) of all members'
    cache = [tuple(torch.zeros(P, n_samples, T, cfg.n_head, cfg.head_dim, dtype=dtype, device=pop.device)
                   for _ in range(2)) for _ in range(cfg.n_layer)]
    for t in range(T):
        logits = _decode_step(pop.params, cfg, seq[:, :, t], t, cache)  # (P, S, V)
        if t + 1 < n:
            continue  # still reading the prompt
        probs = (logits / temperature).softmax(-1)
        seq[:, :, t + 1] = (probs / race[t + 1 - n]).argmax(-1)  # (P, S)
        if pop.device.type == "cpu" and bool((seq[:, :, n:t + 2] == BOUNDARY).any(-1).all()):
            break  # every sequence has ended: the rest would be boundary
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
