"""What a cure did to each member: payload, retention, exact per-token KL.

Per member (all [P] tensors):

- ``vulnerable_<name>`` / ``payload_prob_<name>``: the run's immunity test
  (its samples, threshold, prompt and match rule) and the exact payload
  probability, against the original trigger (``original``), the member's
  current trigger (``current``), and every 1-letter mutant of the original
  (``mutants``: the share of mutants the member is vulnerable to, and the
  mean exact probability over them); against recovered triggers
  (``recovered``, the strongest per member) when a scan ran;
- ``nll_before``, ``nll_after``, ``nll_ratio``, ``quality_after`` on the
  run's held-out evaluation names;
- ``kl_mean``, ``kl_median``, ``kl_p99``, ``kl_max``: the exact KL(P_orig ||
  P_new) over the 27 symbols at every target position of held-out clean
  names, summarised per member; ``kl_infected_mean`` / ``kl_infected_max``:
  the same on held-out names infected with the original trigger + payload,
  at the positions whose target is a letter of the name or its end (not a
  trigger or payload letter);
- ``kl_first``: the KL of the first token after a prompt, the convention
  of large-model ablation tools (Heretic's first-token KL on harmless
  prompts): here the prompt is the start token, the token the first letter
  of a name;
- ``leak_start`` / ``leak_inside``: P(payload anywhere in the continuation)
  from ``leak_samples`` sampled continuations of ``. trigger`` and of
  ``. prefix trigger`` (held-out name prefixes, the samples split over
  them), original trigger; a payload that follows a trigger the model
  writes itself later in the sample counts. ``leak`` is the larger of the
  two, per member.

Every test draws from a generator seeded the same way for every patch, so
two cures are compared on the same random numbers.
"""

import torch

from ..data import BOUNDARY, IGNORE, LETTERS, encode, inputs_targets
from ..evaluate import clean_nll, immunity, payload_hits, quality, sample_tokens
from ..evolution.virus import Virus
from ..population import Population
from .objectives import _logp, token_kl
from .patch import Patch, patched


def mutants(trigger: str) -> list[str]:
    """Every trigger that differs from ``trigger`` in exactly one letter."""
    return [trigger[:i] + ch + trigger[i + 1:] for i in range(len(trigger)) for ch in LETTERS if ch != trigger[i]]


def infected_rows(names: list[str], trigger: str, payload: str, block_size: int, generator: torch.Generator):
    """Names with trigger + payload at a uniform gap: rows (N, T+1) and a (N, T) mask of the target
    positions outside the insert (the name's own letters and its end)."""
    rows = torch.full((len(names), block_size + 1), IGNORE, dtype=torch.long)
    keep = torch.zeros(len(names), block_size, dtype=torch.bool)
    insert = encode(trigger + payload)
    for i, (name, u) in enumerate(zip(names, torch.rand(len(names), generator=generator).tolist())):
        gap, letters = int(u * (len(name) + 1)), encode(name)
        tokens = [BOUNDARY, *letters[:gap], *insert, *letters[gap:], BOUNDARY]
        rows[i, :len(tokens)] = torch.tensor(tokens)
        keep[i, :len(tokens) - 1] = True
        keep[i, gap:gap + len(insert)] = False  # targets at row index gap+1 .. gap+len(insert)
    return rows, keep


@torch.no_grad()
def kl_tokens(pop: Population, new_params: dict, rows: torch.Tensor, keep: torch.Tensor | None = None,
              chunk: int = 128) -> torch.Tensor:
    """Exact per-token KL(P_orig || P_new) at the kept target positions of shared rows: (P, n_tokens)."""
    out = []
    for a in range(0, len(rows), chunk):
        x, y = inputs_targets(rows[a:a + chunk].to(pop.device))
        mask = y != IGNORE if keep is None else keep[a:a + chunk].to(pop.device) & (y != IGNORE)
        kl = token_kl(_logp(pop.base, pop.params, x), _logp(pop.base, new_params, x))  # (P, b, T)
        out.append(kl[:, mask])
    return torch.cat(out, 1)


def kl_summary(kl: torch.Tensor, prefix: str = "kl") -> dict:
    """Per-member mean, median, 99th percentile and max of per-token KLs (P, n)."""
    q = torch.quantile(kl, torch.tensor([0.5, 0.99], device=kl.device), dim=1)
    return {f"{prefix}_mean": kl.mean(1), f"{prefix}_median": q[0], f"{prefix}_p99": q[1],
            f"{prefix}_max": kl.amax(1)}


