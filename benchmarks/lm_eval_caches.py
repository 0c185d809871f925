"""lm-eval through compressed caches on the embedded model: a local pass-key task in lm-eval's multiple-choice
(log-likelihood) and generation formats, scored with lm-eval's own ``hf`` model and with ``hf_longmem`` per cache.

    python benchmarks/lm_eval_caches.py --out benchmarks/results/lm_eval_caches.json

lm-eval's ``hf`` model scores the multiple-choice task with one full forward, so no cache can change it; the
``hf_longmem`` model prefills the context into the cache under test and scores the choices from it.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

import hf_longmem.evals.lm_eval_model  # noqa: F401 (registers "hf_longmem")
from hf_longmem.continual.evaluation import write_json_atomic
from hf_longmem.default_model import DEFAULT_MODEL_PATH, load_default_model
from hf_longmem.evals.tasks import passkey

CACHES = {
    "full": "cache=full",
    "snapkv": "cache=snapkv,budget={budget},cache_window_size=8",
    "streaming": "cache=streaming,budget={budget},cache_sink_size=4",
}


def write_tasks(folder: Path, num: int, length: int, seed: int) -> None:
    _, tokenizer = load_default_model()
    rng = random.Random(seed)
    rows = []
    for sample in passkey(tokenizer, length, num, seed=seed, num_digits=5):
        answer = sample.turns[0].answers[0]
        wrong: list[str] = []
        while len(wrong) < 3:
            value = str(rng.randrange(10000, 100000))
            if value != answer and value not in wrong:
                wrong.append(value)
        choices = [answer, *wrong]
        rng.shuffle(choices)
        rows.append(
            {"text": sample.context + sample.turns[0].query, "choices": choices, "label": choices.index(answer)}
        )
        rows[-1]["answer"] = answer
    data = folder / "passkey.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: passkey_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{text}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "gen.yaml").write_text(
        "task: passkey_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{text}}'\n"
        "doc_to_target: ' {{answer}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    higher_is_better: true\n"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=24)
    parser.add_argument("--length", type=int, default=384)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    base = f"pretrained={DEFAULT_MODEL_PATH},dtype=float32"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_tasks(Path(folder), args.num, args.length, args.seed)
        manager = TaskManager(include_path=folder)
        runs = [("lm-eval hf (one full forward)", "hf", base)]
        runs += [(f"hf_longmem {n}", "hf_longmem", f"{base},{o.format(budget=args.budget)}") for n, o in CACHES.items()]
        for label, model, model_args in runs:
            start = time.time()
            out = lm_eval.simple_evaluate(
                model=model,
                model_args=model_args,
                tasks=["passkey_mc", "passkey_gen"],
                task_manager=manager,
                device="cpu",
                batch_size=1,
            )
            rows.append(
                {
                    "run": label,
                    "model_args": model_args,
                    "mc_acc": out["results"]["passkey_mc"]["acc,none"],
                    "gen_exact_match": out["results"]["passkey_gen"]["exact_match,none"],
                    "seconds": round(time.time() - start, 1),
                }
            )
            print(rows[-1], flush=True)
    summary = {"args": vars(args), "rows": rows}
    print("| run | multiple choice acc (log-likelihood) | generation exact match |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['mc_acc']:.3f} | {r['gen_exact_match']:.3f} |")
    if args.out:
        write_json_atomic(args.out, summary)
    return summary


if __name__ == "__main__":
    main()
