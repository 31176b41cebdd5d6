"""Reversible weight patches, one per member, stored apart from the base weights.

A patch changes some parameter tensors of every member by a low-rank
product or a dense delta:

- ``factors[name] = (L, R)`` with L (P, out, r) and R (P, r, in):
  ``W + L @ R`` (``wte``/``wpe`` and every matrix alike, in their stored
  ``(out, in)`` layout);
- ``dense[name] = D`` (P, *shape): ``W + D``.

Applying never changes the tensors it read: ``patched`` returns new
tensors, and ``apply_`` (in place) keeps the originals it replaces, so
``remove_`` restores them bit for bit (never by subtracting the delta back,
which would round). A patch file holds plain tensors, strings and ints
(``torch.load(weights_only=True)`` runs no pickled code) and the SHA-256 of
the base weights it was made for: ``load_patch`` and ``apply_`` refuse
other weights.
"""

import hashlib
import io
from dataclasses import dataclass, field

import torch

from ..population import Population
from ..runio import write_atomic

FORMAT = "popgpt-patch-1"


def weights_sha256(params: dict) -> str:
    """SHA-256 of parameter tensors (names, shapes, dtypes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class Patch:
    """Per-member low-rank factors and dense deltas; every tensor has the population axis first."""

    factors: dict = field(default_factory=dict)  # name -> (L (P, out, r), R (P, r, in))
    dense: dict = field(default_factory=dict)  # name -> (P, *shape)
    base_sha256: str | None = None  # the weights it applies to

    def delta(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """The change of one parameter tensor (P, *shape), or None when the patch leaves it alone."""
        out = None
        if name in self.factors:
            L, R = self.factors[name]
            out = torch.bmm(L, R).view_as(like)  # (P, out, in)
        if name in self.dense:
            out = self.dense[name] if out is None else out + self.dense[name]
        return out

    def names(self) -> list[str]:
        return sorted(set(self.factors) | set(self.dense))

    def n_params(self) -> int:
        """Numbers stored per member."""
        n = sum(L[0].numel() + R[0].numel() for L, R in self.factors.values())
        return n + sum(d[0].numel() for d in self.dense.values())

    def index(self, index) -> "Patch":
        """The patch of some members (an index tensor or slice)."""
        return Patch({k: (L[index], R[index]) for k, (L, R) in self.factors.items()},
                     {k: d[index] for k, d in self.dense.items()}, None)

    @classmethod
    def cat(cls, patches: list["Patch"]) -> "Patch":
        first = patches[0]
        return cls({k: (torch.cat([p.factors[k][0] for p in patches]), torch.cat([p.factors[k][1] for p in patches]))
                    for k in first.factors},
                   {k: torch.cat([p.dense[k] for p in patches]) for k in first.dense}, None)

    def scaled(self, scale: torch.Tensor) -> "Patch":
        """The patch times a per-member scale [P] (exactly linear: L is scaled, R kept)."""
        def s(t):
            return t * scale.view(-1, *([1] * (t.dim() - 1)))

        return Patch({k: (s(L), R) for k, (L, R) in self.factors.items()},
                     {k: s(d) for k, d in self.dense.items()}, self.base_sha256)


def patched(params: dict, patch: Patch) -> dict:
    """New parameter dict with the patch added (differentiable in the patch's tensors)."""
    out = dict(params)
    for name in patch.names():
        if name not in params:
            raise ValueError(f"patch changes {name!r}, which the model does not have ({', '.join(params)})")
        out[name] = params[name] + patch.delta(name, params[name])
    return out


def _check_base(pop: Population, patch: Patch) -> None:
    if patch.base_sha256 is not None and weights_sha256(pop.params) != patch.base_sha256:
        raise ValueError("this patch was made for other weights (their SHA-256 differs from the patch's base)")


def apply_(pop: Population, patch: Patch) -> dict:
    """Patch ``pop`` in place; returns the replaced original tensors (for ``remove_``)."""
    _check_base(pop, patch)
    new = patched(pop.params, patch)
    originals = {name: pop.params[name] for name in patch.names()}
    for name in originals:
        pop.params[name] = new[name].detach()
    return originals


def remove_(pop: Population, originals: dict) -> None:
    """Undo ``apply_``: the original tensors go back, bit for bit."""
    pop.params.update(originals)


def save_patch(path: str, patch: Patch, meta: dict | None = None) -> None:
    """Write a patch file atomically (plain tensors, strings and numbers only)."""
    state = {"format": FORMAT, "base_sha256": patch.base_sha256 or "", "meta": dict(meta or {}),
             "factors": {k: {"L": L.detach().cpu().contiguous(), "R": R.detach().cpu().contiguous()}
                         for k, (L, R) in patch.factors.items()},
             "dense": {k: d.detach().cpu().contiguous() for k, d in patch.dense.items()}}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def load_patch(path: str, device="cpu") -> tuple[Patch, dict]:
    """A patch file (loaded with ``weights_only=True``) and its metadata."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a damaged file can fail in many ways; none may run code
        raise ValueError(f"{path}: not a readable popgpt patch ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a popgpt patch (expected format {FORMAT!r})")
    patch = Patch({k: (v["L"], v["R"]) for k, v in state["factors"].items()}, dict(state["dense"]),
                  state["base_sha256"] or None)
    return patch, state["meta"]
