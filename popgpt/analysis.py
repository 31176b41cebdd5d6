"""Reading a finished population: lineage, the rare "special" members, re-tests, samples.

Special member (the source experiment's rule, docs/definitions.md): immune AND quality at least
``sigma`` (1.5) standard deviations above the mean quality of the immune
members of the same generation and replicate (sample standard deviation;
with fewer than two immune members nobody is special).
"""

import torch

from .config import tool_seed
from .evaluate import evaluate_members, sample_names
from .runio import RunError
from .runs import OpenRun


def ancestry(parents: list[torch.Tensor], n_founders: int) -> list[torch.Tensor]:
    """Which generation-0 members each member descends from, per generation.

    ``parents``: one (P, 2) tensor per generation after 0, indices into the
    generation before (a survivor lists itself twice). Returns a list of
    (P, n_founders) bool tensors, element 0 being the identity.
    """
    anc = [torch.eye(n_founders, dtype=torch.bool)]
    for pair in parents:
        prev = anc[-1]
        anc.append(prev[pair[:, 0]] | prev[pair[:, 1]])
    return anc


def special_threshold(quality: torch.Tensor, immune: torch.Tensor, sigma: float = 1.5) -> float:
    """mean + sigma * sd of the immune members' quality (inf with fewer than two immune members)."""
    q = quality[immune]
    if q.numel() < 2:
        return float("inf")
    return float(q.mean() + sigma * q.std())


def special_members(quality: torch.Tensor, immune: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Bool [P]: immune members whose quality >= mean + sigma * std of the immune members' quality."""
    threshold = special_threshold(quality, immune, sigma)
    return immune & (quality >= threshold)


def special_by_replicate(quality: torch.Tensor, immune: torch.Tensor, replicates: int,
                         sigma: float = 1.5) -> tuple[torch.Tensor, list[float]]:
    """Special members of each replicate (the rule applied within it): (bool [R*P], threshold per replicate)."""
    P = len(quality) // replicates
    parts = [slice(r * P, (r + 1) * P) for r in range(replicates)]
    thresholds = [special_threshold(quality[s], immune[s], sigma) for s in parts]
    special = torch.cat([immune[s] & (quality[s] >= t) for s, t in zip(parts, thresholds)])
    return special, thresholds


def retest(run: OpenRun, generation: int, members: torch.Tensor, seed: int = 1, device: str = "cpu") -> dict:
    """Re-evaluate members of a saved generation on names and samples the run never used.

    Quality on held-out names that were NOT among the run's evaluation names,
    and the immunity test with a fresh random stream. Returns [len(members)]
    tensors: ``quality``, ``vulnerable``, ``payload_prob``, and the number of
    fresh names scored.
    """
    fresh = run.data.fresh_docs
    if not fresh:
        raise RunError(f"{run.run_dir}: every held-out name was used for evaluation; no fresh names to re-test on")
    saved = run.load(generation, device)
    rows, n_targets = run.data.encode(fresh, device)
    g = torch.Generator(device).manual_seed(tool_seed(run.config.seed, "retest", seed, "samples"))
    V = run.config.virus
    metrics = evaluate_members(saved.population[members], saved.virus, rows, g, V.n_samples, V.threshold, n_targets)
    return {"quality": metrics["quality"].cpu(), "vulnerable": metrics["vulnerable"].cpu(),
            "payload_prob": metrics["payload_prob"].cpu(), "n_names": len(fresh)}


def sample_member(run: OpenRun, member: int, count: int, generation: int | None = None,
                  seed: int = 0, device: str = "cpu") -> list[str]:
    """Names sampled from one member of a saved generation."""
    saved = run.load(generation, device)
    pop = saved.population
    if not 0 <= member < len(pop):
        raise RunError(f"member {member} is out of range: generation {saved.generation} "
                       f"has members 0..{len(pop) - 1}")
    return sample_names(pop[[member]], count, torch.Generator(device).manual_seed(seed))[0]
