"""Per-example gradients of a population and the attribution scores built on them.

Everything is a function of stacked ``[P, ...]`` parameters; members stay
independent (nothing reduces across the population axis).

- **Per-example gradients** (``example_grads``): ``vmap`` over members of
  ``vmap`` over names of ``torch.func.grad`` of one name's loss, flattened
  to (P, n, D) in the model's parameter order (D = 8,712 for the default
  MicroGPT). No hooks. A name's loss is its summed next-character NLL: its
  share of a training batch's loss, up to the batch's constant 1/tokens.
  ``stream_grads`` walks a table of names in chunks (sorted by length, each
  chunk cut to its longest name, which changes no gradient: padding
  positions carry no loss and attention is causal), so memory stays at
  (P, chunk, D) whatever the number of names; with a ``projection`` (D, k)
  each chunk is multiplied by it at once.
- **Queries** are losses on a few sequences with chosen target positions:
  the payload after the trigger (targets: the payload's characters only),
  or clean held-out names (mean NLL per character). ``query_grads`` gives
  their gradients (P, D).
- **TracIn** (Pruthi et al. 2020, TracInCP): sum over checkpoints of
  ``lr * <grad of name, grad of query>``. Positive: a step on the name
  lowers the query loss (a proponent).
- **Influence** with a damped Gauss-Newton inverse: ``<grad of name,
  (G + lambda I)^-1 grad of query>`` at one checkpoint, G the Gauss-Newton
  matrix of the training loss per name, estimated exactly in expectation by
  Monte Carlo: gradients with targets sampled from the model's own
  predictions (for softmax cross-entropy their outer products average to
  J^T H J), over a random subset of training names, G = mean of g g^T; then
  one Cholesky solve per member (D x D: exact, no Kronecker or diagonal
  approximation). lambda = ``damping`` x the mean eigenvalue trace(G)/D.
- **Baselines**: a name's own loss; spectral signatures (Tran et al. 2018:
  squared projection of the centred representation on its top singular
  vector); activation clustering (Chen et al. 2018: 2-means on the top
  principal components; score: how much closer a name is to the smaller
  cluster's centre than to the larger one's). The representation of a name
  is its final residual stream averaged over its positions.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from ..data import BOUNDARY, IGNORE, inputs_targets
from ..population import Population


class Query(NamedTuple):
    """Sequences whose loss is queried: inputs x (n, T), targets y (n, T) (IGNORE where not counted)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def payload(cls, trigger: list[int], payload: list[int]) -> "Query":
        """The payload's summed NLL right after ``boundary + trigger``."""
        seq = torch.tensor([BOUNDARY, *trigger, *payload])
        y = seq[1:].clone()
        y[:len(trigger)] = IGNORE
        return cls("payload", seq[None, :-1], y[None])

    @classmethod
    def names(cls, rows: torch.Tensor, name: str = "clean") -> "Query":
        """Mean NLL per character of encoded names (N, T+1) (the end boundary counts)."""
        x, y = inputs_targets(rows)
        return cls(name, x, y)


def flat(tensors: dict) -> torch.Tensor:
    """A member's tensors as one vector, in the dict's (the model's) order."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def n_params(pop: Population) -> int:
    return sum(v[0].numel() for v in pop.params.values())


def _sequence_loss(base, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed NLL of one member on sequences x, y (n, T)."""
    logits = functional_call(base, params, (x,))  # (n, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")


