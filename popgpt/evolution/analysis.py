"""Reading a finished population: lineage, re-tests of the "special" members, samples.

The special-member rules live in ``summary.py`` (the table of every
generation counts them); docs/definitions.md states them.
"""

import torch

from ..evaluate import evaluate_members, sample_names, test_options
from ..runio import RunError
from ..settings import tool_seed
from .runs import OpenRun
from .summary import special_by_replicate, special_members, special_threshold  # noqa: F401  (public here too)


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
    metrics = evaluate_members(saved.population[members], saved.virus, rows, g, n_targets=n_targets,
                               triggers=saved.member_triggers()[members], **test_options(run.config.virus))
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
