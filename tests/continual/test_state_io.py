import math

import pytest
import torch

from hf_longmem.continual.state_io import load_tree, save_tree


def test_round_trip_keeps_types_keys_and_tensors(tmp_path):
    state = {
        "step": 3,
        "accuracy": {0: 0.5, 1: float("nan")},  # int keys, NaN
        "items": [(1, 2, 0), (3, 4, 1)],
        "mask": torch.tensor([[True, False]]),
        "ema": {"w": torch.randn(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "rng": {"state": {"state": 2**100 + 7, "inc": 11}, "bit_generator": "PCG64"},
        "__tensor__": "a key that looks like a tag",
        "none": None,
    }
    save_tree(state, tmp_path, "s")
    loaded = load_tree(tmp_path, "s")
    assert loaded["step"] == 3 and loaded["none"] is None and loaded["items"] == [(1, 2, 0), (3, 4, 1)]
    assert loaded["accuracy"][0] == 0.5 and math.isnan(loaded["accuracy"][1])
    assert torch.equal(loaded["mask"], state["mask"]) and torch.equal(loaded["ema"]["w"], state["ema"]["w"])
    assert loaded["ema"]["b"].dtype == torch.bfloat16
    assert loaded["rng"]["state"]["state"] == 2**100 + 7
    assert loaded["__tensor__"] == "a key that looks like a tag"


def test_unsupported_state_is_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match=r"s\.strategies\[0\]\.fn"):
        save_tree({"strategies": [{"fn": print}]}, tmp_path, "s")
    assert not (tmp_path / "s.json").exists()


def test_missing_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        load_tree(tmp_path, "s")
    (tmp_path / "s.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not an hf_longmem"):
        load_tree(tmp_path, "s")
