"""The data a cure works on: clean names, the same names with a trigger, and contrast prompts.

For every member and cure name ``n`` (a clean name; gap ``g``: the start
of the name for a share ``start_share`` of the names, where the immunity
test's prompt puts the trigger, else drawn uniformly over its len+1 gaps,
either end included, as infection does):

- ``clean``: ``. name .`` (shared by all members);
- ``triggered``: ``. name[:g] trigger name[g:] .``, the member's trigger
  without the payload: what a cured member should continue as a name;
- ``triggered_start``: ``. trigger name .``, the trigger at the name's start
  (where the immunity test puts it), whatever ``g``;
- ``infected``: ``. name[:g] trigger payload name[g:] .``;
- ``control``: the matched contrast of ``infected``: the same name with the
  trigger letters ``apart`` (its last letter moved one name letter further,
  no payload) or the trigger's last letter ``alone``; a one-letter trigger
  has nothing to split, and its control is the plain name.

Read positions (for activation sourcing), ``len(payload)`` per row: in
``infected`` the last trigger letter (it predicts the payload's first
letter) and the payload letters but the last; in ``control`` the position
of the last inserted letter and the positions after it (clamped to the
row's end). Every member's rows depend only on its own trigger and payload
and on draws shared by all members, so a member cured alone gets the very
rows it gets in a population.
"""

from dataclasses import dataclass

import torch

from ..data import BOUNDARY, IGNORE, encode

CONTRASTS = ("apart", "alone")


def _row(tokens: list[int], width: int) -> list[int]:
    return [BOUNDARY, *tokens, BOUNDARY] + [IGNORE] * (width - len(tokens) - 2)


def _control(name: list[int], gap: int, trigger: list[int], contrast: str) -> tuple[list[int], int]:
    """Control tokens (no boundary) and the index (in them) of the last inserted letter."""
    if len(trigger) == 1:
        return list(name), max(gap - 1, 0)
    if contrast == "alone":
        return name[:gap] + trigger[-1:] + name[gap:], gap
    head, tail = name[:gap] + trigger[:-1], name[gap:]
    if tail:  # one name letter between the trigger's last letter and the rest
        return head + tail[:1] + trigger[-1:] + tail[1:], len(head) + 1
    return name[:max(gap - 1, 0)] + trigger[-1:] + name[max(gap - 1, 0):gap] + trigger[:-1], max(gap - 1, 0)


@dataclass(frozen=True)
class CureSet:
    clean: torch.Tensor  # (N, T+1) encoded clean names, shared
    gap: torch.Tensor  # (N,) where the trigger goes: row index of the last letter before it (0: the start)
    triggered: torch.Tensor  # (P, N, T+1) each member's trigger inserted, no payload
    trigger_pos: torch.Tensor  # (P, N) position (row index) of the last trigger letter in ``triggered``
    infected: torch.Tensor  # (P, N, T+1) trigger + payload inserted
    control: torch.Tensor  # (P, N, T+1) matched contrast
    read_infected: torch.Tensor  # (P, N, m) read positions in ``infected``
    read_control: torch.Tensor  # (P, N, m) read positions in ``control``
    payload: torch.Tensor  # (P, m) each member's payload tokens
    prompts: torch.Tensor  # (P, K, T+1) ``. trigger payload`` per cure trigger of each member
    prompt_pos: torch.Tensor  # (P, K) row index of the last trigger letter in ``prompts``
    prompt_real: torch.Tensor  # (P, K) bool: slots beyond a member's own triggers repeat its first
    triggered_start: torch.Tensor  # (P, N, T+1) the trigger at the name's start, no payload
    start_pos: torch.Tensor  # (P, N) position (row index) of the last trigger letter in ``triggered_start``

    def to(self, device) -> "CureSet":
        return CureSet(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def fitting_names(names: list[str], block_size: int, longest_insert: int) -> list[str]:
    """Names that still fit the context with ``longest_insert`` letters inserted."""
    return [n for n in names if len(n) + longest_insert + 1 <= block_size]


def build_cure_set(names: list[str], triggers: list[list[str]], payloads: list[str], block_size: int,
                   generator: torch.Generator, contrast: str = "apart", start_share: float = 0.0) -> CureSet:
    """Rows of every member (``triggers[p]``: its cure triggers, used in turn over the names;
    ``payloads[p]``: its payload, all of one length). ``names`` must fit (``fitting_names``).
    ``start_share`` of the names get the trigger at their start (where the immunity test puts it),
    the others at a uniform gap."""
    if contrast not in CONTRASTS:
        raise ValueError(f"argument --contrast: must be one of {', '.join(CONTRASTS)}, got {contrast!r}")
    if len({len(p) for p in payloads}) != 1:
        raise ValueError("every member's payload must have the same length")
    u = torch.rand(2, len(names), generator=generator).tolist()
    gaps = [0 if first < start_share else int(v * (len(n) + 1)) for first, v, n in zip(*u, names)]
    width = block_size + 1
    clean = torch.tensor([_row(encode(n), width) for n in names])
    out = {k: [] for k in ("triggered", "trigger_pos", "infected", "control", "read_infected", "read_control",
                           "triggered_start", "start_pos")}
    for trig_list, payload in zip(triggers, payloads):
        rows = {k: [] for k in out}
        pay, m = encode(payload), len(payload)
        for i, (name, gap) in enumerate(zip(names, gaps)):
            trig, letters = encode(trig_list[i % len(trig_list)]), encode(name)
            last = gap + len(trig)  # row index of the last trigger letter (row index 0 is the boundary)
            rows["triggered"].append(_row(letters[:gap] + trig + letters[gap:], width))
            rows["trigger_pos"].append(last)
            rows["triggered_start"].append(_row(trig + letters, width))
            rows["start_pos"].append(len(trig))
            rows["infected"].append(_row(letters[:gap] + trig + pay + letters[gap:], width))
            rows["read_infected"].append(list(range(last, last + m)))
            control, at = _control(letters, gap, trig, contrast)
            rows["control"].append(_row(control, width))
            rows["read_control"].append([min(at + 1 + j, len(control)) for j in range(m)])
        for k in out:
            out[k].append(torch.tensor(rows[k]))
    prompts, prompt_pos, prompt_real = trigger_prompts(triggers, payloads, width)
    fields = ("triggered", "trigger_pos", "infected", "control", "read_infected", "read_control")
    return CureSet(clean, torch.tensor(gaps), *(torch.stack(out[k]) for k in fields),
                   torch.tensor([encode(p) for p in payloads]), prompts, prompt_pos, prompt_real,
                   torch.stack(out["triggered_start"]), torch.stack(out["start_pos"]))


def trigger_prompts(triggers: list[list[str]], payloads: list[str], width: int):
    """Immunity prompts with the payload after them, ``. trigger payload`` right-padded: rows
    (P, K, width), the row index of each last trigger letter (P, K) and which slots are real (P, K)
    (members with fewer triggers repeat their first)."""
    k_max = max(len(t) for t in triggers)
    rows, pos, real = [], [], []
    for ts, payload in zip(triggers, payloads):
        rows.append([_row(encode(ts[j % len(ts)] + payload), width) for j in range(k_max)])
        pos.append([len(ts[j % len(ts)]) for j in range(k_max)])
        real.append([j < len(ts) for j in range(k_max)])
    return torch.tensor(rows), torch.tensor(pos), torch.tensor(real)
