"""A tiny run of recipes/train_tiny.py end to end: train a few steps, save, reload with Auto classes, generate."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_longmem.evals.tasks import passkey

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "train_tiny.py"
CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "train_tiny.yaml"


def test_shipped_config_parses():
    sys.path.insert(0, str(RECIPE.parent))
    try:
        import train_tiny
    finally:
        sys.path.remove(str(RECIPE.parent))
    config = train_tiny.parse_config(["--config", str(CONFIG), "--max_steps", "7"])
    assert config.max_steps == 7 and config.model["num_key_value_heads"] < config.model["num_attention_heads"]
    schedule = list(train_tiny.length_schedule(config))
    assert len(schedule) == 7 and all(n * b >= min(config.tokens_per_batch, n) for n, b in schedule)


def _run_shrunk_recipe(tmp_path, tokens_per_batch: int, min_length: int, max_length: int, *args: str):
    """Runs the recipe in a subprocess on a 2-layer, 32-wide version of the shipped config; returns the output dir."""
    config = yaml.safe_load(CONFIG.read_text())
    config["model"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config.update(
        tokens_per_batch=tokens_per_batch,
        curriculum=[{"until": 1.0, "min_length": min_length, "max_length": max_length}],
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "model"
    cmd = [sys.executable, str(RECIPE), "--config", str(config_path), "--output_dir", str(out), "--save_every", "0"]
    subprocess.run([*cmd, *args], check=True, timeout=120, capture_output=True)
    return out


def test_tiny_run_saves_a_loadable_model(tmp_path):
    out = _run_shrunk_recipe(tmp_path, 512, 192, 256, "--max_steps", "3", "--log_every", "1")

    metadata = json.loads((out / "training_metadata.json").read_text())
    assert metadata["steps"] == 3 and len(metadata["history"]) == 3 and metadata["wall_time_s"] > 0
    assert (out / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == len(tokenizer)
    (sample,) = passkey(tokenizer, 128, 1)
    ids = tokenizer(sample.context + sample.turns[0].query, return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids["input_ids"].shape[1] + 4) or generated[0, -1] == tokenizer.eos_token_id
    assert torch.equal(generated[:, : ids["input_ids"].shape[1]], ids["input_ids"])


def test_v2_config_parses_and_recall_loss_targets_the_queried_values():
    sys.path.insert(0, str(RECIPE.parent))
    try:
        import train_tiny
    finally:
        sys.path.remove(str(RECIPE.parent))
    v1 = train_tiny.parse_config(["--config", str(CONFIG)])
    assert v1.recall_loss_weight == 0 and v1.init_from == ""  # v1 trains from scratch without the recall task
    v2 = CONFIG.with_name("train_tiny_v2.yaml")
    config = train_tiny.parse_config(["--config", str(v2), "--max_steps", "2", "--recall_loss_weight", "1"])
    assert config.recall_loss_weight == 1 and (RECIPE.parents[1] / config.init_from / "config.json").is_file()
    tokenizer = train_tiny.build_tokenizer()
    seen = {}

    class Spy(torch.nn.Module):  # records the ids and returns logits that put all mass on the true next token
        def forward(self, input_ids):
            seen["ids"] = input_ids
            logits = torch.full((*input_ids.shape, len(tokenizer)), -1e4)
            logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1e4)
            return type("Out", (), {"logits": logits})

    loss = train_tiny.recall_loss(Spy(), config, tokenizer, torch.Generator().manual_seed(0), "cpu")
    assert loss.item() == 0.0
    ids, n, v, g = seen["ids"], config.recall_pairs, config.recall_value_length, config.recall_gap
    records = ids[:, 1 : 1 + n * (1 + v)].view(len(ids), n, 1 + v)
    queries = ids[:, 1 + n * (1 + v) :].view(len(ids), n, 1 + g + v)
    for row in range(len(ids)):
        table = {int(r[0]): r[1:].tolist() for r in records[row]}
        assert len(table) == n and sorted(table) == sorted(queries[row, :, 0].tolist())
        assert all(table[int(q[0])] == q[1 + g :].tolist() for q in queries[row])


def _recipe():
    sys.path.insert(0, str(RECIPE.parent))
    try:
        import train_tiny
    finally:
        sys.path.remove(str(RECIPE.parent))
    return train_tiny


def test_lr_factor_matches_transformers_schedule_without_time_budget():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    train_tiny = _recipe()
    config = train_tiny.parse_config(["--config", str(CONFIG), "--max_steps", "40", "--warmup_steps", "5"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 5, 40, min_lr_rate=config.min_lr_rate)
    for step in range(41):
        assert abs(train_tiny.lr_factor(step, step / 40, config) - reference.lr_lambdas[0](step)) < 1e-9
    timed = train_tiny.parse_config(["--config", str(CONFIG), "--max_steps", "40", "--max_time_s", "10"])
    assert train_tiny.lr_factor(35, 1.0, timed) == timed.min_lr_rate  # the clock ran out: fully decayed
    with pytest.raises(ValueError, match="max_time_s"):
        train_tiny.parse_config(["--config", str(CONFIG), "--max_time_s", "-1"])
    with pytest.raises(ValueError, match="mixed_precision"):
        train_tiny.parse_config(["--config", str(CONFIG), "--mixed_precision", "int8"])


def test_worker_batches_are_valid_and_follow_the_shared_progress():
    train_tiny = _recipe()
    config = train_tiny.parse_config(
        ["--config", str(CONFIG), "--tokens_per_batch", "256", "--num_workers", "2", "--prefetch_batches", "1"]
        + ["--max_time_s", "3600"]  # a time budget: the workers follow the progress the loop publishes
    )
    config.curriculum = [
        {"until": 0.5, "min_length": 64, "max_length": 64},
        {"until": 1.0, "min_length": 128, "max_length": 128},
    ]
    tokenizer = train_tiny.build_tokenizer()
    progress = train_tiny.Progress(config, shared=True)
    batches = train_tiny.batch_loader(config, tokenizer, 0, progress, pin=False)
    seen = [next(batches) for _ in range(4)]
    progress._shared.value = 0.9  # what the training loop publishes; workers read it for the next batches
    later = [next(batches) for _ in range(12)]
    del batches
    for batch in seen + later:
        ids, weights, answer = batch["input_ids"], batch["loss_weights"], batch["answer_mask"]
        assert ids.shape[0] == len(batch["tasks"]) and set(batch["tasks"]) <= set(config.tasks)
        assert weights.shape == answer.shape == (ids.shape[0], ids.shape[1] - 1) and answer.any(-1).all()
        assert torch.equal(weights == 0, ids[:, 1:] == tokenizer.pad_token_id)  # right padding, no loss there
        assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert {b["input_ids"].shape[1] <= 64 + 40 for b in seen} == {True}  # first stage (+ answer tokens)
    assert max(b["input_ids"].shape[1] for b in later[-4:]) > 120  # second stage once progress moved
    first_rows = [b["input_ids"][0].tolist() for b in seen[:2]]
    assert first_rows[0] != first_rows[1]  # the two workers draw distinct samples


def test_worker_stream_without_time_budget_ignores_the_published_progress():
    """Without ``max_time_s`` the curriculum of step ``s`` is ``s / max_steps`` in the workers too: the stream must
    not depend on how far the training loop got when a worker drew a batch (it prefetches ahead)."""
    train_tiny = _recipe()
    config = train_tiny.parse_config(
        ["--config", str(CONFIG), "--tokens_per_batch", "256", "--num_workers", "2", "--prefetch_batches", "1"]
        + ["--max_steps", "100"]
    )
    config.curriculum = [
        {"until": 0.5, "min_length": 64, "max_length": 64},
        {"until": 1.0, "min_length": 128, "max_length": 128},
    ]
    tokenizer = train_tiny.build_tokenizer()
    streams = []
    for published in (0.0, 0.9):
        progress = train_tiny.Progress(config, shared=True)
        progress._shared.value = published
        batches = train_tiny.batch_loader(config, tokenizer, 0, progress, pin=False)
        streams.append([next(batches)["input_ids"] for _ in range(4)])
        del batches
    assert all(torch.equal(a, b) for a, b in zip(*streams))
    assert max(ids.shape[1] for ids in streams[0]) <= 64 + 40  # steps 0-3 of 100: the first stage


def test_time_budget_stops_and_saves(tmp_path):
    out = _run_shrunk_recipe(
        tmp_path,
        256,
        96,
        128,
        "--max_steps",
        "100000",
        "--max_time_s",
        "3",
        "--num_workers",
        "1",
        "--log_every",
        "1000",
    )
    metadata = json.loads((out / "training_metadata.json").read_text())
    assert metadata["stopped_by"] == "max_time_s" and 0 < metadata["steps"] < 100000
    assert 3 <= metadata["wall_time_s"] < 30 and metadata["history"][-1]["step"] == metadata["steps"]
    assert metadata["history"][-1]["progress"] > 0.99 and metadata["history"][-1]["steps_per_s"] > 0
    assert (out / "model.safetensors").is_file()


def test_save_is_atomic_per_file(tmp_path, monkeypatch):
    """A save that fails midway leaves the previous checkpoint whole and no temporary folder behind."""
    train_tiny = _recipe()
    config = train_tiny.parse_config(["--config", str(CONFIG)])
    config.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    tokenizer = train_tiny.build_tokenizer()
    model = train_tiny.build_model(config, tokenizer)
    out = tmp_path / "model"
    train_tiny.save(model, tokenizer, out, {"step": 1})
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert "model.safetensors" in before and json.loads(before["training_metadata.json"]) == {"step": 1}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    monkeypatch.setattr(type(tokenizer), "save_pretrained", fail)  # the model file is already written by then
    with pytest.raises(OSError, match="disk full"):
        train_tiny.save(model, tokenizer, out, {"step": 2})
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_stream_depends_on_the_step_only_not_on_the_workers():
    """The batch of step ``s`` is the same in process and from any number of workers, and a stream started at ``s``
    continues the full stream: what makes a resumed run see the batches of an uninterrupted one."""
    train_tiny = _recipe()
    config = train_tiny.parse_config(["--config", str(CONFIG), "--tokens_per_batch", "256", "--max_steps", "50"])
    tokenizer = train_tiny.build_tokenizer()
    streams = {}
    for workers, start in ((0, 0), (2, 0), (0, 3)):
        config.num_workers, config.prefetch_batches = workers, 1
        progress = train_tiny.Progress(config, shared=workers > 0)
        batches = train_tiny.batch_loader(config, tokenizer, 0, progress, pin=False, start_step=start)
        streams[workers, start] = [next(batches)["input_ids"] for _ in range(6 - start)]
        del batches
    assert all(torch.equal(a, b) for a, b in zip(streams[0, 0], streams[2, 0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(streams[0, 0][3:], streams[0, 3], strict=True))
    assert not torch.equal(streams[0, 0][0][:1, :32], streams[0, 0][1][:1, :32])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    """Checkpoint at step 2 of 4, resume from it: the final weights equal those of one uninterrupted run."""
    whole = _run_shrunk_recipe(tmp_path / "whole", 256, 64, 96, "--max_steps", "4", "--num_threads", "1")
    split = _run_shrunk_recipe(
        tmp_path / "split", 256, 64, 96, "--max_steps", "4", "--num_threads", "1", "--checkpoint_every", "2"
    )
    checkpoints = sorted(p.name for p in (split / "checkpoints").iterdir())
    assert checkpoints == ["step-000000002", "step-000000004"]
    shutil.rmtree(split / "checkpoints" / "step-000000004")  # as if the run had been stopped after step 2
    (split / "model.safetensors").unlink()
    _run_shrunk_recipe(tmp_path / "split", 256, 64, 96, "--max_steps", "4", "--num_threads", "1", "--resume", "auto")
    expected, resumed = _weights(whole), _weights(split)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    history = json.loads((split / "training_metadata.json").read_text())["history"]
    assert [row["step"] for row in history] == [4]  # log_every 25: the final step only, logged once


def test_session_time_checkpoints_and_exits_then_resume_finishes(tmp_path):
    out = _run_shrunk_recipe(tmp_path, 256, 64, 96, "--max_steps", "3", "--session_time_s", "0.001", "--log_every", "1")
    assert not (out / "model.safetensors").exists()  # no final save: the run is not finished
    (checkpoint,) = (out / "checkpoints").iterdir()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert checkpoint.name == "step-000000001" and state["step"] == 1 and state["tokens_seen"] > 0
    assert {"optimizer.json", "optimizer.safetensors", "model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)  # also a model folder
    weights = _weights(checkpoint)
    assert all(torch.equal(weights[k], loaded.state_dict()[k]) for k in weights)
    assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)  # tied, as trained
    assert len(AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)) == loaded.config.vocab_size
    with pytest.raises(subprocess.CalledProcessError) as refused:  # a fresh run would mix with the checkpoint
        _run_shrunk_recipe(tmp_path, 256, 64, 96, "--max_steps", "3", "--log_every", "1")
    assert b"--resume auto" in refused.value.stderr
    _run_shrunk_recipe(tmp_path, 256, 64, 96, "--max_steps", "3", "--resume", "auto", "--log_every", "1")
    metadata = json.loads((out / "training_metadata.json").read_text())
    assert metadata["steps"] == 3 and [row["step"] for row in metadata["history"]] == [1, 2, 3]
    assert metadata["wall_time_s"] >= state["elapsed_s"]


def test_resume_refuses_a_checkpoint_of_other_training_options(tmp_path):
    train_tiny = _recipe()
    config = train_tiny.parse_config(["--config", str(CONFIG), "--output_dir", str(tmp_path)])
    config.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    tokenizer = train_tiny.build_tokenizer()
    model = train_tiny.build_model(config, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"step": 5, "tokens_seen": 0, "elapsed_s": 1.0, "config": dataclasses.asdict(config), "history": []}
    path = train_tiny.save_checkpoint(model, train_tiny.optimizer_state(model, optimizer), tmp_path, state, keep=1)
    assert train_tiny.latest_checkpoint(tmp_path) == path
    config.num_workers, config.learning_rate = 3, 1.0  # a speed option may differ, a training option may not
    with pytest.raises(ValueError, match="learning_rate: checkpoint 0.002, config 1.0"):
        train_tiny.load_checkpoint(path, config, model)
    with pytest.raises(ValueError, match="not a train_tiny checkpoint"):
        train_tiny.load_checkpoint(tmp_path, config, model)


def test_checkpoints_of_the_optimizer_state_by_number_still_resume(tmp_path):
    """Checkpoints written before optimizer states were keyed by parameter name hold ``optimizer.state_dict()``
    (parameters numbered in ``model.parameters()`` order): they load into the same moments."""
    from hf_longmem.continual.state_io import load_tree, save_tree

    train_tiny = _recipe()
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_tree(optimizer.state_dict(), tmp_path, "optimizer")  # what save_checkpoint wrote before
    model.zero_grad(set_to_none=True)  # as in a resumed run: no gradients yet
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_tiny.load_optimizer_state(model, fresh, train_tiny.by_parameter_name(model, load_tree(tmp_path, "optimizer")))
    for want, got in zip(optimizer.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert all(torch.equal(want[k], got[k]) for k in ("exp_avg", "exp_avg_sq"))


class _Oracle(torch.nn.Module):
    """Logits that put all mass on the true next token: every loss the recipe computes from them is 0."""

    def __init__(self, vocab_size: int, seen: dict) -> None:
        super().__init__()
        self.vocab_size, self.seen = vocab_size, seen

    def forward(self, input_ids):
        self.seen["ids"] = input_ids
        logits = torch.full((*input_ids.shape, self.vocab_size), -1e4)
        logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1e4)
        return type("Out", (), {"logits": logits})


def test_copy_gap_puts_the_repeat_at_a_random_offset_per_row():
    train_tiny = _recipe()
    config = train_tiny.parse_config(["--config", str(CONFIG), "--copy_batch_size", "64", "--copy_length", "6"])
    config.copy_gap, config.copy_digit_fraction = 5, 0.5
    tokenizer = train_tiny.build_tokenizer()
    seen: dict = {}
    loss = train_tiny.copy_loss(
        _Oracle(len(tokenizer), seen), config, tokenizer, torch.Generator().manual_seed(0), "cpu"
    )
    assert loss.item() == 0.0  # the targets are the repeat's tokens
    ids, pad = seen["ids"], tokenizer.pad_token_id
    assert ids.shape == (64, 1 + 2 * 6 + 5) and (ids[:, 0] == tokenizer.bos_token_id).all()
    gaps = set()
    digits = set(tokenizer.convert_tokens_to_ids(list("0123456789")))
    for row in ids.tolist():
        body = row[1:]
        end = len(body) - next(i for i, t in enumerate(reversed(body)) if t != pad)
        x, tail = body[:6], body[:end][-6:]
        assert x == tail and pad not in x
        gaps.add(end - 12)
    assert gaps == set(range(6))  # every gap length 0..5 occurs: no fixed offset solves the copy
    assert sum(set(row[1:7]) <= digits for row in ids.tolist()) >= 32  # half the rows are digits only


def test_recall_record_gap_sits_between_key_and_values():
    train_tiny = _recipe()
    config = train_tiny.parse_config(["--config", str(CONFIG), "--recall_loss_weight", "1"])
    config.recall_batch_size, config.recall_pairs, config.recall_value_length = 4, 3, 2
    config.recall_gap, config.recall_record_gap = 2, 1
    tokenizer = train_tiny.build_tokenizer()
    seen: dict = {}
    oracle = _Oracle(len(tokenizer), seen)
    assert train_tiny.recall_loss(oracle, config, tokenizer, torch.Generator().manual_seed(1), "cpu").item() == 0.0
    ids = seen["ids"]
    records = ids[:, 1 : 1 + 3 * 4].view(4, 3, 4)  # key, gap, v1, v2
    queries = ids[:, 1 + 3 * 4 :].view(4, 3, 5)  # key, g1, g2, v1, v2
    for row in range(4):
        assert len(set(records[row, :, 1].tolist())) == 1  # the same record gap token in every record of a row
        table = {int(r[0]): r[2:].tolist() for r in records[row]}
        assert all(table[int(q[0])] == q[3:].tolist() for q in queries[row])


def test_keyword_recall_builds_needle_like_records_with_a_gap_curriculum():
    train_tiny = _recipe()
    config = train_tiny.parse_config(["--config", str(CONFIG), "--recall_loss_weight", "1"])
    config.recall_keys, config.recall_batch_size, config.recall_pairs, config.recall_value_length = "keywords", 8, 4, 3
    config.curriculum = [
        {"until": 0.5, "min_length": 64, "max_length": 64, "recall_record_gap": 0, "recall_gap": 0},
        {"until": 1.0, "min_length": 64, "max_length": 64, "recall_record_gap": 2, "recall_gap": 5},
    ]
    assert train_tiny.recall_gaps(config, 0.2) == (0, 0) and train_tiny.recall_gaps(config, 0.7) == (2, 5)
    tokenizer = train_tiny.build_tokenizer()
    vocab = tokenizer.get_vocab()
    keys = {vocab[" " + w] for w in train_tiny.KEY_WORDS}
    digits = {vocab[d] for d in "0123456789"} | {vocab[" " + d] for d in "0123456789"}
    for progress, widths in ((0.2, {1 + 2 * 4 * 4}), (0.7, set(range(1 + 2 * 4 * 4, 1 + 2 * 4 * 4 + 4 * 7 + 1)))):
        seen: dict = {}
        oracle = _Oracle(len(tokenizer), seen)
        loss = train_tiny.recall_loss(oracle, config, tokenizer, torch.Generator().manual_seed(2), "cpu", progress)
        assert loss.item() == 0.0
        for row in seen["ids"].tolist():
            row = [t for t in row if t != tokenizer.pad_token_id]
            assert len(row) in widths
            found = [i for i, t in enumerate(row) if t in keys]
            assert len(found) == 8 and len({row[i] for i in found}) == 4  # each key: one record, one query
            for i in found:  # after each key: gap words (no key, no digit), then the value's 3 digits
                j = i + 1
                while row[j] not in digits:
                    assert row[j] not in keys
                    j += 1
                assert all(t in digits for t in row[j : j + 3])
