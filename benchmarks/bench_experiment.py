"""Wall time of the whole evolution experiment, split into phases.

Runs the real ``popgpt.evolve`` (checkpoints and CSV included) twice with
one engine: the first, cold run pays the one-off start-up (compile or CUDA
graph capture); the second reuses the engine, so it shows the steady cost.
Start-up = cold wall time - warm wall time. Phases (training, evaluation,
evolution ops, io) are timed with the device synchronised at their edges,
which adds a few host syncs a normal run does not make.

    python benchmarks/bench_experiment.py --device cpu --threads 2
    python benchmarks/bench_experiment.py --device cuda --preset full --engine graph
"""

import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import base_parser, describe, environment, markdown_table, setup, write_results  # noqa: E402
from popgpt.data import NAMES_FILE  # noqa: E402
from popgpt.engine import ENGINES, Engine, default_engine  # noqa: E402
from popgpt.evolution.config import DataConfig, EvolutionConfig, RunConfig  # noqa: E402
from popgpt.evolution.experiment import PhaseTimer, evolve  # noqa: E402
from popgpt.step import TrainConfig  # noqa: E402

PRESETS = {  # pop_size, generations, steps, finetune_steps
    "full": (200, 20, 100, 100),  # the source experiment (docs/definitions.md)
    "small": (32, 3, 30, 30),  # a few minutes on a 2-core CPU, both runs together
}


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="sizes (default: full on CUDA, small on CPU)")
    parser.add_argument("--engine", choices=("auto", *ENGINES), default="auto")
    parser.add_argument("--pop-size", type=int)
    parser.add_argument("--generations", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--finetune-steps", type=int)
    args = parser.parse_args(argv)
    device = setup(args)
    preset = PRESETS[args.preset or ("full" if device.type == "cuda" else "small")]
    P, G, steps, ft = (v if a is None else a for v, a in
                       zip(preset, (args.pop_size, args.generations, args.steps, args.finetune_steps)))
    kind = default_engine(device) if args.engine == "auto" else args.engine
    config = RunConfig(data=DataConfig(path=NAMES_FILE), train=TrainConfig(steps=steps),
                       evolution=EvolutionConfig(pop_size=P, generations=G, finetune_steps=ft),
                       device=str(device), engine=kind)
    env = environment(device)
    print(describe(env))
    print(f"experiment: P={P}, {G} generations, {steps} steps at generation 0, {ft} fine-tuning steps, "
          f"engine {kind}")

    engine = Engine(kind)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("cold", "warm"):
            timer = PhaseTimer(sync=True)
            res = evolve(config, os.path.join(tmp, label), engine=engine, timer=timer, log=lambda s: None)
            runs[label] = {"wall_s": res["wall_seconds"], **{f"{k}_s": v for k, v in timer.seconds.items()},
                           "final_immune_frac": res["final"]["immune_frac"]}
            print(f"{label}: {res['wall_seconds']:.2f} s  " +
                  "  ".join(f"{k} {v:.2f}s" for k, v in timer.seconds.items()), flush=True)
    startup = max(0.0, runs["cold"]["wall_s"] - runs["warm"]["wall_s"])
    rows = [{"run": k, **v} for k, v in runs.items()]
    columns = ["run", "wall_s", "training_s", "evaluation_s", "evolution_ops_s", "io_s"]
    table = (f"Whole experiment (P={P}, {G} generations, {steps}+{ft} steps, engine {kind}), "
             f"{describe(env)}\n\n" + markdown_table(rows, columns)
             + f"\n\nstart-up (compile/capture) = cold - warm = {startup:.2f} s")
    print(table)
    write_results(args.out, "bench_experiment",
                  {"environment": env, "config": dataclasses.asdict(config), "runs": runs,
                   "startup_s": startup}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