def example_grads(pop_or_base, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example gradients (P, n, D) of every member on names x (n, T) and targets y: (n, T) shared
    or (P, n, T) per member (targets sampled per member)."""
    base = pop_or_base.base if isinstance(pop_or_base, Population) else pop_or_base

    def one(member_params, xi, yi):
        return flat(grad(_sequence_loss, argnums=1)(base, member_params, xi[None], yi[None]))

    per_name = torch.vmap(one, in_dims=(None, 0, 0))
    return torch.vmap(per_name, in_dims=(0, None, 0 if y.dim() == 3 else None))(params, x, y)


def query_grads(pop: Population, query: Query) -> torch.Tensor:
    """Gradient of the query loss (summed NLL / number of targets) of every member: (P, D)."""
    count = int((query.y != IGNORE).sum())
    x, y = query.x.to(pop.device), query.y.to(pop.device)

    def one(member_params):
        return flat(grad(_sequence_loss, argnums=1)(pop.base, member_params, x, y)) / count

    return torch.vmap(one)(pop.params)


@torch.no_grad()
def query_losses(pop: Population, query: Query) -> torch.Tensor:
    """The query loss of every member: [P]."""
    logits = pop.logits(query.x.to(pop.device))  # (P, n, T, V)
    y = query.y.to(pop.device).expand(logits.shape[:-1])
    nll = F.cross_entropy(logits.flatten(0, 2), y.flatten(), ignore_index=IGNORE, reduction="none")
    return nll.view_as(y).sum((1, 2)) / int((query.y != IGNORE).sum())


def length_chunks(rows: torch.Tensor, chunk: int):
    """(indices, x, y) chunks of encoded rows (N, T+1), shortest names first, each cut to its longest."""
    lengths = (rows != IGNORE).sum(1)
    order = torch.argsort(lengths, stable=True)
    for start in range(0, len(rows), chunk):
        idx = order[start:start + chunk]
        x, y = inputs_targets(rows[idx, :int(lengths[idx].max())])
        yield idx, x, y


def stream_grads(pop: Population, rows: torch.Tensor, chunk: int = 256, projection: torch.Tensor | None = None,
                 targets=None):
    """Yield (indices, per-example gradients (P, n, D or k)) over the names ``rows``, ``chunk`` at a time.

    ``targets(x, y) -> y'`` may replace the targets of a chunk (per member, (P, n, T)).
    """
    for idx, x, y in length_chunks(rows, chunk):
        x, y = x.to(pop.device), y.to(pop.device)
        if targets is not None:
            y = targets(x, y)
        g = example_grads(pop, pop.params, x, y)  # (P, n, D)
        yield idx, g if projection is None else g @ projection


def random_projection(d: int, k: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """A (d, k) Gaussian matrix scaled by 1/sqrt(k): inner products are kept in expectation."""
    return torch.randn(d, k, generator=generator).div_(k ** 0.5).to(device)


def sampled_targets(pop: Population, generator: torch.Generator):
    """``targets`` for ``stream_grads``: every counted position's target drawn from the member's own
    prediction (P, n, T), padding kept IGNORE. Its gradients' outer products average to Gauss-Newton."""
    def draw(x, y):
        with torch.no_grad():
            probs = pop.logits(x).softmax(-1)  # (P, n, T, V)
        drawn = torch.multinomial(probs.flatten(0, 2), 1, generator=generator).view(probs.shape[:-1])
        return torch.where(y == IGNORE, IGNORE, drawn)

    return draw


def gauss_newton(pop: Population, rows: torch.Tensor, generator: torch.Generator, chunk: int = 256,
                 projection: torch.Tensor | None = None) -> torch.Tensor:
    """Monte Carlo Gauss-Newton matrix of the per-name loss, mean over ``rows``: (P, k, k)."""
    k = projection.shape[1] if projection is not None else n_params(pop)
    G = torch.zeros(len(pop), k, k, device=pop.device)
    for _, g in stream_grads(pop, rows, chunk, projection, sampled_targets(pop, generator)):
        G.baddbmm_(g.transpose(1, 2), g)  # (P, k, n) @ (P, n, k)
    return G / len(rows)


def damped_solve(G: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """(G + lambda I)^-1 rhs per member, lambda = damping * trace(G) / k; G (P, k, k), rhs (P, k, Q).

    Solved in float64: with little damping the system's condition number reaches 1e4-1e5, where a
    float32 Cholesky loses the third digit."""
    k, G64 = G.shape[-1], G.double()
    lam = damping * G64.diagonal(dim1=1, dim2=2).mean(1)  # (P,)
    A = G64 + lam[:, None, None] * torch.eye(k, device=G.device, dtype=torch.float64)
    return torch.cholesky_solve(rhs.double(), torch.linalg.cholesky(A)).to(rhs.dtype)


@torch.no_grad()
def name_features(pop: Population, rows: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member's own summed NLL of every name (P, N) and its representation (P, N, C): the final
    residual stream averaged over the name's positions."""
    P, N, C = len(pop), len(rows), pop.config.n_embd
    loss, reps = torch.zeros(P, N, device=pop.device), torch.zeros(P, N, C, device=pop.device)
    last = f"blocks.{pop.config.n_layer - 1}.hook_resid_post"
    for idx, x, y in length_chunks(rows, chunk):
        x, y = x.to(pop.device), y.to(pop.device)
        logits, cache = pop.logits(x, return_cache=True)  # (P, n, T, V)
        nll = F.cross_entropy(logits.flatten(0, 2), y.expand(logits.shape[:-1]).flatten(), ignore_index=IGNORE,
                              reduction="none").view(logits.shape[:-1])
        valid = (y != IGNORE).float()  # (n, T)
        loss[:, idx] = nll.sum(-1)
        reps[:, idx] = (cache[last] * valid[None, :, :, None]).sum(2) / valid.sum(-1)[None, :, None]
    return loss, reps


def spectral_scores(reps: torch.Tensor) -> torch.Tensor:
    """Squared projection of each centred representation on the top singular vector: (P, N)."""
    centred = reps - reps.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh (P, C, C)
    return (centred @ vh[:, 0, :, None]).squeeze(-1).pow(2)


def _two_means(z: torch.Tensor, iters: int) -> torch.Tensor:
    """Centres (2, d) of 2-means on z (N, d), started from the point farthest from the mean and the point
    farthest from that one (deterministic)."""
    a = z[(z - z.mean(0)).norm(dim=1).argmax()]
    b = z[(z - a).norm(dim=1).argmax()]
    centres = torch.stack([a, b])
    for _ in range(iters):
        assign = torch.cdist(z, centres).argmin(1)
        for c in range(2):
            if (assign == c).any():
                centres[c] = z[assign == c].mean(0)
    return centres


def clustering_scores(reps: torch.Tensor, dims: int = 10, iters: int = 50) -> torch.Tensor:
    """Activation clustering per member: PCA to ``dims``, 2-means; score = distance to the larger
    cluster's centre minus distance to the smaller one's: (P, N)."""
    out = torch.zeros(reps.shape[:2], device=reps.device)
    for p in range(len(reps)):
        centred = reps[p] - reps[p].mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        z = centred @ vh[:dims].T  # (N, dims)
        centres = _two_means(z, iters)
        dist = torch.cdist(z, centres)  # (N, 2)
        sizes = torch.bincount(dist.argmin(1), minlength=2)
        small = int(sizes.argmin())
        out[p] = dist[:, 1 - small] - dist[:, small]
    return out
