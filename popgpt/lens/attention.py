"""``popgpt attention``: attention patterns of saved members, as a PNG grid and a self-contained HTML page.

The text is read as a name is: the start token, then its letters. For each
member asked for, the grid has a row per layer and a column per head; each
panel is the pattern (query rows, key columns) with the characters on both
axes. ``--population`` adds the mean and the standard deviation over every
member of the generation. The HTML page holds the same numbers inline (no
script or font from the network): hovering a character shows, in every
head of that member, how much attention it pays to each earlier character.
"""

import html
import json
import os

import torch

from ..data import BOUNDARY, encode
from ..evolution.runs import OpenRun, locked_run
from ..population import Population
from ..runio import write_atomic, write_json
from .cache import run_with_cache

GROUP_PICKS = {"best-vulnerable": True, "best-immune": False}


def patterns(pop: Population, tokens: list[int]) -> torch.Tensor:
    """Attention patterns (P, L, H, T, T) of every member on one token sequence."""
    L = pop.config.n_layer
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(L)]
    with torch.no_grad():
        _, cache = run_with_cache(pop, torch.tensor([tokens], device=pop.device), names)
    return torch.stack([cache[n][:, 0] for n in names], 1).cpu()  # (P, L, H, T, T)


def pick_members(picks: list[str], metrics: dict, trigger: str | None = None) -> list[tuple[int, str]]:
    """Member indices from ``--member`` values (an index, ``best-vulnerable`` or ``best-immune``: the
    highest-quality member of that group), each with a label naming its verdict and the trigger the
    verdict and payload probability were measured against (the generation's own)."""
    vul, q = metrics["vulnerable"], metrics["quality"]
    P, out = len(vul), []
    for pick in picks:
        if pick in GROUP_PICKS:
            group = (vul == GROUP_PICKS[pick]).nonzero().flatten()
            if not len(group):
                raise ValueError(f"--member {pick}: this generation has no {pick.split('-')[1]} member")
            i = int(group[q[group].argmax()])
        else:
            try:
                i = int(pick)
            except ValueError:
                raise ValueError(f"--member {pick!r}: give a member index or one of {', '.join(GROUP_PICKS)}") from None
            if not 0 <= i < P:
                raise ValueError(f"--member {i}: this generation has members 0..{P - 1}")
        against = f" to {trigger}" if trigger else ""
        label = f"member {i} ({'vulnerable' if vul[i] else 'immune'}{against}, quality {float(q[i]):.3f}"
        if "payload_prob" in metrics:
            label += f", p(payload after {trigger or 'trigger'}) {float(metrics['payload_prob'][i]):.2f}"
        out.append((i, label + ")"))
    return out


def text_tokens(text: str, block_size: int) -> list[int]:
    """Start token + the text's letters; errors name ``--text``."""
    try:
        letters = encode(text)
    except ValueError as e:
        raise ValueError(f"--text: {e}") from None
    if not letters or len(letters) + 1 > block_size:
        raise ValueError(f"--text must have 1 to {block_size - 1} letters (the model's block size is "
                         f"{block_size}), got {len(letters)}")
    return [BOUNDARY, *letters]


def attention_tables(run: OpenRun, picks: list[str], text: str, population: bool = False,
                     generation: int | None = None, device: str = "cpu") -> dict:
    """Patterns of the chosen members (and the population's mean and sd) on ``text`` (nothing written)."""
    if not picks and not population:
        raise ValueError("give --member N (repeatable) and/or --population")
    saved = run.load(generation, device)
    tokens = text_tokens(text, saved.population.config.block_size)
    chosen = pick_members(picks, saved.metrics, saved.virus.trigger)
    all_patterns = patterns(saved.population, tokens)
    panels = [(label, all_patterns[i]) for i, label in chosen]
    if population:
        P = len(saved.population)
        panels.append((f"mean over all {P} members", all_patterns.mean(0)))
        panels.append((f"standard deviation over all {P} members", all_patterns.std(0)))
    return {"generation": saved.generation, "text": text, "chars": ["."] + list(text),
            "trigger": saved.virus.trigger, "payload": saved.virus.payload,
            "members": [i for i, _ in chosen], "panels": panels}


