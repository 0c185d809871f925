"""save_pretrained / from_pretrained round trips, damaged or mismatched files, and publishing with a WISE card."""

from __future__ import annotations

import json

import pytest
import torch

from hf_longmem.editing import WISEEditor, fictional_facts
from hf_longmem.editing.editor import CONFIG_NAME, EDIT_LOG_NAME, MEMORY_NAME
from hf_longmem.hub import LocalFolderApi
from tests.editing.util import fast_config, make_model


@pytest.fixture(scope="module")
def saved(word_tokenizer, tmp_path_factory):
    """A WISE-Merge editor with 3 edits over save_freq=2 (a pending shard plus the current one), saved."""
    facts = fictional_facts(word_tokenizer, 4, seed=2)
    model = make_model(word_tokenizer)
    editor = WISEEditor(model, word_tokenizer, fast_config(save_freq=2, merge_freq=4, retrieve=False))
    editor.edit(
        [f.prompt for f in facts[:3]],
        [f.target for f in facts[:3]],
        paraphrases=[f.paraphrases for f in facts[:3]],
        source="fictional(seed=2)",
    )
    path = tmp_path_factory.mktemp("wise") / "edits"
    editor.save_pretrained(path)
    return model, editor, facts, path


def _inputs(word_tokenizer, facts):
    texts = [f.prompt + " " + f.target for f in facts[:3]] + [facts[3].locality_prompt]
    return word_tokenizer(texts, return_tensors="pt", padding=True)


def test_round_trip_reproduces_outputs_exactly(saved, word_tokenizer):
    model, editor, facts, path = saved
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, MEMORY_NAME, EDIT_LOG_NAME])  # no temp files
    batch = _inputs(word_tokenizer, facts)
    fresh = make_model(word_tokenizer)
    loaded = WISEEditor.from_pretrained(fresh, word_tokenizer, path)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)
        expected = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert torch.equal(fresh.generate(**batch, max_new_tokens=3, do_sample=False), expected)
    assert loaded.num_edits == 3 and [c[0] for c in loaded.layer.candidates()] == ["pending.0", "shard"]
    assert loaded.context_templates == ["{}"] and loaded.wise_config == editor.wise_config
    assert [e["prompt"] for e in loaded.edit_log] == [f.prompt for f in facts[:3]]
    # editing continues from the loaded state: the next edit completes the merge group
    stats = loaded.edit(facts[3].prompt, facts[3].target)
    assert stats[0].events == ["saved shard", "merged"] and stats[0].shard == 1


def test_damaged_files_give_clear_errors(saved, word_tokenizer, tmp_path):
    _, _, _, path = saved
    for name in (CONFIG_NAME, MEMORY_NAME):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    data = (path / MEMORY_NAME).read_bytes()
    (tmp_path / MEMORY_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        WISEEditor.from_pretrained(make_model(word_tokenizer), word_tokenizer, tmp_path)
    (tmp_path / MEMORY_NAME).write_bytes(data[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="sha256"):
        WISEEditor.from_pretrained(make_model(word_tokenizer), word_tokenizer, tmp_path)
    (tmp_path / MEMORY_NAME).write_bytes(data)
    text = (path / CONFIG_NAME).read_text()
    (tmp_path / CONFIG_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        WISEEditor.from_pretrained(make_model(word_tokenizer), word_tokenizer, tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match="no wise_config.json"):
        WISEEditor.from_pretrained(make_model(word_tokenizer), word_tokenizer, tmp_path)
    with pytest.raises(FileNotFoundError):
        WISEEditor.from_pretrained(make_model(word_tokenizer), word_tokenizer, tmp_path / "absent" / "dir")


def test_mismatched_models_are_refused(saved, word_tokenizer):
    _, _, _, path = saved
    other = make_model(word_tokenizer, seed=1)
    with pytest.raises(ValueError, match="differs from the one the edits were made on"):
        WISEEditor.from_pretrained(other, word_tokenizer, path)
    assert not any(type(m).__name__ == "WISELayer" for m in other.modules())  # left untouched
    with pytest.raises(ValueError, match="weight shape"):
        WISEEditor.from_pretrained(make_model(word_tokenizer, intermediate_size=96), word_tokenizer, path)
    with pytest.raises(ValueError, match="does not have"):
        WISEEditor.from_pretrained(make_model(word_tokenizer, num_hidden_layers=1), word_tokenizer, path)
    half = make_model(word_tokenizer).to(torch.bfloat16)  # same base in another dtype is accepted
    WISEEditor.from_pretrained(half, word_tokenizer, path).unload()


def test_publish_with_wise_card(saved, tmp_path):
    _, editor, facts, _ = saved
    api = LocalFolderApi(tmp_path / "hub")
    folder = editor.push_to_hub("me/tiny-wise", api=api, base_model="org/tiny-base")
    files = sorted(p.name for p in (tmp_path / "hub" / "me" / "tiny-wise").iterdir())
    assert files == sorted(["README.md", CONFIG_NAME, MEMORY_NAME, EDIT_LOG_NAME]) and folder.endswith("tiny-wise")
    card = (tmp_path / "hub" / "me" / "tiny-wise" / "README.md").read_text()
    assert "WISE-Merge" in card and "model.layers.1.mlp.down_proj" in card and "base_model_relation: adapter" in card
    assert facts[0].prompt in card and "| fictional(seed=2) | 3 |" in card and "wise_edits.jsonl" in card
    assert 'WISEEditor.from_pretrained(model, tokenizer, "me/tiny-wise")' in card and "org/tiny-base" in card
    for tag in ("model-editing", "wise", "hf-longmem"):
        assert f"- {tag}" in card
    meta = json.loads((tmp_path / "hub" / "me" / "tiny-wise" / CONFIG_NAME).read_text())
    assert meta["routing_state"]["num_edits"] == 3 and meta["method"] == "WISE-Merge"


def test_save_without_edit_log(saved, tmp_path):
    _, editor, _, _ = saved
    editor.save_pretrained(tmp_path / "private", include_edit_log=False)
    assert not (tmp_path / "private" / EDIT_LOG_NAME).exists()
    assert editor.card_metadata()["wise"]["num_edits"] == 3
