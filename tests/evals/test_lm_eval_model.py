"""The lm-eval adapter: a local task end to end through compressed caches (skipped without lm-eval)."""

import json
import random

import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from hf_longmem.default_model import DEFAULT_MODEL_PATH, load_default_model  # noqa: E402
from hf_longmem.evals.lm_eval_model import LongMemLM  # noqa: E402
from hf_longmem.evals.tasks import passkey  # noqa: E402

MODEL_ARGS = f"pretrained={DEFAULT_MODEL_PATH},device=cpu,dtype=float32,batch_size=1"


def _docs(num: int = 4):
    _, tokenizer = load_default_model()
    rng = random.Random(0)
    docs = []
    for sample in passkey(tokenizer, 160, num, seed=1, num_digits=5):
        answer = sample.turns[0].answers[0]
        wrong = [str(rng.randrange(10000, 100000)) for _ in range(3)]
        docs.append(
            {
                "text": sample.context + sample.turns[0].query,
                "choices": [answer] + [w for w in wrong if w != answer][:2],
                "label": 0,
                "answer": answer,
            }
        )
    return docs


def _write_tasks(tmp_path):
    data = tmp_path / "passkey.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "mc.yaml").write_text(
        "task: hfl_passkey_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{text}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    (tmp_path / "gen.yaml").write_text(
        "task: hfl_passkey_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{text}}'\n"
        "doc_to_target: ' {{answer}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return TaskManager(include_path=str(tmp_path))


def _requests(docs):
    return [
        Instance("loglikelihood", doc={}, arguments=(d["text"], " " + c), idx=i)
        for d in docs
        for i, c in enumerate(d["choices"])
    ]


def test_full_cache_loglikelihood_equals_lm_eval_one_forward_and_a_small_budget_changes_it():
    docs = _docs(2)
    reference = [
        ll
        for ll, _ in HFLM(pretrained=str(DEFAULT_MODEL_PATH), device="cpu", dtype="float32").loglikelihood(
            _requests(docs)
        )
    ]
    full = LongMemLM(pretrained=str(DEFAULT_MODEL_PATH), device="cpu", dtype="float32", cache="full")
    ours = [ll for ll, _ in full.loglikelihood(_requests(docs))]
    assert ours == pytest.approx(reference, abs=1e-4)  # float32 logits over ~160 tokens
    small = LongMemLM(
        pretrained=str(DEFAULT_MODEL_PATH),
        device="cpu",
        dtype="float32",
        cache="streaming",
        budget=24,
        cache_sink_size=4,
    )
    compressed = [ll for ll, _ in small.loglikelihood(_requests(docs))]
    assert max(abs(a - b) for a, b in zip(compressed, reference)) > 0.1


def test_local_task_end_to_end_through_the_compressed_cache(tmp_path, monkeypatch):
    caches = []
    original = LongMemLM.new_cache

    def recording(self):
        cache = original(self)
        caches.append(cache)
        return cache

    monkeypatch.setattr(LongMemLM, "new_cache", recording)
    out = simple_evaluate(
        model="hf_longmem",
        model_args=MODEL_ARGS + ",cache=snapkv,budget=32,cache_window_size=8",
        tasks=["hfl_passkey_mc", "hfl_passkey_gen"],
        task_manager=_write_tasks(tmp_path),
        log_samples=False,
    )
    assert set(out["results"]) == {"hfl_passkey_mc", "hfl_passkey_gen"}
    assert 0.0 <= out["results"]["hfl_passkey_mc"]["acc,none"] <= 1.0
    assert 0.0 <= out["results"]["hfl_passkey_gen"]["exact_match,none"] <= 1.0
    used = [c for c in caches[1:] if c.get_seq_length() > 0]  # caches[0]: the validation cache built at init
    assert len(used) == 4 + 4  # one per multiple-choice context (choices share it) + one per generation
    for cache in used:
        layer = cache.layers[0]
        assert layer.keys.shape[-2] <= 32 + 8 < cache.get_seq_length()  # compressed: stored < seen
    with pytest.raises(ValueError, match="unknown cache"):
        LongMemLM(pretrained=str(DEFAULT_MODEL_PATH), device="cpu", cache="nope")


def test_the_cli_entry_point_registers_the_model():
    from lm_eval.api.registry import get_model

    from hf_longmem.evals import lm_eval_cli

    assert get_model("hf_longmem") is LongMemLM and callable(lm_eval_cli.main)
