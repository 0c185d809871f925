"""Teacher-forced metrics, the sequential protocol (WISE and the fine-tuning baseline) and `hf-longmem edit`."""

from __future__ import annotations

import json

import pytest
import torch

from hf_longmem.cli import main
from hf_longmem.editing import WISEEditor, fictional_facts
from hf_longmem.editing.evaluate import FineTuneBaseline, evaluate_records, run_sequential, token_accuracy
from tests.editing.util import fast_config, make_model


def test_token_accuracy_is_teacher_forced(word_tokenizer):
    model = make_model(word_tokenizer)
    prompt, target = "The sky is", "blue . The sun"
    ids = word_tokenizer(prompt + " " + target, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)[0]
    gold = ids[0, 4:]  # <s> The sky is | blue . The sun
    expected = (predicted[3:-1] == gold).float().mean().item()
    assert token_accuracy(model, word_tokenizer, [prompt, prompt], [target, target]) == [expected, expected]


def test_run_sequential_wise_and_fine_tuning(word_tokenizer):
    facts = fictional_facts(word_tokenizer, 3, seed=5)
    model = make_model(word_tokenizer)
    weight = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    rows = run_sequential("WISE-Retrieve", model, word_tokenizer, facts, config=fast_config(), checkpoints=(1, 3))
    assert [r["T"] for r in rows] == [1, 3] and rows[0]["reliability"] == 1.0
    assert all(r["locality"] == 1.0 for r in rows) and 0.0 < rows[-1]["reliability"] <= 1.0
    assert rows[-1]["num_paraphrases"] == 3 and rows[-1]["num_side_memories"] == 1
    assert not any(type(m).__name__ == "WISELayer" for m in model.modules())  # unloaded
    ft = run_sequential("FT", model, word_tokenizer, facts, config=fast_config(), checkpoints=(3,))
    assert ft[0]["method"] == "FT" and ft[0]["num_side_memories"] == 0
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, weight)  # restored
    with pytest.raises(ValueError, match="method"):
        run_sequential("ROME", model, word_tokenizer, facts)
    with pytest.raises(ValueError, match="fewer than max"):
        run_sequential("FT", model, word_tokenizer, facts, checkpoints=(10,))


def test_fine_tuning_changes_the_main_memory(word_tokenizer):
    facts = fictional_facts(word_tokenizer, 2, seed=6)
    model = make_model(word_tokenizer)
    baseline = FineTuneBaseline(model, word_tokenizer, fast_config())
    baseline.edit([f.prompt for f in facts], [f.target for f in facts])
    changed = model.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(changed, baseline.original)
    assert (changed - baseline.original).abs().max() <= 1.0 + 1e-6  # clamped like WISE
    scores = evaluate_records(model, word_tokenizer, facts)
    assert scores.locality is None and scores.num_edits == 2
    baseline.restore()
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, baseline.original)


def test_cli_edit(word_tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    make_model(word_tokenizer).save_pretrained(model_dir)
    word_tokenizer.save_pretrained(model_dir)
    facts = fictional_facts(word_tokenizer, 2, seed=7)
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps(f.to_dict()) + "\n" for f in facts))
    out = tmp_path / "out"
    argv = [
        "edit",
        "--model",
        str(model_dir),
        "--edits",
        str(edits),
        "--out",
        str(out),
        "--threads",
        "1",
        "--option",
        "n_iter=20",
        "--option",
        'context_templates=["{}"]',
        "--merge",
        "--evaluate",
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 edits (WISE-Merge, model.layers.1.mlp.down_proj)" in printed and "reliability 1.000" in printed
    assert json.loads((out / "wise_config.json").read_text())["routing_state"]["num_edits"] == 2
    reloaded = make_model(word_tokenizer)
    WISEEditor.from_pretrained(reloaded, word_tokenizer, out)
    assert token_accuracy(reloaded, word_tokenizer, [f.prompt for f in facts], [f.target for f in facts]) == [1.0, 1.0]
    assert main(["edit", "--model", str(model_dir), "--edits", str(tmp_path / "no.jsonl"), "--out", str(out)]) == 2
    assert "--edits" in capsys.readouterr().err
    assert main([*argv, "--option", "mask_ratio=2"]) == 2
    assert "mask_ratio" in capsys.readouterr().err
