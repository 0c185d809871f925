"""Tests of hf_longmem.hub: staging, model card, remote code, LocalFolderApi, offline and bad-input behaviour.

Everything runs on tiny random models built from configs; nothing is downloaded. Two tests start a fresh Python
process: one loads a remote-code checkpoint where neither ``tests`` nor the helper module is importable, one runs
``publish`` with the real ``HF_HUB_OFFLINE=1`` environment variable (huggingface_hub reads it at import time).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import EvalResult, HfApi, ModelCard
from huggingface_hub.errors import OfflineModeIsEnabled
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_longmem.hub import (
    LIBRARY_TAG,
    LocalFolderApi,
    eval_results_from_harness,
    eval_table_markdown,
    list_card_templates,
    load_harness_results,
    publish,
    render_model_card,
)
from tests.helpers.fresh_process import assert_float32_close, same_threads_env

HELPERS = Path(__file__).parent / "helpers"
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _row(**overrides):
    row = {
        "model": "tiny",
        "task": "passkey",
        "cache": "snapkv",
        "cache_kwargs": {"budget": 256},
        "context_length": 1024,
        "num_samples": 50,
        "accuracy": 0.96,
        "kv_bytes": 123456,
        "prefill_s": 0.1,
        "decode_tokens_per_s": 500.0,
        "peak_memory_bytes": 0,
        "top1_agreement": 0.99,
        "kl": 0.01,
    }
    row.update(overrides)
    return row


HARNESS = {
    "meta": {"device": "cpu", "dtype": "float32", "seed": 0},
    "rows": [
        _row(),
        _row(cache="full", cache_kwargs={}, accuracy=1.0, kv_bytes=524288, top1_agreement=None, kl=None),
        _row(task="variable_tracking", cache="think", cache_kwargs={"ratio": 0.5}, context_length=2048, accuracy=0.5),
    ],
}


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def _remote_module():
    """Import tests/helpers/hub_remote_model.py under its own file name (save_pretrained copies it by that name)."""
    name = "hub_remote_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HELPERS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _tiny_remote(seed: int = 0):
    mod = _remote_module()
    torch.manual_seed(seed)
    return mod.HubTestForCausalLM(mod.HubTestConfig(logit_scale=3.0, **TINY)).eval()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the passkey is a b c d question answer".split()
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[3, 14, 15, 9, 2, 6, 5, 35, 8, 9]])


def _run_fresh_python(code: str, cwd: Path, **env_overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env = same_threads_env(env)
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "-P", "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


class RecordingApi(LocalFolderApi):
    """LocalFolderApi that records calls, optionally failing at one method."""

    def __init__(self, root, fail_at: str | None = None):
        super().__init__(root)
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail_at = fail_at

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", (repo_id,), kwargs))
        if self.fail_at == "create_repo":
            raise RuntimeError("create_repo failed")
        return super().create_repo(repo_id, **kwargs)

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        if self.fail_at == "upload_folder":
            raise RuntimeError("upload_folder failed")
        return super().upload_folder(**kwargs)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Point tempfile at an empty folder so tests can check that publish leaves no temporary files behind."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    return tmpdir


# ----------------------------------------------------------------------------------------------------------------------
# publish -> from_pretrained / ModelCard.load
# ----------------------------------------------------------------------------------------------------------------------


def test_publish_roundtrip_identical_logits(tmp_path, private_tmp):
    model = _tiny_llama()
    api = RecordingApi(tmp_path / "hub")
    out = publish(model, "me/tiny-llama", api=api, private=True)

    repo = tmp_path / "hub" / "me" / "tiny-llama"
    assert out == str(repo)
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(repo))
    reloaded = AutoModelForCausalLM.from_pretrained(repo).eval()
    assert type(reloaded) is LlamaForCausalLM
    assert torch.equal(_logits(reloaded, IDS), _logits(model, IDS))

    (name, args, kwargs), (name2, _, up_kwargs) = api.calls
    assert (name, args, kwargs) == (
        "create_repo",
        ("me/tiny-llama",),
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    assert name2 == "upload_folder" and up_kwargs["repo_id"] == "me/tiny-llama"
    assert up_kwargs["commit_message"] == "Upload LlamaForCausalLM with hf_longmem"
    assert os.listdir(private_tmp) == []  # staging folder removed


def test_card_metadata_model_index_and_table(tmp_path):
    publish(
        _tiny_llama(),
        "me/tiny-card",
        eval_results=HARNESS,
        base_model="meta-llama/Llama-3.2-1B",
        tags=["kv-cache", LIBRARY_TAG],
        license="apache-2.0",
        language="en",
        api=LocalFolderApi(tmp_path),
    )
    card = ModelCard.load(tmp_path / "me" / "tiny-card" / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.base_model == "meta-llama/Llama-3.2-1B"
    assert data.tags == [LIBRARY_TAG, "kv-cache"]  # always first, never duplicated
    assert data.license == "apache-2.0" and data.language == ["en"]
    assert data.model_name == "tiny-card"

    # model-index: accuracy for every row, top1/kl where not null -> 3 + 1 + 3 results.
    results = data.eval_results
    assert len(results) == 7
    by_name = {r.metric_name: r for r in results}
    acc = by_name["accuracy [snapkv (budget=256)]"]
    assert (acc.task_type, acc.task_name, acc.dataset_type) == ("text-generation", "passkey", "passkey")
    assert acc.metric_type == "accuracy" and acc.metric_value == 0.96
    assert acc.metric_config == "snapkv" and acc.metric_args == {"budget": 256}
    assert acc.dataset_args == {"context_length": 1024, "num_samples": 50}
    assert by_name["accuracy [full]"].metric_value == 1.0 and by_name["accuracy [full]"].metric_args is None
    assert by_name["kl [snapkv (budget=256)]"].metric_value == 0.01
    assert "top1_agreement [full]" not in by_name
    assert by_name["accuracy [think (ratio=0.5)]"].dataset_config == "len2048"

    text = card.text
    assert "| Task | Cache | Context length | Samples | Accuracy | KV bytes | Decode (tok/s) |" in text
    assert "| passkey | snapkv (budget=256) | 1,024 | 50 | 0.960 | 120.6 KiB | 500.0 | 0.990 | 0.01 |" in text
    assert "| passkey | full | 1,024 | 50 | 1.000 | 512.0 KiB | 500.0 | – | – |" in text
    assert "| variable_tracking | think (ratio=0.5) | 2,048 |" in text
    assert "`device`: cpu" in text
    # Usage snippet: no trust_remote_code for a built-in architecture; best compressed cache as the example.
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-card")' in text
    assert "trust_remote_code" not in text
    assert 'cache = hf_longmem.make_cache("snapkv", model, budget=256)' in text
    assert "model.generate(**inputs, max_new_tokens=64, cache=cache)" in text
    assert 'AutoTokenizer.from_pretrained("meta-llama/Llama-3.2-1B")' in text  # no tokenizer shipped -> base model


def test_tokenizer_is_staged_and_used_in_snippet(tmp_path):
    tok = _tiny_tokenizer()
    publish(_tiny_llama(), "me/with-tok", tokenizer=tok, api=LocalFolderApi(tmp_path))
    repo = tmp_path / "me" / "with-tok"
    assert (repo / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(repo)("the passkey is").input_ids == tok("the passkey is").input_ids
    card = ModelCard.load(repo / "README.md")
    assert 'AutoTokenizer.from_pretrained("me/with-tok")' in card.text
    assert "No evaluation results" in card.text and card.data.eval_results is None


@pytest.mark.parametrize("form", ["dict", "rows", "json", "jsonl", "harness"])
def test_eval_results_input_forms(tmp_path, form):
    if form == "dict":
        source = HARNESS
    elif form == "rows":
        source = HARNESS["rows"]
    elif form == "json":
        source = tmp_path / "results.json"
        source.write_text(json.dumps(HARNESS))
        source = str(source)
    elif form == "jsonl":
        source = tmp_path / "results.jsonl"
        source.write_text("\n".join(json.dumps(r) for r in HARNESS["rows"]) + "\n")
    else:
        source = load_harness_results(HARNESS)
    results = eval_results_from_harness(source)
    assert [r.metric_value for r in results] == [0.96, 0.99, 0.01, 1.0, 0.5, 0.99, 0.01]
    assert all(isinstance(r, EvalResult) for r in results)


def test_eval_helpers_filters_and_columns():
    mixed = {"rows": [_row(model="a"), _row(model="b", accuracy=0.5, top1_agreement=None, kl=None)]}
    assert [r.metric_value for r in eval_results_from_harness(mixed, model="b")] == [0.5]
    assert [r.metric_type for r in eval_results_from_harness(mixed, metrics=["kv_bytes"])] == ["kv_bytes", "kv_bytes"]
    table = eval_table_markdown(mixed)
    assert table.splitlines()[0].startswith("| Model | Task |")  # several models -> model column
    plain = eval_table_markdown([_row(top1_agreement=None, kl=None, decode_tokens_per_s=None, kv_bytes=None)])
    assert "Top-1" not in plain and "KL" not in plain and plain.splitlines()[2].endswith("| – | – |")
    assert eval_table_markdown([]) == ""
    with pytest.raises(ValueError, match="model='c'"):
        eval_results_from_harness(mixed, model="c")
    with pytest.raises(ValueError, match="metrics"):
        eval_results_from_harness(mixed, metrics=["task"])


# ----------------------------------------------------------------------------------------------------------------------
# Remote code
# ----------------------------------------------------------------------------------------------------------------------


def test_remote_code_files_and_auto_map_are_staged(tmp_path):
    model = _tiny_remote()
    publish(model, "me/tiny-remote", eval_results=HARNESS["rows"][:1], api=LocalFolderApi(tmp_path / "hub"))
    repo = tmp_path / "hub" / "me" / "tiny-remote"
    assert (repo / "hub_remote_model.py").read_text() == (HELPERS / "hub_remote_model.py").read_text()
    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "hub_remote_model.HubTestConfig",
        "AutoModelForCausalLM": "hub_remote_model.HubTestForCausalLM",
    }
    card = ModelCard.load(repo / "README.md")
    assert 'from_pretrained("me/tiny-remote", trust_remote_code=True)' in card.text
    assert "`hub_remote_model.py`" in card.text

    # Fresh process, tests/ not importable: the shipped file must define the model.
    proc = _run_fresh_python(
        f"""
        import importlib.util, torch
        from transformers import AutoModelForCausalLM
        assert importlib.util.find_spec("hub_remote_model") is None
        m = AutoModelForCausalLM.from_pretrained({str(repo)!r}, trust_remote_code=True).eval()
        assert type(m).__name__ == "HubTestForCausalLM", type(m)
        with torch.no_grad():
            torch.save(m(input_ids=torch.tensor({IDS.tolist()})).logits, {str(tmp_path / "got.pt")!r})
        print("REMOTE_OK")
        """,
        cwd=tmp_path,
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HUB_OFFLINE="1",
    )
    assert proc.returncode == 0 and "REMOTE_OK" in proc.stdout, proc.stderr[-3000:]
    # Same weights; the child may sum in another order (tests/helpers/fresh_process.py).
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert_float32_close(
        torch.load(tmp_path / "got.pt"),
        _logits(model, IDS),
        sequential_ops=2 * len(linears),
        width=max(m.in_features for m in linears),
    )


def test_auto_map_without_code_is_refused_unless_shipped(tmp_path, private_tmp):
    model = _tiny_llama()
    model.config.auto_map = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    with pytest.raises(ValueError, match="modeling_custom.py"):
        publish(model, "me/broken", api=LocalFolderApi(tmp_path / "hub"))
    assert not (tmp_path / "hub").exists() and os.listdir(private_tmp) == []

    code = tmp_path / "modeling_custom.py"
    code.write_text("from .helper_custom import X\n")
    with pytest.raises(ValueError, match="helper_custom.py"):  # relative imports are followed
        publish(model, "me/broken", api=LocalFolderApi(tmp_path / "hub"), extra_files=[code])
    helper = tmp_path / "helper_custom.py"
    helper.write_text("X = 1\n")
    publish(
        model,
        "me/fixed",
        api=LocalFolderApi(tmp_path / "hub"),
        extra_files={"modeling_custom.py": code, "helper_custom.py": helper},
    )
    assert (tmp_path / "hub" / "me" / "fixed" / "helper_custom.py").read_text() == "X = 1\n"


def test_extra_files(tmp_path):
    notes = tmp_path / "NOTES.txt"
    notes.write_text("hello")
    publish(_tiny_llama(), "me/extras", api=LocalFolderApi(tmp_path / "hub"), extra_files={"docs/notes.txt": notes})
    assert (tmp_path / "hub" / "me" / "extras" / "docs" / "notes.txt").read_text() == "hello"
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    with pytest.raises(ValueError, match="would overwrite"):
        publish(_tiny_llama(), "me/extras2", api=LocalFolderApi(tmp_path / "hub"), extra_files=[cfg])
    with pytest.raises(ValueError, match="README.md"):
        publish(_tiny_llama(), "me/extras2", api=LocalFolderApi(tmp_path / "hub"), extra_files={"README.md": notes})
    with pytest.raises(ValueError, match=r"'\.\.'"):
        publish(_tiny_llama(), "me/extras2", api=LocalFolderApi(tmp_path / "hub"), extra_files={"../x.txt": notes})
    with pytest.raises(ValueError, match="is not a file"):
        publish(_tiny_llama(), "me/extras2", api=LocalFolderApi(tmp_path / "hub"), extra_files=[tmp_path / "nope.py"])
    assert not (tmp_path / "hub" / "me" / "extras2").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Offline, failures and dry runs leave no partial state
# ----------------------------------------------------------------------------------------------------------------------


def test_offline_env_fails_cleanly_in_fresh_process(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = _run_fresh_python(
        f"""
        import torch
        from huggingface_hub.errors import OfflineModeIsEnabled
        from transformers import LlamaConfig, LlamaForCausalLM
        from hf_longmem.hub import publish
        model = LlamaForCausalLM(LlamaConfig(**{TINY!r}))
        try:
            publish(model, "me/offline", staging_dir={str(tmp_path / "stage")!r})
        except OfflineModeIsEnabled as err:
            print("OFFLINE_OK", err)
        """,
        cwd=tmp_path,
        HF_HUB_OFFLINE="1",
        TMPDIR=str(scratch),
    )
    assert proc.returncode == 0 and "OFFLINE_OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert os.listdir(scratch) == [] and not (tmp_path / "stage").exists()


def test_offline_default_api_raises_before_staging(tmp_path, private_tmp, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = _tiny_llama()
    saved = []
    monkeypatch.setattr(model, "save_pretrained", lambda *a, **k: saved.append(a))
    with pytest.raises(OfflineModeIsEnabled, match="LocalFolderApi"):
        publish(model, "me/offline", staging_dir=tmp_path / "stage")
    with pytest.raises(OfflineModeIsEnabled):
        publish(model, "me/offline", api=HfApi())
    assert saved == [] and os.listdir(private_tmp) == [] and not (tmp_path / "stage").exists()


@pytest.mark.parametrize("fail_at", ["create_repo", "upload_folder"])
def test_api_failure_leaves_no_state(tmp_path, private_tmp, fail_at):
    api = RecordingApi(tmp_path / "hub", fail_at=fail_at)
    with pytest.raises(RuntimeError, match=fail_at):
        publish(_tiny_llama(), "me/fails", api=api, staging_dir=tmp_path / "a" / "b" / "stage")
    assert os.listdir(private_tmp) == []
    assert not (tmp_path / "a").exists()  # staging parents created by publish are removed again
    if fail_at == "create_repo":
        assert not (tmp_path / "hub").exists()


def test_dry_run_and_staging_dir(tmp_path):
    class NoApi:
        def create_repo(self, *a, **k):
            raise AssertionError("dry_run must not call the api")

        upload_folder = create_repo

    stage = tmp_path / "stage"
    out = publish(_tiny_llama(), "me/dry", dry_run=True, staging_dir=stage, api=NoApi(), eval_results=HARNESS)
    assert out == str(stage)
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(stage))
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]  # no temporary sibling left

    with pytest.raises(ValueError, match="staging_dir"):
        publish(_tiny_llama(), "me/dry", dry_run=True, staging_dir=stage)  # not empty
    with pytest.raises(ValueError, match="staging_dir"):
        publish(_tiny_llama(), "me/dry", dry_run=True)

    kept = tmp_path / "kept"
    out = publish(_tiny_llama(), "me/kept", api=LocalFolderApi(tmp_path / "hub"), staging_dir=kept)
    assert out == str(tmp_path / "hub" / "me" / "kept")
    assert sorted(os.listdir(kept)) == sorted(os.listdir(out))


def test_upload_kwargs_forwarded(tmp_path):
    api = RecordingApi(tmp_path / "hub")
    with pytest.raises(ValueError, match="revision"):  # LocalFolderApi has no branches
        publish(_tiny_llama(), "me/rev", api=api, revision="dev", commit_message="custom", commit_description="long")
    _, _, kwargs = api.calls[-1]
    assert (
        kwargs["revision"] == "dev" and kwargs["commit_message"] == "custom" and kwargs["commit_description"] == "long"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eval_results", "match"),
    [
        ({"meta": {}}, "'rows'"),
        ({"rows": {"task": "passkey"}}, "list of dicts"),
        (
            {"rows": [_row(), {k: v for k, v in _row().items() if k != "accuracy"}]},
            "row 1 is missing the required key 'accuracy'",
        ),
        ([{k: v for k, v in _row().items() if k != "task"}], "'task'"),
        ([_row(accuracy="high")], "'accuracy'"),
        ([_row(accuracy=96.0)], r"\[0, 1\]"),
        ([_row(context_length=1024.5)], "'context_length'"),
        ([_row(kv_bytes="1MB")], "'kv_bytes'"),
        ([_row(cache_kwargs=[256])], "'cache_kwargs'"),
        ([42], "row 0 must be a dict"),
        ({"meta": [], "rows": []}, "'meta'"),
    ],
)
def test_malformed_eval_results(tmp_path, private_tmp, eval_results, match):
    with pytest.raises(ValueError, match=match):
        publish(_tiny_llama(), "me/bad-eval", eval_results=eval_results, api=LocalFolderApi(tmp_path / "hub"))
    assert not (tmp_path / "hub").exists() and os.listdir(private_tmp) == []


def test_malformed_eval_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_harness_results(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_harness_results(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"repo_id": "me/bad repo"}, "repo_id"),
        ({"repo_id": "a/b/c"}, "repo_id"),
        ({"repo_id": ""}, "repo_id"),
        ({"model": object()}, "model must have a save_pretrained"),
        ({"tokenizer": "gpt2"}, "tokenizer"),
        ({"base_model": "not a repo"}, "base_model"),
        ({"tags": ["ok", 3]}, "tags"),
        ({"license": ""}, "license"),
        ({"template": "no-such-template"}, "template"),
        ({"metadata": {"tags": ["x"]}}, "metadata"),
        ({"example_cache": ("snapkv", {"not valid": 1})}, "example_cache"),
        ({"save_kwargs": {"push_to_hub": True}}, "push_to_hub"),
        ({"token": "hf_x"}, "token"),
        ({"api": object()}, "create_repo"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, private_tmp, kwargs, match):
    args = {"model": _tiny_llama(), "repo_id": "me/ok", "api": LocalFolderApi(tmp_path / "hub"), **kwargs}
    model, repo_id = args.pop("model"), args.pop("repo_id")
    with pytest.raises(ValueError, match=match):
        publish(model, repo_id, **args)
    assert not (tmp_path / "hub").exists() and os.listdir(private_tmp) == []


# ----------------------------------------------------------------------------------------------------------------------
# render_model_card on its own
# ----------------------------------------------------------------------------------------------------------------------


def test_render_model_card_standalone_and_custom_template(tmp_path):
    assert "default" in list_card_templates()
    card = render_model_card(
        "hf_longmem/assets/tiny",
        config={"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2},
        eval_results=HARNESS,
        example_cache=("think", {"ratio": 0.5}),
        description="The embedded default model.",
        metadata={"datasets": ["synthetic"]},
    )
    assert card.data.model_name == "tiny" and card.data.datasets == ["synthetic"]
    assert card.text.lstrip().startswith("# tiny\n\nThe embedded default model.")
    assert 'hf_longmem.make_cache("think", model, ratio=0.5)' in card.text
    assert "- **Model type:** `llama`" in card.text
    card.save(tmp_path / "README.md")
    assert ModelCard.load(tmp_path / "README.md").data.to_dict() == card.data.to_dict()

    template = tmp_path / "mini.md"
    template.write_text("---\n{{ card_data }}\n---\n\n# {{ model_name }} by {{ author }}\n\n{{ eval_table }}\n")
    card = render_model_card("org/m", template=template, eval_results=HARNESS["rows"][:1], author="us")
    assert "# m by us" in card.text and "| passkey | snapkv (budget=256) |" in card.text
    assert card.data.tags == [LIBRARY_TAG]

    # Ready-made EvalResult entries go into the metadata only.
    ready = [
        EvalResult(task_type="text-generation", dataset_type="x", dataset_name="X", metric_type="acc", metric_value=1)
    ]
    assert render_model_card("org/m", eval_results=ready).data.eval_results[0].metric_value == 1


# ----------------------------------------------------------------------------------------------------------------------
# LocalFolderApi
# ----------------------------------------------------------------------------------------------------------------------


def test_local_folder_api_semantics(tmp_path):
    api = LocalFolderApi(tmp_path / "hub")
    assert api.create_repo("org/repo") == str(tmp_path / "hub" / "org" / "repo")
    with pytest.raises(FileExistsError):
        api.create_repo("org/repo")
    api.create_repo("org/repo", exist_ok=True)
    with pytest.raises(ValueError, match="repo_id"):
        api.create_repo("org/../x")
    with pytest.raises(FileNotFoundError, match="create_repo"):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id="org/missing")
    assert api.repo_path("org/d", "dataset") == tmp_path / "hub" / "datasets" / "org" / "d"

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"A1")
    (src / "sub" / "b.txt").write_text("B1")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    (src / "skip.log").write_text("log")
    repo = Path(api.upload_folder(repo_id="org/repo", folder_path=src, ignore_patterns="*.log"))
    files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    assert files == ["a.bin", "sub/b.txt"]  # .git and ignored files not uploaded

    # Second upload: replaces a.bin, adds c.bin, deletes stale *.txt not re-uploaded; old hard links untouched.
    old_inode_copy = (repo / "a.bin").read_bytes()
    src2 = tmp_path / "src2"
    src2.mkdir()
    (src2 / "a.bin").write_bytes(b"A2")
    (src2 / "c.bin").write_bytes(b"C")
    api.upload_folder(repo_id="org/repo", folder_path=src2, delete_patterns="**/*.txt", commit_message="second")
    assert (repo / "a.bin").read_bytes() == b"A2" and (repo / "c.bin").read_bytes() == b"C"
    assert not (repo / "sub" / "b.txt").exists()
    assert old_inode_copy == b"A1" and (src / "a.bin").read_bytes() == b"A1"  # source never written through

    api.upload_folder(repo_id="org/repo", folder_path=src2, path_in_repo="nested/dir", allow_patterns="c.*")
    assert (repo / "nested" / "dir" / "c.bin").read_bytes() == b"C" and not (repo / "nested" / "dir" / "a.bin").exists()

    api.upload_file(path_or_fileobj=b"readme", path_in_repo="README.md", repo_id="org/repo")
    api.upload_file(path_or_fileobj=io.BytesIO(b"io"), path_in_repo="x/y.txt", repo_id="org/repo")
    api.upload_file(path_or_fileobj=src / "a.bin", path_in_repo="copy.bin", repo_id="org/repo")
    assert (repo / "README.md").read_text() == "readme" and (repo / "x" / "y.txt").read_text() == "io"
    assert (repo / "copy.bin").read_bytes() == b"A1"
    with pytest.raises(ValueError, match="path_in_repo"):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="../escape", repo_id="org/repo")
    with pytest.raises(ValueError, match="create_pr"):
        api.upload_folder(repo_id="org/repo", folder_path=src2, create_pr=True)
    with pytest.raises(ValueError, match="folder_path"):
        api.upload_folder(repo_id="org/repo", folder_path=src / "a.bin")
    # No temporary files or folders left next to the repos.
    leftovers = [p.name for p in (tmp_path / "hub").rglob(".*")]
    assert leftovers == []


def test_local_folder_api_failed_upload_keeps_old_revision(tmp_path, monkeypatch):
    api = LocalFolderApi(tmp_path / "hub")
    api.create_repo("org/repo")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("v1")
    (src / "b.txt").write_text("v1")
    repo = Path(api.upload_folder(repo_id="org/repo", folder_path=src))
    (src / "a.txt").write_text("v2")
    (src / "b.txt").write_text("v2")

    import shutil

    real_copy2 = shutil.copy2
    calls = []

    def flaky_copy2(s, d, *a, **k):
        calls.append(d)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_copy2(s, d, *a, **k)

    monkeypatch.setattr(shutil, "copy2", flaky_copy2)
    with pytest.raises(OSError, match="disk full"):
        api.upload_folder(repo_id="org/repo", folder_path=src)
    assert (repo / "a.txt").read_text() == "v1" and (repo / "b.txt").read_text() == "v1"
    assert [p.name for p in (tmp_path / "hub").rglob(".*")] == []
