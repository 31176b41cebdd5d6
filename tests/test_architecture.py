"""The package keeps its shape: imports only point down the data flow, functions stay short.

The data flow (docs/architecture.md): data -> virus -> population -> train ->
evaluate -> evolution -> experiment -> analysis tools -> report -> cli. A
module may import only modules on a lower level; this test reads every
module's imports from its source (no import needed) and fails on an upward
arrow, an import between modules of the same level, or a module missing
from the map below.
"""

import ast
import os
import re

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "popgpt")

LEVELS = [
    {"_version", "data", "stats", "runio", "device"},  # leaves: no popgpt imports
    {"model", "virus", "cureset"},
    {"config"},  # the run's configuration, one home
    {"memory"},  # the memory a run needs, estimated before allocating
    {"population"},  # stacked parameters, vmap(functional_call)
    {"distributed"},  # the population sharded over ranks: who holds which members, what they exchange
    {"cache"},  # the batched activation cache and interventions (the microscope)
    {"patching"},  # ablation and patching sweeps on it
    {"loss", "patch", "scan"},  # the shared loss; reversible patches; the trigger scan
    {"train"},  # the one training step
    {"engine", "cure"},  # eager / compile / graph execution of it; the cure methods
    {"evaluate"},  # quality, sampling, the immunity test
    {"influence"},  # per-example gradients, TracIn, Gauss-Newton influence, attribution baselines
    {"summary", "cure_eval", "cure_report"},  # a generation's table rows; what a cure did, its table
    {"evolution"},  # select / crossover / mutate
    {"layout"},  # conditions x replicates x members: who reads what, with which settings
    {"runs"},  # a run's data and saved generations
    {"generation"},  # EvolutionState and generation(state, ctx)
    {"experiment"},  # evolve(): set-up, the loop, the writer
    {"analysis"},  # lineage, special members, re-tests
    {"heads", "vaccine", "revival", "attention", "induction", "attribution", "grok"},  # experiments on a finished run
    {"induction_report"},  # popgpt induction's folder: tables, plots
    {"compare", "cure_run"},  # conditions side by side, against the source's table; popgpt cure on a run
    {"report"},
    {"cli"},
    {"__main__", "__init__"},
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}

# Functions that are argument declarations, which may be long.
DECLARATIONS = {("cli", "build_parser")}
MAX_LINES = 60


def modules():
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            path = os.path.join(PACKAGE, name)
            with open(path) as f:
                yield name[:-3], ast.parse(f.read(), path)


def package_imports(tree) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
            found |= {a.name for a in node.names}  # from . import module
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("popgpt"):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("popgpt.")}
    return found


def test_every_module_has_a_level():
    missing = [name for name, _ in modules() if name not in LEVEL]
    assert not missing, f"add these modules to LEVELS (and docs/architecture.md): {missing}"


def test_imports_point_down_the_data_flow():
    bad = []
    for name, tree in modules():
        for target in package_imports(tree):
            if LEVEL[target] >= LEVEL[name]:
                bad.append(f"{name} (level {LEVEL[name]}) imports {target} (level {LEVEL[target]})")
    assert not bad, "\n".join(bad)


def test_no_long_functions():
    long = []
    for name, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (name, node.name) not in DECLARATIONS:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_the_repository_speaks_only_of_itself():
    """No file points outside the repository (a relative path climbing out of it): what the code
    relies on is written in README or docs/."""
    climbing = re.compile(r"\.\./[A-Za-z_]")
    offenders = []
    for folder in ("popgpt", "tests", "benchmarks", "docs"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith((".py", ".md")):
                    path = os.path.join(base, f)
                    offenders += [f"{path}:{i}" for i, line in enumerate(open(path), 1) if climbing.search(line)]
    readme = os.path.join(ROOT, "README.md")
    offenders += [f"{readme}:{i}" for i, line in enumerate(open(readme), 1) if climbing.search(line)]
    assert not offenders, offenders
