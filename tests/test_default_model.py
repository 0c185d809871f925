"""The embedded default model loads offline and answers short pass-key and multi-key needle prompts."""

from __future__ import annotations

import pytest
import torch

from hf_longmem import default_model
from hf_longmem.default_model import DEFAULT_MODEL_PATH, load_default_model
from hf_longmem.evals.tasks import multikey_needle, passkey


@pytest.fixture(scope="module")
def loaded():
    return load_default_model()


def test_assets_are_small_and_complete():
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_PATH.rglob("*") if p.is_file())
    assert total <= 30 * 2**20
    for name in ("config.json", "model.safetensors", "generation_config.json", "README.md", "training_metadata.json"):
        assert (DEFAULT_MODEL_PATH / name).is_file(), name


def test_tokenizer_round_trips_a_passkey_prompt(loaded):
    _, tokenizer = loaded
    (sample,) = passkey(tokenizer, 300, 1, seed=5)
    text = sample.context + sample.turns[0].query + " " + sample.turns[0].answers[0]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("task", [passkey, multikey_needle])
def test_answers_short_prompts(loaded, task):
    model, tokenizer = loaded
    assert not model.training
    samples = task(tokenizer, 256, 4, seed=99)
    batch = tokenizer([s.context + s.turns[0].query for s in samples], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [a.strip() for a in answers] == [s.turns[0].answers[0] for s in samples]


def test_missing_assets_and_bad_dtype(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="dtype"):
        load_default_model(dtype="int8")
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PATH", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_default_model()
