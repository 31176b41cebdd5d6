"""popgpt attention: patterns equal single members', member picks, files, errors."""

import json
import os
import re

import pytest
import torch

from popgpt import ModelConfig, Population
from popgpt.cli import main
from popgpt.data import encode
from popgpt.lens.attention import html_page, patterns, pick_members, text_tokens


def test_patterns_equal_each_member_alone():
    pop = Population.from_seeds(ModelConfig(n_layer=2), [1, 2])
    tokens = [0, *encode("qxzzzemma")]
    pats = patterns(pop, tokens)
    assert pats.shape == (2, 2, 4, 10, 10)
    for i in range(2):
        _, cache = pop.member(i)(torch.tensor([tokens]), return_cache=True)
        for layer in range(2):
            torch.testing.assert_close(pats[i, layer], cache[f"blocks.{layer}.attn.hook_pattern"][0])


def test_member_picks_and_text_errors():
    metrics = {"vulnerable": torch.tensor([True, False, True, False]), "quality": torch.tensor([0.3, 0.2, 0.4, 0.25])}
    assert [i for i, _ in pick_members(["best-vulnerable", "best-immune", "0"], metrics)] == [2, 3, 0]
    assert "immune" in pick_members(["1"], metrics)[0][1]
    with pytest.raises(ValueError, match="--member 4"):
        pick_members(["4"], metrics)
    with pytest.raises(ValueError, match="--member 'worst'"):
        pick_members(["worst"], metrics)
    with pytest.raises(ValueError, match="no immune"):
        pick_members(["best-immune"], {"vulnerable": torch.ones(2, dtype=torch.bool), "quality": torch.ones(2)})
    with pytest.raises(ValueError, match="--text"):
        text_tokens("Emma", 21)
    with pytest.raises(ValueError, match="--text must have 1 to 20"):
        text_tokens("a" * 21, 21)


def test_html_page_is_self_contained_and_holds_the_numbers():
    pat = torch.rand(1, 2, 3, 3).tril()
    page = html_page([("member 0", pat)], [".", "a", "b"], "t")
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    data = json.loads(re.search(r"const DATA = (.*);\n", page).group(1))
    assert data["chars"] == [".", "a", "b"]
    torch.testing.assert_close(torch.tensor(data["panels"][0]["patterns"]), pat, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_attention_cli(make_tiny_run, capsys):
    run = make_tiny_run()
    assert main(["attention", run, "--member", "0", "--member", "3", "--text", "qxzzzemma", "--population",
                 "--device", "cpu"]) == 0
    folder = os.path.join(run, "attention")
    files = sorted(os.listdir(folder))
    assert "gen001_qxzzzemma_0-3.html" in files and "gen001_qxzzzemma_0-3.json" in files
    saved = json.load(open(os.path.join(folder, "gen001_qxzzzemma_0-3.json")))
    assert [p["label"].split(" (")[0] for p in saved["panels"]][:2] == ["member 0", "member 3"]
    assert saved["panels"][2]["label"].startswith("mean over all 8")
    assert main(["attention", run, "--member", "0", "--text", "qx1"]) == 2
    assert "popgpt: error: --text" in capsys.readouterr().err
    assert main(["attention", run, "--text", "emma"]) == 2
    assert "--population" in capsys.readouterr().err
