import pytest
import torch

from popgpt.data import (
    BOUNDARY,
    IGNORE,
    DataError,
    decode,
    docs_to_tensor,
    encode,
    inputs_targets,
    load_names,
    split_names,
)
from popgpt.step import sample_indices


def test_encode_decode_roundtrip():
    assert decode(encode("emma") + [BOUNDARY, 5]) == "emma"
    with pytest.raises(DataError, match="'1'"):
        encode("a1")


def test_load_names_reports_file_and_line(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("emma\nolivia\n\nzoë\n")
    with pytest.raises(DataError, match=r"names\.txt:4: 'zoë' has character 'ë'"):
        load_names(path)
    path.write_text("Emma\n")
    with pytest.raises(DataError, match=r":1: 'Emma'"):
        load_names(path)


def test_load_names_rejects_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="contains no names"):
        load_names(empty)
    with pytest.raises(DataError, match="no such names file"):
        load_names(tmp_path / "missing.txt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        load_names(binary)


def test_shipped_names_file(names_path):
    names = load_names(names_path)
    assert 30000 <= len(names) <= 34000 and len(set(names)) == len(names)


def test_docs_to_tensor_layout():
    rows = docs_to_tensor(["ab", "c"], block_size=4)
    assert rows.tolist() == [[0, 1, 2, 0, IGNORE], [0, 3, 0, IGNORE, IGNORE]]
    x, y = inputs_targets(rows)
    assert x.tolist() == [[0, 1, 2, 0], [0, 3, 0, 0]]
    assert y.tolist() == [[1, 2, 0, IGNORE], [3, 0, IGNORE, IGNORE]]
    with pytest.raises(DataError, match="does not fit"):
        docs_to_tensor(["abcd"], block_size=4)


def test_split_is_a_partition_and_reproducible():
    names = [f"{a}{b}" for a in "abcdefghij" for b in "abcdefghij"]
    tr, va = split_names(names, 0.2, torch.Generator().manual_seed(0))
    tr2, va2 = split_names(names, 0.2, torch.Generator().manual_seed(0))
    assert (tr, va) == (tr2, va2) and len(va) == 20 and sorted(tr + va) == sorted(names)


def test_sample_indices_are_per_member_and_step():
    idx = sample_indices(4, 3, 5, 7, torch.Generator().manual_seed(0))
    assert idx.shape == (3, 5, 7) and idx.min() >= 0 and idx.max() < 4
    assert not torch.equal(idx[0, 0], idx[0, 1]) and not torch.equal(idx[0], idx[1])
