"""``popgpt grok``: a population learning a + b mod p."""

import argparse
import os
import time

from ..grok.report import run_grok
from ..grok.task import PRESETS as GROK_PRESETS
from ..grok.task import GrokConfig
from .common import add_runtime, count_int, finite_float, positive_int, resolve_device, threads

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


def cmd_grok(args) -> int:
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
    with threads(args.threads):
        run_grok(cfg, out, device=resolve_device(args.device), log=lambda s: print(s, flush=True))
    return 0


def register(sub) -> None:
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
    add_runtime(gk)
    gk.set_defaults(func=cmd_grok)
