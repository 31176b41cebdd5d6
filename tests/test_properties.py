"""Property tests: random names files and random flag values end in a clean error or a valid run.

"Clean" means one of popgpt's own errors (DataError, RunError, ValueError,
MemoryError: what the CLI prints as ``popgpt: error: ...``) or argparse's
exit with status 2, never any other exception (a traceback).
"""

import os

import pytest
from conftest import NAMES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popgpt.cli import FLAGS, build_parser, config_from_args
from popgpt.data import LETTERS, DataError, load_names
from popgpt.evolution.experiment import prepare
from popgpt.runio import RunError

CLEAN = (DataError, RunError, ValueError, MemoryError)
# Derandomized: CI sees the same examples every time (a failure is reproducible, never flaky).
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def small_names(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "names.txt"
    path.write_text("\n".join(load_names(NAMES)[:400]) + "\n")
    return str(path)


names_text = st.one_of(
    st.text(max_size=300),
    st.lists(st.text(alphabet=LETTERS + " \t\r", min_size=0, max_size=80), max_size=30).map("\n".join),
)


@SETTINGS
@given(content=st.one_of(names_text.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=300)),
       max_len=st.one_of(st.none(), st.integers(1, 70)))
def test_the_names_loader_returns_names_or_a_data_error(tmp_path_factory, content, max_len):
    path = tmp_path_factory.mktemp("names") / "names.txt"
    path.write_bytes(content)
    try:
        names = load_names(str(path), max_len)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert names and all(n and set(n) <= set(LETTERS) for n in names)
    assert max_len is None or max(map(len, names)) <= max_len


value = st.one_of(st.integers(-10 ** 20, 10 ** 20), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=12), st.sampled_from(["0", "-1", "1e-9", "nan", "inf", "QX", "", "cuda:3"]))
flag_values = st.dictionaries(st.sampled_from(sorted(FLAGS)), value, max_size=5)


@SETTINGS
@given(flags=flag_values)
@pytest.mark.slow
def test_random_flags_give_a_config_or_a_clean_error(small_names, flags):
    argv = ["evolve", "--data", small_names, "--device", "cpu", "--eval-docs", "20"]
    for flag, v in flags.items():
        if flag in ("data", "device"):
            continue
        argv += [f"--{flag}={v}"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        return
    try:
        prepare(config_from_args(args))
    except CLEAN:
        pass


@SETTINGS
@given(tool=st.sampled_from(["report", "heads", "sample", "vaccinate", "revive"]),
       rest=st.lists(st.sampled_from(["--member", "--count", "--names", "--sigma", "--steps", "--every", "--seed",
                                      "0", "-3", "nan", "7", "1e400"]), max_size=6),
       what=st.sampled_from(["empty", "missing", "file"]))
@pytest.mark.slow
def test_random_tool_command_lines_never_trace_back_nor_write(tmp_path_factory, tool, rest, what):
    from popgpt.cli import main

    base = tmp_path_factory.mktemp("nothing")
    target = base / "target"
    if what == "empty":
        target.mkdir()
    elif what == "file":
        target.write_text("not a run\n")
    try:
        code = main([tool, str(target), *rest])
    except SystemExit as e:
        code = e.code
    assert code == 2  # nothing here is a run
    assert sorted(os.listdir(base)) == ([] if what == "missing" else ["target"])
    if what == "empty":
        assert os.listdir(target) == []  # no lock file left in a folder that is not a run
