"""WISEEditor on tiny random models: target choice, edits, per-sequence routing in forward and generate,
sharding and merging, unload, and argument errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_longmem.editing.side_memory as side_memory
from hf_longmem.editing import WISEConfig, WISEEditor, WISELayer, default_layer, fictional_facts
from hf_longmem.editing.evaluate import token_accuracy
from tests.editing.util import fast_config, make_model


@pytest.fixture(scope="module")
def facts(word_tokenizer):
    return fictional_facts(word_tokenizer, 4, seed=0)


@pytest.fixture(scope="module")
def edited(word_tokenizer, facts):
    """A model with 3 edits (WISE-Retrieve, fast settings) and its editor; facts[3] stays unedited."""
    model = make_model(word_tokenizer)
    reference = make_model(word_tokenizer)
    editor = WISEEditor(model, word_tokenizer, fast_config())
    stats = editor.edit([f.prompt for f in facts[:3]], [f.target for f in facts[:3]])
    return model, reference, editor, stats


def _texts(facts):
    """Edited prompts interleaved with unrelated ones."""
    return [
        facts[0].prompt,
        facts[0].locality_prompt,
        facts[1].prompt + " " + facts[1].target,
        facts[3].locality_prompt,
        facts[2].prompt,
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Target module


@pytest.mark.parametrize("shape", ["llama_gqa", "mistral", "qwen2"])
def test_default_target_and_layer_rule(shape, word_tokenizer):
    model = make_model(word_tokenizer, shape, num_hidden_layers=4)
    editor = WISEEditor(model, word_tokenizer, fast_config())
    assert editor.target_module == "model.layers.3.mlp.down_proj"  # floor(0.85 * 4) = 3
    assert isinstance(model.model.layers[3].mlp.down_proj, WISELayer)
    editor.unload()
    assert type(model.model.layers[3].mlp.down_proj) is nn.Linear


def test_easyedit_layers_and_rule():
    class Fake(nn.Module):
        def __init__(self, **config):
            super().__init__()
            self.config = type("C", (), config)()

    assert default_layer(Fake(model_type="llama", hidden_size=4096, intermediate_size=11008), 32) == 27
    assert default_layer(Fake(model_type="llama", hidden_size=4096, intermediate_size=14336), 32) == 29
    assert default_layer(Fake(model_type="qwen2", hidden_size=3584, intermediate_size=18944), 28) == 23
    assert default_layer(Fake(model_type="phi3"), 40) == 34 and default_layer(Fake(), 2) == 1


def test_target_arguments_and_errors(word_tokenizer):
    model = make_model(word_tokenizer)
    editor = WISEEditor(model, word_tokenizer, fast_config(layer=0))
    assert editor.target_module == "model.layers.0.mlp.down_proj"
    with pytest.raises(ValueError, match="already has a WISE side memory"):
        WISEEditor(model, word_tokenizer, fast_config())
    editor.unload()
    with pytest.raises(ValueError, match="layer=7 is out of range"):
        WISEEditor(model, word_tokenizer, fast_config(layer=7))
    with pytest.raises(ValueError, match="target_module='model.nope'"):
        WISEEditor(model, word_tokenizer, fast_config(target_module="model.nope"))
    with pytest.raises(ValueError, match="nn.Linear"):
        WISEEditor(model, word_tokenizer, fast_config(target_module="model.layers.1.mlp"))
    with pytest.raises(ValueError, match="config must be a WISEConfig"):
        WISEEditor(model, word_tokenizer, {"n_iter": 3})
    editor = WISEEditor(model, word_tokenizer, fast_config(target_module="model.layers.1.mlp.down_proj.weight"))
    assert editor.target_module == "model.layers.1.mlp.down_proj"
    editor.unload()


def test_state_dict_and_parameters_unchanged(word_tokenizer):
    model = make_model(word_tokenizer)
    keys, count = list(model.state_dict()), sum(p.numel() for p in model.parameters())
    editor = WISEEditor(model, word_tokenizer, fast_config())
    assert list(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == count
    editor.unload()


# ---------------------------------------------------------------------------------------------------------------------
# Editing and routing


def test_edits_are_learned_and_main_memory_untouched(edited, word_tokenizer, facts):
    model, reference, editor, stats = edited
    assert [s.index for s in stats] == [0, 1, 2] and all(0 < s.steps <= 25 for s in stats)
    assert torch.equal(editor.layer.weight, reference.model.layers[1].mlp.down_proj.weight)
    accuracy = token_accuracy(model, word_tokenizer, [f.prompt for f in facts[:3]], [f.target for f in facts[:3]])
    assert accuracy == [1.0, 1.0, 1.0]
    assert editor.route_labels([f.prompt + " " + f.target for f in facts[:3]]) == ["shard"] * 3
    with editor.disable_adapter():
        before = token_accuracy(model, word_tokenizer, [f.prompt for f in facts[:3]], [f.target for f in facts[:3]])
    assert max(before) < 1.0


def test_batch_routing_rows_equal_single_forwards(edited, word_tokenizer, facts):
    model, reference, editor, _ = edited
    texts = _texts(facts)
    assert editor.route_labels(texts) == ["shard", "main", "shard", "main", "shard"]
    word_tokenizer.padding_side = "left"
    batch = word_tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        for row, text in enumerate(texts):
            single = model(**word_tokenizer([text], return_tensors="pt")).logits[0]
            torch.testing.assert_close(logits[row, -single.shape[0] :], single, rtol=1e-4, atol=1e-4)
        # unrelated rows are exactly the unedited model's
        base = reference(**batch).logits
    for row in (1, 3):
        torch.testing.assert_close(logits[row], base[row], rtol=1e-5, atol=1e-5)


def test_batched_generate_equals_single_and_keeps_the_prompt_route(edited, word_tokenizer, facts, monkeypatch):
    model, _, editor, _ = edited
    texts = _texts(facts)
    calls = []
    real = side_memory.choose_routes
    monkeypatch.setattr(side_memory, "choose_routes", lambda *a: calls.append(1) or real(*a))
    word_tokenizer.padding_side = "left"
    batch = word_tokenizer(texts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert len(calls) == 1  # decided once on the prompt, kept for the 3 decode steps
    assert editor.layer.last_routes.tolist() == [0, -1, 0, -1, 0]
    for row, text in enumerate(texts):
        single = word_tokenizer([text], return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=4, do_sample=False)
        assert alone[0, single["input_ids"].shape[1] :].tolist() == out[row, batch["input_ids"].shape[1] :].tolist()
    generated = word_tokenizer.decode(out[0, batch["input_ids"].shape[1] :])
    assert generated.startswith(" " + facts[0].target)
    editor.layer.wise_config.route_on_generate = "every_step"  # EasyEdit's behaviour: re-routed at each token
    try:
        calls.clear()
        model.generate(**batch, max_new_tokens=4, do_sample=False)
        assert len(calls) == 4
    finally:
        editor.layer.wise_config.route_on_generate = "prompt"


def test_edit_argument_errors(edited):
    _, _, editor, _ = edited
    with pytest.raises(ValueError, match="prompts has 2 entries but targets has 1"):
        editor.edit(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="prompts must"):
        editor.edit([], [])
    with pytest.raises(ValueError, match="locality_prompts has 2 entries"):
        editor.edit(["The tiger is"], ["green"], locality_prompts=["x", "y"])
    with pytest.raises(ValueError, match="paraphrases"):
        editor.edit(["The tiger is"], ["green"], paraphrases="The tiger:")
    with pytest.raises(ValueError, match="target"):
        editor.edit(["The tiger is"], [" "])
    assert editor.num_edits == 3  # nothing was written by the failed calls


@pytest.mark.parametrize("retrieve", [True, False])
def test_shards_and_merges(word_tokenizer, retrieve):
    facts = fictional_facts(word_tokenizer, 5, seed=1)
    model = make_model(word_tokenizer)
    config = fast_config(save_freq=2, merge_freq=4, retrieve=retrieve, n_iter=20)
    editor = WISEEditor(model, word_tokenizer, config)
    stats = editor.edit([f.prompt for f in facts], [f.target for f in facts])
    assert [s.events for s in stats] == [[], ["saved shard"], [], ["saved shard", "merged"], []]
    assert [s.shard for s in stats] == [0, 0, 1, 1, 2]
    labels = [c[0] for c in editor.layer.candidates()]
    assert labels == (["shard", "memory.0"] if retrieve else ["merged", "shard"])
    layer = editor.layer
    assert torch.equal(layer.weight, make_model(word_tokenizer).model.layers[1].mlp.down_proj.weight)
    delta = layer.memory_tensors()["memory.0" if retrieve else "merged"] - layer.weight
    assert 0.2 < (delta != 0).float().mean() < 0.5  # two shards of ~20% random entries each
    routes = editor.route_labels([f.prompt for f in facts])
    assert routes[-1] == "shard" and all(r != "main" for r in routes)


def test_conv1d_projection_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.helpers.tiny_tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=128)).eval()
    editor = WISEEditor(model, tokenizer, fast_config(n_iter=30))
    assert editor.target_module == "transformer.h.1.mlp.c_proj" and editor.layer.transposed
    editor.edit(["The tiger is"], ["blue"])
    assert token_accuracy(model, tokenizer, ["The tiger is"], ["blue"]) == [1.0]


def test_unknown_activation_needs_paper_scores(word_tokenizer):
    from types import SimpleNamespace

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.down_proj = nn.Linear(8, 4)

    model = nn.Module()
    model.layers = nn.ModuleList([Block(), Block()])
    model.config = SimpleNamespace(model_type="toy")
    with pytest.raises(ValueError, match="routing_score='paper'"):
        WISEEditor(model, word_tokenizer, WISEConfig(context_templates=["{}"]))
    editor = WISEEditor(model, word_tokenizer, WISEConfig(context_templates=["{}"], routing_score="paper"))
    assert editor.target_module == "layers.1.mlp.down_proj"
    editor.unload()


def test_replay_trains_against_past_groups_and_survives_reload(word_tokenizer, tmp_path):
    facts = fictional_facts(word_tokenizer, 4, seed=3)
    model = make_model(word_tokenizer)
    config = fast_config(save_freq=1, merge_freq=1, replay=True, n_iter=8)
    editor = WISEEditor(model, word_tokenizer, config)
    stats = editor.edit([f.prompt for f in facts[:3]], [f.target for f in facts[:3]])
    assert [len(g) for g in editor._replay_groups] == [1, 1, 1] and editor._replay_current == []
    assert [c[0] for c in editor.layer.candidates()] == ["memory.0", "memory.1", "memory.2"]
    assert all(s.events == ["saved shard", "merged"] for s in stats)
    editor.save_pretrained(tmp_path / "replay")
    fresh = make_model(word_tokenizer)
    loaded = WISEEditor.from_pretrained(fresh, word_tokenizer, tmp_path / "replay")
    loaded.edit(facts[3].prompt, facts[3].target)  # rebuilds the history from the edit log first
    assert [g[0]["input_ids"].tolist() for g in loaded._replay_groups[:3]] == [
        g[0]["input_ids"].tolist() for g in editor._replay_groups
    ]
    with pytest.raises(ValueError, match="replay=True applies to WISE-Retrieve"):
        WISEConfig(replay=True, retrieve=False)
