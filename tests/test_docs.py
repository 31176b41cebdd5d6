"""Every command in README.md and docs/ parses, every Python block there runs, and README stays a front page."""

import argparse
import glob
import os
import re
import shlex
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, ROOT)

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
BENCHMARKS = {"bench_cure", "bench_distributed", "bench_experiment", "bench_vmap_vs_sequential", "profile_generation"}


class Parsed(Exception):
    """Raised once argparse accepted a command line: nothing runs."""


def commands():
    """(page, line, argv) of every shell command in a bash block, continuation lines joined."""
    out = []
    for page in PAGES:
        text = open(page).read()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("#"):
                    continue
                for part in filter(None, (p.strip() for p in line.split("&&"))):
                    out.append((os.path.relpath(page, ROOT), part))
    return out


def _argv(command: str):
    """('popgpt' | benchmark name | None, argv) of a command (None: not a popgpt or benchmark command)."""
    words = shlex.split(command)
    if words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if words[:1] == ["popgpt"]:
        return "popgpt", words[1:]
    if words[:1] == ["torchrun"] and "-m" in words:
        i = words.index("-m")
        assert words[i + 1] == "popgpt", command
        return "popgpt", words[i + 2:]
    if words[:1] == ["python"] and words[1:2] and words[1].startswith("benchmarks/"):
        name = os.path.splitext(os.path.basename(words[1]))[0]
        assert name in BENCHMARKS, f"{command}: no such benchmark"
        return name, words[2:]
    if words[:1] == ["bash"]:
        assert os.path.isfile(os.path.join(ROOT, words[1])), f"{command}: no such script"
    return None, words


ALL = commands()


def test_the_pages_have_commands_and_readme_is_short():
    assert len(ALL) > 40
    assert sum(1 for _ in open(os.path.join(ROOT, "README.md"))) <= 300


@pytest.mark.parametrize("page,command", ALL, ids=[f"{p}:{c[:60]}" for p, c in ALL])
def test_every_documented_command_parses(page, command, monkeypatch):
    tool, argv = _argv(command)
    if tool is None:
        return
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    if tool == "popgpt":
        from popgpt.cli import main
    else:
        main = __import__(f"benchmarks.{tool}", fromlist=["main"]).main
    try:
        main(argv)
    except Parsed:
        return
    except SystemExit as e:
        pytest.fail(f"{page}: `{command}` does not parse (exit {e.code})")
    pytest.fail(f"{page}: `{command}` parsed without reaching argparse")


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", open(page).read()):
            assert os.path.exists(os.path.join(os.path.dirname(page), target)), f"{page}: broken link {target}"
