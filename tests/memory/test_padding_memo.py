"""advance_seen's per-step memo: layers of one forward share the result; anything changed is recomputed."""

from __future__ import annotations

import pytest
import torch

import hf_longmem
from hf_longmem.memory.padding import PAD_POSITION, advance_seen, zero_seen
from tests.helpers.tiny_models import tiny_model


def test_layers_of_a_step_share_the_result_and_an_in_place_change_is_seen():
    seen = zero_seen(2, "cpu")
    prefill = torch.arange(5)[None].expand(2, -1)
    first = advance_seen(prefill, seen, 5, 2)
    assert advance_seen(prefill, seen, 5, 2) is first  # another layer, same inputs: the same tensors
    assert first[2].tolist() == [5, 5]
    step = torch.tensor([[5], [5]])
    positions, pads, after = advance_seen(step, first[2], 1, 2)
    assert not pads and after.tolist() == [6, 6]
    step[1, 0] = 1  # changed in place (a pad after real tokens): checked again, not served from the memo
    with pytest.raises(ValueError, match="left padding"):
        advance_seen(step, first[2], 1, 2)
    left = torch.tensor([[0, 1, 2], [1, 1, 0]])  # row 1: two pads, then its first token
    positions, pads, after = advance_seen(left, zero_seen(2, "cpu"), 3, 2)
    assert pads and positions[1].tolist() == [PAD_POSITION, PAD_POSITION, 0] and after.tolist() == [3, 1]


@pytest.mark.parametrize("name", ["streaming", "h2o", "d2o"])
def test_inference_mode_decodes_as_no_grad(name):
    """Inference tensors have no version counter: the memo must still give what ``no_grad`` gives."""
    model = tiny_model("llama_gqa")
    ids = torch.randint(3, 90, (2, 40), generator=torch.Generator().manual_seed(1))
    options = {"budget": 16} if name != "d2o" else {"budget": 16, "uncompressed_layers": []}
    runs = []
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            cache = hf_longmem.make_cache(name, model, **options)
            out = model.generate(ids, cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=0)
        runs.append(out)
    assert torch.equal(runs[0], runs[1])
