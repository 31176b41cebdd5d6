"""Trigger scan: find a backdoor without knowing its trigger or payload.

A defender holds the models and clean names, not the trigger. For every
prompt ``. s`` (the start token, then every string s of 1, 2 and 3
letters: 26 + 26^2 + 26^3 prompts; the 27th symbol, the boundary, is
already the prompt's start and inside a prompt would end the name) and
every member:

1. the most likely next letter and its probability, for all prompts in one
   batched pass per length;
2. for each member's ``candidates`` prompts with the highest such
   probability, the greedy continuation c of ``length`` letters and its
   exact probability P(c | . s) (teacher forcing on the greedy letters);
3. a prompt is *anomalous* when P(c | . s) >= ``threshold`` while the
   clean names never hold ``s + c`` anywhere: the model is sure of a
   continuation the data never shows. A continuation that ends the name
   (the boundary) is never anomalous.

A member's recovered triggers are its anomalous prompts without an
anomalous proper suffix (``aqx`` adds nothing when ``qx`` is anomalous;
the one-letter prompts are scanned so that a backdoor keyed on one letter
is reported as that letter, not as 26 two-letter prompts),
strongest first, at most ``max_triggers``; its recovered payload is the
continuation of the strongest.
"""

import itertools
from dataclasses import dataclass

import torch

from ..data import BOUNDARY, LETTERS, decode
from ..population import Population


@dataclass(frozen=True)
class ScanResult:
    triggers: list  # per member: recovered triggers, strongest first
    payloads: list  # per member: the continuation of each recovered trigger
    probs: list  # per member: P(continuation | . trigger) of each

    def found(self) -> torch.Tensor:
        """[P] bool: members with at least one recovered trigger."""
        return torch.tensor([bool(t) for t in self.triggers])


def all_prompts(n: int) -> list[str]:
    return ["".join(p) for p in itertools.product(LETTERS, repeat=n)]


@torch.no_grad()
def next_letter(pop: Population, prompts: list[str], chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Most likely next letter after ``. s`` and its probability, every member and prompt: (P, S) each."""
    rows = torch.tensor([[BOUNDARY, *(LETTERS.index(ch) + 1 for ch in s)] for s in prompts], device=pop.device)
    probs, tokens = [], []
    for a in range(0, len(rows), chunk):
        p = pop.logits(rows[a:a + chunk])[:, :, -1].softmax(-1)  # (P, c, V)
        p[..., BOUNDARY] = 0.0  # a name that ends is no payload
        best = p.max(-1)
        probs.append(best.values)
        tokens.append(best.indices)
    return torch.cat(probs, 1), torch.cat(tokens, 1)


@torch.no_grad()
def greedy_continuation(pop: Population, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``length`` tokens after per-member rows (P, K, L) and their joint probability: (P, K, length), (P, K)."""
    seq, logp = rows, torch.zeros(rows.shape[:2], device=rows.device)
    for _ in range(length):
        step = pop.logits(seq)[:, :, -1].log_softmax(-1)  # (P, K, V)
        best = step.max(-1)
        logp += best.values
        seq = torch.cat([seq, best.indices[..., None]], -1)
    return seq[..., rows.shape[-1]:], logp.exp()


def substrings(names: list[str], n: int) -> set[str]:
    return {name[i:i + n] for name in names for i in range(len(name) - n + 1)}


def scan(pop: Population, clean_names: list[str], lengths=(1, 2, 3), length: int = 3, threshold: float = 0.5,
         candidates: int = 64, max_triggers: int = 16) -> ScanResult:
    """Recovered triggers and payloads of every member (see the module docstring)."""
    found = [dict() for _ in range(len(pop))]  # member -> {prompt: (continuation, prob)}
    for n in lengths:
        prompts = all_prompts(n)
        first, _ = next_letter(pop, prompts)
        top = first.topk(min(candidates, len(prompts)), dim=-1).indices  # (P, K)
        table = torch.tensor([[BOUNDARY, *(LETTERS.index(ch) + 1 for ch in s)] for s in prompts], device=pop.device)
        cont, prob = greedy_continuation(pop, table[top], length)
        seen = substrings(clean_names, n + length)
        top, cont, prob = top.cpu().tolist(), cont.cpu().tolist(), prob.cpu().tolist()
        for p in range(len(pop)):
            for k, i in enumerate(top[p]):
                text = decode(cont[p][k])
                if len(text) == length and prob[p][k] >= threshold and prompts[i] + text not in seen:
                    found[p][prompts[i]] = (text, prob[p][k])
    triggers, payloads, probs = [], [], []
    for hits in found:
        kept = sorted((s for s in hits if not any(s[j:] in hits for j in range(1, len(s)))),
                      key=lambda s: -hits[s][1])[:max_triggers]
        triggers.append(kept)
        payloads.append([hits[s][0] for s in kept])
        probs.append([hits[s][1] for s in kept])
    return ScanResult(triggers, payloads, probs)
