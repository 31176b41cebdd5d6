"""``popgpt heads | attention | induction``: the microscope."""

import argparse
import os
import time

from ..lens.attention import GROUP_PICKS, show_attention
from ..lens.heads import analyze_heads
from ..lens.induction import InductionConfig
from ..lens.induction_report import run_induction
from .common import add_runtime, count_int, default_names_path, finite_float, positive_int, resolve_device, threads

ATTENTION_EPILOG = """examples:
  popgpt attention runs/full --member best-vulnerable --member best-immune --text qxzzzemma
  popgpt attention runs/full --population --text emma
"""

INDUCTION_EPILOG = """examples:
  popgpt induction --preset quick --threads 1 --out runs/induction-quick   # a few minutes on a 2-core CPU
  popgpt induction --out runs/induction-full                              # the full size (defaults)
  popgpt induction --preset source --out runs/induction-source            # the source's width and task
"""

# flag -> (type, help); defaults come from InductionConfig
INDUCTION_FLAGS = {
    "depths": (str, "comma-separated layer counts; 1 is the negative control"),
    "n-layer": (int, "layer count of the members under test, beside the 1-layer control: --depths 1,N"),
    "tasks": (str, "comma-separated tasks: repeat (a string written twice after a random prefix, with a random "
              "gap: copying pays) and/or names (names as they are)"),
    "inits": (int, "init seeds per depth and task"),
    "orders": (int, "data orders per init seed (members of one order see the same rows)"),
    "steps": (int, "training steps, the same for every member"),
    "every": (int, "measure every score every N steps (the phase step's resolution)"),
    "batch-size": (int, "rows per member per step"),
    "lr": (finite_float, "Adam learning rate"),
    "min-len": (int, "shortest repeated string (lengths are drawn per row: no positional rule predicts the copy)"),
    "max-len": (int, "longest repeated string"),
    "gap-max": (int, "tokens between the copies, drawn in 0..N per row (a gap breaks 'attend k - 1 back')"),
    "distinct-letters": (bool, "no token twice within a row: a second-copy token's only earlier occurrence is its "
                         "twin, so the token after it is the answer"),
    "loss": (str, "train on every next token (first+second) or on the second copy only (second: nothing else to "
             "learn, so no shortcut is paid for the first copy)"),
    "repeat-rows": (int, "distinct rows of the repeat task's table (measured: a table of 2,000 rows grew "
                    "textbook induction heads where ~26,000 grew shifted copying circuits)"),
    "vocab": (int, "tokens including the boundary; above 27, synthetic tokens beyond the letters (fewer chance "
              "repeats, bag-of-letters guesses pay less)"),
    "n-embd": (int, "residual width of the members"),
    "n-head": (int, "attention heads per layer"),
    "attn-only": (bool, "attention-only members (no MLP), as in the standard induction-head studies"),
    "eval-seqs": (int, "scoring rows (random length, prefix and gap, distinct tokens)"),
    "score-threshold": (finite_float, "a layer >= 1 head with induction score >= this is an induction head"),
    "icl-loss": (finite_float, "second-copy loss (nats) below which the in-context loss has dropped"),
    "block-size": (int, "context length of the models"),
    "seed": (int, "the experiment's seed (init seeds, data, scoring rows, control heads)"),
}
# the source's task and width: letters that may repeat, no gap, every token trained, 24 wide with an MLP,
# a repeat table as large as the names table
SOURCE = {"n_embd": 24, "n_head": 4, "attn_only": False, "vocab": 27, "distinct_letters": False, "gap_max": 0,
          "loss": "first+second", "lr": 1e-2, "min_len": 4, "max_len": 10, "repeat_rows": 28800}
INDUCTION_PRESETS = {"full": {}, "quick": {"inits": 4, "orders": 1, "steps": 1500, "every": 50},
                     "textbook": {"tasks": "repeat", "inits": 8, "orders": 1},  # the measured run (docs/lens.md)
                     "source": SOURCE}


def _induction_flags(sub) -> None:
    ind = sub.add_parser("induction", help="train 1- and 2-layer populations: who grows induction heads, when, "
                         "and are they the cause?", epilog=INDUCTION_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = InductionConfig()
    for flag, (typ, text) in INDUCTION_FLAGS.items():
        key = flag.replace("-", "_")
        default = getattr(defaults, key, None)
        default = ",".join(map(str, default)) if isinstance(default, tuple) else default
        shown = "; ".join(f"{name}: {p[key]}" for name, p in INDUCTION_PRESETS.items() if key in p)
        shown = f" (default: {default}{'; ' + shown if shown else ''})" if flag != "n-layer" else ""
        if typ is bool:
            ind.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, help=text + shown)
        else:
            ind.add_argument(f"--{flag}", type=typ, help=text + shown)
    ind.add_argument("--preset", choices=sorted(INDUCTION_PRESETS), help="size preset; flags override it")
    ind.add_argument("--data", help="names file for the names task (default: ./names.txt, else the names that ship with popgpt)")
    ind.add_argument("--out", help="output folder (default: runs/induction__SEED__TIME)")
    add_runtime(ind)
    ind.set_defaults(func=cmd_induction)


def cmd_heads(args) -> int:
    with threads(args.threads):
        analyze_heads(args.run_dir, args.generation, args.names, args.sigma, device=resolve_device(args.device))
    return 0


def cmd_attention(args) -> int:
    with threads(args.threads):
        show_attention(args.run_dir, args.member, args.text, args.population, args.generation,
                       device=resolve_device(args.device))
    return 0


def induction_config(args):
    """InductionConfig from the preset and the flags; errors name the flag."""
    values = dict(INDUCTION_PRESETS[args.preset or "full"])
    for flag in INDUCTION_FLAGS:
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            values[flag.replace("-", "_")] = value
    layers = values.pop("n_layer", None)
    if layers is not None:
        if args.depths is not None:
            raise ValueError("--n-layer and --depths: give one of them (--n-layer N means --depths 1,N)")
        values["depths"] = (1,) if layers == 1 else (1, layers)
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


def register(sub) -> None:
    hd = sub.add_parser("heads", help="per-head metrics: silenced vs redirected immune members")
    hd.add_argument("run_dir", help="a run folder written by popgpt evolve")
    hd.add_argument("--generation", type=count_int, help="saved generation (default: the newest)")
    hd.add_argument("--names", type=positive_int, default=200, help="held-out names for clean metrics (default: 200)")
    hd.add_argument("--sigma", type=finite_float, default=1.5, help="special-member rule (default: 1.5)")
    add_runtime(hd)
    hd.set_defaults(func=cmd_heads)

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
    add_runtime(at)
    at.set_defaults(func=cmd_attention)
    _induction_flags(sub)
