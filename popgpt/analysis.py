"""Reading a finished population: lineage, the rare "special" members, re-tests.

Special member (the source's rule): immune AND quality at least
``sigma`` (1.5) standard deviations above the mean quality of the immune
members of the same generation (sample standard deviation; with fewer than
two immune members nobody is special).
"""

import os

import torch

from .data import IGNORE, docs_to_tensor, load_names, split_names
from .experiment import RunConfig, evaluate_population, resolve, stream_seed
from .population import Population
from .runio import load_checkpoint, read_json
from .virus import Virus


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


def special_members(quality: torch.Tensor, immune: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Bool [P]: immune members whose quality >= mean + sigma * std of the immune members' quality."""
    q = quality[immune]
    if q.numel() < 2:
        return torch.zeros_like(immune)
    threshold = q.mean() + sigma * q.std()
    return immune & (quality >= threshold)


def retest(run_dir: str, generation: int, members: torch.Tensor, seed: int = 1, device: str = "cpu") -> dict:
    """Re-evaluate members of a saved generation on names and samples the run never used.

    Quality on held-out names that were NOT among the run's evaluation names,
    and the immunity test with a fresh random stream. Returns [len(members)]
    tensors: ``quality``, ``vulnerable``, ``payload_prob``, and the number of
    fresh names scored.
    """
    config = RunConfig.from_dict(read_json(os.path.join(run_dir, "config.json"))["config"])
    names = load_names(config.data.path)
    config = resolve(config, names)
    _, val = split_names(names, config.data.val_frac, torch.Generator().manual_seed(stream_seed(config.seed, "split")))
    fresh = val[config.data.eval_docs:]
    if not fresh:
        raise ValueError(f"{run_dir}: every held-out name was used for evaluation; no fresh names to re-test on")
    state = load_checkpoint(run_dir, generation)
    pop = Population.from_state_dict(state["population"], torch.device(device))[members]
    rows = docs_to_tensor(fresh, config.model.block_size)
    n_targets = int((rows[:, 1:] != IGNORE).sum())
    g = torch.Generator(device).manual_seed(stream_seed(config.seed, "samples") + 1000 + seed)
    metrics = evaluate_population(pop, Virus(**state["virus"]), rows.to(device), config.virus, g, n_targets)
    return {"quality": metrics["quality"].cpu(), "vulnerable": metrics["vulnerable"].cpu(),
            "payload_prob": metrics["payload_prob"].cpu(), "n_names": len(fresh)}