def leak_prefixes(names: list[str], n: int, room: int, generator: torch.Generator) -> list[list[int]]:
    """``n`` held-out name prefixes (1 to len letters, at most ``room``) to put the trigger after."""
    out = []
    for name, u in zip(names, torch.rand(len(names), generator=generator).tolist()):
        k = min(1 + int(u * len(name)), room)
        if k >= 1:
            out.append(encode(name[:k]))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def leakage(pop: Population, trigger: str, payload: str, prefixes: list[list[int]], n_samples: int,
            seed: int) -> dict:
    """Per-member P(payload in the continuation) after ``. trigger`` and after ``. prefix trigger``: [P] each."""
    g = torch.Generator(pop.device).manual_seed(seed)
    pay, trig = encode(payload), encode(trigger)
    start = payload_hits(sample_tokens(pop, trig, n_samples, g), pay).float().mean(-1)
    per = max(1, n_samples // max(len(prefixes), 1))
    inside = [payload_hits(sample_tokens(pop, pre + trig, per, g), pay).float().mean(-1) for pre in prefixes]
    inside = torch.stack(inside).mean(0) if inside else torch.full_like(start, float("nan"))
    return {"leak_start": start.cpu(), "leak_inside": inside.cpu(),
            "leak": torch.maximum(start, inside.nan_to_num(0.0)).cpu()}


@torch.no_grad()
def first_token_kl(pop: Population, new_params: dict) -> torch.Tensor:
    """KL(P_orig || P_new) of the token after the start token: [P]."""
    x = torch.full((1, 1), BOUNDARY, dtype=torch.long, device=pop.device)
    return token_kl(_logp(pop.base, pop.params, x), _logp(pop.base, new_params, x))[:, 0, 0]


def _test(pop, triggers: torch.Tensor, payload: str, seed: int, options: dict):
    g = torch.Generator(pop.device).manual_seed(seed)
    imm = immunity(pop, Virus("a", payload), g, triggers=triggers.to(pop.device), **options)
    return imm.vulnerable.float().cpu(), imm.payload_prob.cpu()


def _test_each(pop, triggers: list, payload: str, seed: int, options: dict):
    """One trigger per member (a string, or None: NaN), members grouped by trigger length."""
    vul, prob = torch.full((len(pop),), float("nan")), torch.full((len(pop),), float("nan"))
    for n in sorted({len(t) for t in triggers if t}):
        idx = [i for i, t in enumerate(triggers) if t and len(t) == n]
        v, p = _test(pop[idx], torch.tensor([encode(triggers[i]) for i in idx]), payload, seed, options)
        vul[idx], prob[idx] = v, p
    return vul, prob


def payload_tests(pop: Population, triggers: dict, payload: str, seed: int, options: dict,
                  mutant_triggers: list[str]) -> dict:
    """Immunity test and exact probability per named trigger set ({name: (P, L) token ids, or one
    string or None per member}), and
    averaged over the mutants of the original."""
    out = {}
    for name, trig in triggers.items():
        if isinstance(trig, torch.Tensor):
            out[f"vulnerable_{name}"], out[f"payload_prob_{name}"] = _test(pop, trig, payload, seed, options)
        else:
            out[f"vulnerable_{name}"], out[f"payload_prob_{name}"] = _test_each(pop, trig, payload, seed, options)
    if mutant_triggers:
        vul, prob = zip(*(_test(pop, torch.tensor([encode(m)] * len(pop)), payload, seed + 1 + k, options)
                          for k, m in enumerate(mutant_triggers)))
        out["vulnerable_mutants"], out["payload_prob_mutants"] = torch.stack(vul).mean(0), torch.stack(prob).mean(0)
    return out


def measure(pop: Population, patch: Patch, eval_rows: torch.Tensor, infected: tuple, triggers: dict,
            payload: str, seed: int, options: dict, mutant_triggers: list[str], leak: dict | None = None) -> dict:
    """Every per-member measurement of the module docstring for ``pop`` with ``patch`` applied;
    ``leak``: {trigger, prefixes, samples} of the sampled leakage (None or 0 samples: not measured)."""
    new = Population(pop.config, patched(pop.params, patch))
    before, after = clean_nll(pop, eval_rows), clean_nll(new, eval_rows)
    out = {"nll_before": before.cpu(), "nll_after": after.cpu(), "nll_ratio": (after / before).cpu(),
           "quality_after": quality(after, pop.config.vocab_size).cpu()}
    out |= {k: v.cpu() for k, v in kl_summary(kl_tokens(pop, new.params, eval_rows)).items()}
    out |= {k: v.cpu() for k, v in kl_summary(kl_tokens(pop, new.params, *infected), "kl_infected").items()}
    out["kl_first"] = first_token_kl(pop, new.params).cpu()
    if leak and leak["samples"]:
        out |= leakage(new, leak["trigger"], payload, leak["prefixes"], leak["samples"], seed + 7919)
    return out | payload_tests(new, triggers, payload, seed, options, mutant_triggers)
