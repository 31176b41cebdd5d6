"""Names -> token tensors: vocabulary, loading with validation, splits, batches.

Vocabulary: token 0 is the boundary token (written ``.``), marking both the
start and the end of a document; tokens 1..26 are the letters a..z.
A document "emma" becomes ``[0, e, m, m, a, 0]``; a model reads all but the
last token and predicts all but the first.
"""

import os

import torch

BOUNDARY = 0
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB_SIZE = len(LETTERS) + 1
IGNORE = -1  # target id of padding positions (cross_entropy ignore_index)
# The names that ship with popgpt: 32,000 US first names (2008-2017), most common first (scripts/build_names.py)
NAMES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "names.txt")
_STOI = {ch: i + 1 for i, ch in enumerate(LETTERS)}


class DataError(ValueError):
    """A names file or document that popgpt cannot use; the message names where."""


def encode(text: str) -> list[int]:
    try:
        return [_STOI[ch] for ch in text]
    except KeyError as e:
        raise DataError(f"character {e.args[0]!r} in {text!r} is not in the vocabulary (a-z)") from None


def decode(tokens) -> str:
    """Letters of a token sequence, stopping at the first boundary token."""
    out = []
    for t in tokens:
        t = int(t)
        if t == BOUNDARY:
            break
        out.append(LETTERS[t - 1])
    return "".join(out)


def read_text(path: str) -> str:
    """A UTF-8 text file's content; every failure a DataError naming the file."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a names file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such names file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def load_names(path: str | os.PathLike = NAMES_FILE, max_len: int | None = None) -> list[str]:
    """Read one name per line (default: the names that ship with popgpt); reject anything outside a-z, or
    longer than ``max_len``, with file and line."""
    path = os.fspath(path)
    names = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        bad = [ch for ch in name if ch not in _STOI]
        if bad:
            raise DataError(
                f"{path}:{lineno}: {name[:40]!r}{'...' if len(name) > 40 else ''} has character {bad[0]!r} "
                f"outside the vocabulary (lower-case a-z, one name per line)")
        if max_len is not None and len(name) > max_len:
            raise DataError(f"{path}:{lineno}: a name of {len(name):,} letters is longer than the maximum "
                            f"of {max_len} (--max-name-length)")
        names.append(name)
    if not names:
        raise DataError(f"{path}: contains no names")
    return names


def split_names(names: list[str], val_frac: float, generator: torch.Generator):
    """Shuffle with ``generator`` and split into (train, val) lists."""
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    n_val = max(1, int(round(len(names) * val_frac)))
    if n_val >= len(names):
        raise DataError(f"{len(names)} names are too few to hold out {n_val} for validation")
    order = torch.randperm(len(names), generator=generator).tolist()
    shuffled = [names[i] for i in order]
    return shuffled[n_val:], shuffled[:n_val]


def docs_to_tensor(docs: list[str], block_size: int) -> torch.Tensor:
    """(N, block_size + 1) int64: boundary, letters, boundary, then IGNORE padding."""
    out = torch.full((len(docs), block_size + 1), IGNORE, dtype=torch.long)
    for i, doc in enumerate(docs):
        if len(doc) + 1 > block_size:
            raise DataError(f"document {doc!r} ({len(doc)} letters) does not fit block_size {block_size}")
        out[i, : len(doc) + 2] = torch.tensor([BOUNDARY, *encode(doc), BOUNDARY])
    return out


def inputs_targets(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split encoded rows (..., T+1), of any integer dtype, into int64 inputs (..., T) and targets (..., T)."""
    x = rows[..., :-1].long().clamp(min=0)  # padding inputs only feed ignored targets
    y = rows[..., 1:].long()
    return x, y
