"""The package keeps its shape: folders by domain, arrows between them few and pointing one way.

docs/architecture.md draws it. ``popgpt/`` root is the batched trainer anyone
imports; it imports no folder. ``evolution/`` is the experiment; ``lens/``,
``cure/`` and ``attribution/`` open finished runs through ``evolution.runs``
and never import the evolution loop (``generation``, ``experiment``);
``grok/`` needs only the trainer; ``cli/`` sits on top and nothing imports it.
The test reads every module's imports from its source (no import needed).
"""

import ast
import os
import re

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "popgpt")
FOLDERS = {"", "evolution", "lens", "cure", "attribution", "grok", "cli"}
# folder -> the folders it may import (the root, "", always)
MAY_IMPORT = {
    "": set(),
    "evolution": set(),
    "lens": {"evolution"},
    "cure": {"evolution"},
    "attribution": {"evolution"},
    "grok": set(),
    "cli": {"evolution", "lens", "cure", "attribution", "grok"},
}
THE_LOOP = {"evolution.generation", "evolution.experiment"}
MAX_MODULES, MAX_MODULE_LINES, MAX_FUNCTION_LINES = 15, 400, 60
DECLARATIONS = set()  # (module, function) pairs that are argument declarations, which may be long


def modules():
    """(dotted name below popgpt, folder, parsed source, line count) of every module."""
    for base, _, files in os.walk(PACKAGE):
        folder = os.path.relpath(base, PACKAGE).replace(os.sep, ".")
        folder = "" if folder == "." else folder
        if "__pycache__" in folder:
            continue
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(base, name)
                stem = name[:-3]
                dotted = ".".join(p for p in (folder, "" if stem == "__init__" else stem) if p)
                with open(path) as f:
                    text = f.read()
                yield dotted, folder, ast.parse(text, path), text.count("\n")


def _resolve(folder: str, node: ast.ImportFrom) -> list[str]:
    """Dotted module names (below popgpt) that an import statement reaches."""
    if node.level == 0:
        if not (node.module or "").startswith("popgpt"):
            return []
        base = node.module[len("popgpt"):].lstrip(".")
    else:
        parts = folder.split(".") if folder else []
        parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
        base = ".".join(parts + ([node.module] if node.module else []))
    targets = []
    for alias in node.names:  # `from . import x` may name a module
        candidate = f"{base}.{alias.name}" if base else alias.name
        targets.append(candidate if candidate in KNOWN else base)
    return targets


KNOWN = {dotted for dotted, *_ in modules()}


def imports(folder: str, tree, top_level_only=False) -> set[str]:
    found = set()
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            found.update(t for t in _resolve(folder, node) if t)
        elif isinstance(node, ast.Import):
            found |= {a.name[len("popgpt."):] for a in node.names if a.name.startswith("popgpt.")}
    return found


def folder_of(dotted: str) -> str:
    return dotted.split(".")[0] if "." in dotted or dotted in FOLDERS else ""


def test_every_module_is_in_a_known_folder():
    assert {f for _, f, _, _ in modules()} <= FOLDERS


def test_folders_import_only_what_they_may():
    bad = []
    for dotted, folder, tree, _ in modules():
        if dotted in ("", "__main__"):
            continue  # the package's face: __init__ exposes folders lazily, __main__ runs the cli
        for target in imports(folder, tree):
            other = folder_of(target)
            if other not in (folder, "") and other not in MAY_IMPORT[folder]:
                bad.append(f"{dotted or '__init__'} ({folder or 'root'}) imports {target}")
            if folder in ("lens", "cure", "attribution") and target in THE_LOOP:
                bad.append(f"{dotted} imports the evolution loop ({target}); open runs with evolution.runs")
    assert not bad, "\n".join(bad)


def test_the_package_imports_only_the_trainer_eagerly():
    """``import popgpt`` loads the root trainer; the folders load when first used (PEP 562)."""
    tree = next(t for d, _, t, _ in modules() if d == "")
    eager = {folder_of(t) for t in imports("", tree, top_level_only=True)}
    assert eager <= {""}, eager


def test_no_import_cycle():
    graph = {d: {t for t in imports(f, tree) if t in KNOWN and t != d} for d, f, tree, _ in modules()}
    graph[""] = set()  # __init__'s imports are lazy
    state, cycle = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle.append(" -> ".join(path + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycle, cycle


def test_folders_stay_small_and_modules_short():
    per_folder, long_modules = {}, []
    for dotted, folder, _, lines in modules():
        if dotted != folder:  # a folder's __init__ is not one of its modules
            per_folder[folder] = per_folder.get(folder, 0) + 1
        if lines > MAX_MODULE_LINES:
            long_modules.append(f"{dotted}: {lines} lines")
    crowded = {f or "root": n for f, n in per_folder.items() if n > MAX_MODULES}
    assert not crowded and not long_modules, (f"folders with more than {MAX_MODULES} modules: {crowded}; "
                                             f"modules over {MAX_MODULE_LINES} lines: {long_modules}")


def test_no_long_functions():
    long = []
    for dotted, _, tree, _ in modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (dotted, node.name) not in DECLARATIONS:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{dotted}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_the_checks_see_a_planted_violation(tmp_path):
    """The rules above fire on a root module importing a folder and on lens importing the loop."""
    root = ast.parse("from .evolution.runs import open_run\n")
    lens = ast.parse("from ..evolution.generation import generation\n")
    assert folder_of(next(iter(imports("", root)))) == "evolution"
    assert imports("lens", lens) == {"evolution.generation"} and "evolution.generation" in THE_LOOP


def test_the_repository_speaks_only_of_itself():
    """No file points outside the repository (a relative path climbing out of it): what the code
    relies on is written in README or docs/."""
    climbing = re.compile(r"(?:\.\./)+[A-Za-z_][\w./-]*")
    root = os.path.realpath(ROOT)

    def outside(path: str, line: str) -> bool:
        for target in climbing.findall(line):
            resolved = os.path.realpath(os.path.join(os.path.dirname(path), target))
            if os.path.commonpath([resolved, root]) != root:
                return True
        return False

    paths = [os.path.join(ROOT, "README.md")]
    for folder in ("popgpt", "tests", "benchmarks", "docs"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            paths += [os.path.join(base, f) for f in files if f.endswith((".py", ".md"))]
    offenders = [f"{p}:{i}" for p in paths for i, line in enumerate(open(p), 1) if outside(p, line)]
    assert not offenders, offenders
    assert outside(os.path.join(ROOT, "docs", "x.md"), "see ../" + "../elsewhere/notes.md")  # the check itself
    assert not outside(os.path.join(ROOT, "docs", "results", "x.md"), "![plot](../img/a.png)")