def draw_grid(panels: list, chars: list[str], path: str, title: str) -> bool:
    """One block of layers x heads panels per entry of ``panels`` [(label, (L, H, T, T))]; False
    when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H, T = panels[0][1].shape[0], panels[0][1].shape[1], len(chars)
    fig = plt.figure(figsize=(2.1 * H + 0.4, (2.2 * L + 0.35) * len(panels) + 0.4), layout="constrained")
    for sub, (label, pat) in zip(fig.subfigures(len(panels), 1, squeeze=False)[:, 0], panels):
        vmax = 1.0 if "standard deviation" not in label else float(pat.max()) or 1.0
        sub.suptitle(label, fontsize=9)
        axes = sub.subplots(L, H, squeeze=False)
        for layer in range(L):
            for h in range(H):
                ax = axes[layer, h]
                image = ax.imshow(pat[layer, h].numpy(), cmap="Blues", vmin=0.0, vmax=vmax)
                ax.set_xticks(range(T), chars, fontsize=7)
                ax.set_yticks(range(T), chars, fontsize=7)
                ax.tick_params(length=0)
                ax.set_title(f"L{layer} H{h}", fontsize=8)
                if layer == L - 1:
                    ax.set_xlabel("key (attended to)", fontsize=7)
                if h == 0:
                    ax.set_ylabel("query (attending)", fontsize=7)
        what = "standard deviation" if "standard deviation" in label else "attention weight"
        sub.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8).set_label(what, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.tok {{ display: inline-block; min-width: 1.3em; text-align: center; font-family: monospace;
       font-size: 1.15em; padding: 0.15em 0.1em; margin: 1px; border: 1px solid #ddd; cursor: default; }}
.tok.query {{ outline: 2px solid #d62728; }}
.row {{ margin: 0.15em 0; }} .lab {{ display: inline-block; width: 5em; font-size: 0.85em; color: #555; }}
h2 {{ font-size: 1em; margin-top: 1.4em; }} .note {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1 style="font-size:1.2em">{title}</h1>
<p class="note">Hover a character in any row: every head of that panel colours the characters it attends to
from there (darker = more attention, the number is the weight); the hovered character is outlined in red.
Rows: layer and head. Everything is in this file; nothing is loaded from the network.</p>
<div id="panels"></div>
<script>
const DATA = {data};
const root = document.getElementById("panels");
DATA.panels.forEach((panel, p) => {{
  const box = document.createElement("div");
  const h = document.createElement("h2"); h.textContent = panel.label; box.appendChild(h);
  const cells = [];
  panel.patterns.forEach((layer, l) => layer.forEach((head, k) => {{
    const row = document.createElement("div"); row.className = "row";
    const lab = document.createElement("span"); lab.className = "lab"; lab.textContent = "L" + l + " H" + k;
    row.appendChild(lab);
    const spans = DATA.chars.map((c, t) => {{
      const s = document.createElement("span"); s.className = "tok"; s.textContent = c;
      s.addEventListener("mouseenter", () => show(t)); row.appendChild(s); return s; }});
    cells.push({{head: head, spans: spans}}); box.appendChild(row);
  }}));
  function show(q) {{
    cells.forEach(({{head, spans}}) => spans.forEach((s, t) => {{
      const w = t <= q ? head[q][t] : 0;
      s.style.background = "rgba(31, 119, 180, " + Math.min(1, w / panel.scale).toFixed(3) + ")";
      s.style.color = w / panel.scale > 0.6 ? "white" : "#222";
      s.title = t <= q ? "attention " + w.toFixed(3) : "future (masked)";
      s.classList.toggle("query", t === q);
    }}));
  }}
  show(DATA.chars.length - 1);
  root.appendChild(box);
}});
</script></body></html>
"""


def html_page(panels: list, chars: list[str], title: str) -> str:
    """A self-contained page (inline data and script) for every panel [(label, (L, H, T, T))]."""
    data = {"chars": chars, "panels": [
        {"label": label, "patterns": [[[[round(float(w), 4) for w in row] for row in head] for head in layer]
                                      for layer in pat],
         "scale": 1.0 if "standard deviation" not in label else max(float(pat.max()), 1e-6)}
        for label, pat in panels]}
    return _PAGE.format(title=html.escape(title), data=json.dumps(data).replace("</", "<\\/"))


def write_attention(run_dir: str, t: dict, log=print) -> dict:
    """PNG grid, HTML page and the patterns as JSON under ``RUN_DIR/attention/``; returns the paths."""
    folder = os.path.join(run_dir, "attention")
    os.makedirs(folder, exist_ok=True)
    stem = f"gen{t['generation']:03d}_{t['text']}_" + ("-".join(map(str, t["members"])) or "population")
    title = (f"Attention on '{t['text']}' (start token '.'), generation {t['generation']}; "
             f"this generation's trigger {t['trigger']} -> {t['payload']}")
    paths = {"html": os.path.join(folder, stem + ".html"), "json": os.path.join(folder, stem + ".json")}
    write_atomic(paths["html"], html_page(t["panels"], t["chars"], title))
    write_json(paths["json"], {"generation": t["generation"], "text": t["text"], "chars": t["chars"],
                               "panels": [{"label": label, "patterns": pat.tolist()} for label, pat in t["panels"]]})
    png = os.path.join(folder, stem + ".png")
    tmp = os.path.join(folder, f".{stem}.tmp{os.getpid()}.png")
    if draw_grid(t["panels"], t["chars"], tmp, title):
        os.replace(tmp, png)
        paths["png"] = png
    else:
        log("matplotlib is not installed: no PNG (pip install -e '.[plot]'); the HTML page has the same numbers")
    for kind, path in paths.items():
        log(f"{kind}: {path}")
    return paths


def show_attention(run_dir: str, picks: list[str], text: str, population: bool = False,
                   generation: int | None = None, device: str = "cpu", log=print) -> dict:
    """``attention_tables`` written to ``RUN_DIR/attention/``."""
    with locked_run(run_dir, "popgpt attention", log, generation) as run:
        t = attention_tables(run, picks, text, population, generation, device)
        t["paths"] = write_attention(run_dir, t, log)
    return t
