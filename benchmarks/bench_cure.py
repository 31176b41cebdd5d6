"""Wall time to cure a run's members with each method, what dominates it, and the cure goals.

Opens a finished run (``popgpt evolve``), takes the first ``--members``
members of a saved generation and cures them with every method, timing each
cure and, inside it, the phases (activation sourcing, the original model's
reference log-probabilities, optimisation, the KL bound, the strength
search). Then it measures every patch as ``popgpt cure`` does (payload
tests, exact KL, retention; no relapse) and prints the goal checks:

- the best method (``--best``, default counterfactual): payload (original
  trigger) in <= 1% of members by the 5-sample test, mean sampled leakage
  <= 0.01, NLL ratio <= 1.005, mean KL >= 10x and p99 KL >= 5x lower than
  ablate and finetune at an equal or lower leakage; its max KL reported;
- curing 200 members in under 60 s. A run with fewer members is tiled up
  to ``--members`` for this timing only (members are independent, so the
  work is that of curing as many distinct members); the line says so.

    python benchmarks/bench_cure.py runs/full-default --threads 2
    python benchmarks/bench_cure.py runs/full-default --device cuda
"""

import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import base_parser, describe, environment, markdown_table, setup, sync, write_results  # noqa: E402
from popgpt.cure import counterfactual, methods, objectives, subspace  # noqa: E402
from popgpt.cure.cureset import build_cure_set, fitting_names  # noqa: E402
from popgpt.cure.objectives import METHODS, CureConfig  # noqa: E402
from popgpt.cure.report import goals as goal_checks  # noqa: E402
from popgpt.cure.run import CureRunConfig, cure_tables  # noqa: E402
from popgpt.evolution.runs import open_run  # noqa: E402
from popgpt.population import Population  # noqa: E402

PHASES = {"contrast_directions": "sourcing", "reference_logp": "reference", "_optimise": "optimisation",
          "hold_bound": "KL bound", "cure_ablate": "strength search"}


@contextlib.contextmanager
def phase_timer(device):
    """Seconds spent in each phase function of popgpt.cure while the block runs (device synchronised)."""
    spent = {name: 0.0 for name in PHASES.values()}
    # a phase function is called from the module that imported it: wrap it wherever it is bound
    bound = [(m, f) for m in (objectives, subspace, counterfactual, methods) for f in PHASES if hasattr(m, f)]
    originals = {(m, f): getattr(m, f) for m, f in bound}
    wrapped = {}

    def wrap(fn, phase):
        def timed_call(*args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            spent[phase] += time.perf_counter() - t0
            return out
        return timed_call

    for m, f in bound:
        fn = originals[(m, f)]
        setattr(m, f, wrapped.setdefault(fn, wrap(fn, PHASES[f])))
    try:
        yield spent
    finally:
        for (m, f), fn in originals.items():
            setattr(m, f, fn)


def tiled_timing(run, saved, method: str, members: int, device) -> str:
    """Wall time of ``method`` on the run's members tiled to ``members`` (cure set as popgpt cure builds it)."""
    rc, pop = run.config, saved.population
    k = -(-members // len(pop))
    big = Population.cat([pop] * k)[torch.arange(members, device=pop.device)]
    trig = [[rc.virus.trigger, v.trigger] for v in saved.viruses]
    lineage = saved.layout.lineage_of_member("cpu").tolist()
    triggers = [list(dict.fromkeys(trig[lineage[p % len(pop)]])) for p in range(members)]
    names = fitting_names(run.data.train_docs, rc.model.block_size, max(map(len, sum(triggers, []))) + 3)
    cs = build_cure_set(names[:CureConfig().names], triggers, [rc.virus.payload] * members, rc.model.block_size,
                        torch.Generator().manual_seed(0))
    sync(device)
    t0 = time.perf_counter()
    methods.cure(big, cs, CureConfig(), method, torch.Generator().manual_seed(1))
    sync(device)
    secs = time.perf_counter() - t0
    return (f"cure of {members} members ({len(pop)} distinct, tiled) with {method}: {secs:.1f} s wall over "
            f"{torch.get_num_threads()} threads (goal: < 60 s; {'met' if secs < 60 else 'not met'})")


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run folder")
    parser.add_argument("--generation", type=int, help="saved generation (default: the newest)")
    parser.add_argument("--members", type=int, default=200, help="members cured (default: 200, the first ones)")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods timed (default: all)")
    parser.add_argument("--best", default="counterfactual", help="the method the goals are checked for")
    parser.add_argument("--mutants", type=int, default=-1, help="1-letter mutants tested (-1: all)")
    args = parser.parse_args(argv)
    device = setup(args)
    env = environment(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env["load_average_1min"] = load
    print(describe(env) + f" | load average {load:.1f} (other processes share the CPU when it exceeds the threads)",
          flush=True)
    run = open_run(args.run_dir)
    methods = [m for m in args.methods.split(",") if m]
    rcfg = CureRunConfig(mutants=args.mutants, relapse_members=0, controls=0)
    original_load = run.load

    def first_members(generation=None, device="cpu"):
        saved = original_load(generation, device)
        n = min(args.members, len(saved.population))
        keep = torch.arange(n)
        return type(saved)(saved.generation, saved.state, saved.population[keep.to(saved.population.device)],
                           saved.viruses, {k: v[:n] for k, v in saved.metrics.items()}, saved.layout)

    object.__setattr__(run, "load", first_members)
    with phase_timer(device) as spent:
        results = cure_tables(run, methods, CureConfig(), rcfg, args.generation, device, log=lambda s: None)
    n = len(results["rows"]["uncured"]["members"]["nll_after"])
    rows = [{"method": m, "members": n, "seconds": results["rows"][m]["seconds"],
             "cpu_seconds": results["rows"][m]["cpu_seconds"],
             "members_per_s": n / results["rows"][m]["seconds"]} for m in methods]
    table = markdown_table(rows, ["method", "members", "seconds", "cpu_seconds", "members_per_s"])
    phases = markdown_table([{"phase": k, "seconds": v} for k, v in spent.items()], ["phase", "seconds"])
    goals = goal_checks(results, args.best)
    print(table, "\n\nphases, all methods together:\n" + phases, flush=True)
    print("\ngoals:", flush=True)
    for k, v in goals.items():
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    if args.best in results["rows"]:
        secs = results["rows"][args.best]["seconds"]
        cpu = results["rows"][args.best]["cpu_seconds"]
        print(f"  cure of {n} members with {args.best}: {secs:.1f} s wall, {cpu:.1f} s CPU time over "
              f"{torch.get_num_threads()} threads (goal for 200 members: < 60 s; "
              f"{'met' if n >= 200 and secs < 60 else 'not met' if n >= 200 else 'not measured at 200'})")
    if n < args.members:
        print("  " + tiled_timing(run, original_load(args.generation, device), args.best, args.members, device),
              flush=True)
    write_results(args.out, "bench_cure", {"environment": env, "run": args.run_dir, "generation": results["generation"],
                                           "results": rows, "phases": spent, "goals": goals,
                                           "table": results["table"]}, table + "\n\n" + phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
