"""KL of the choice distribution (``hf_longmem.evals.score_choices``) against the full cache, by cache budget.

For each pass-key sample of the embedded model the choices are the pass key and ``--num-distractors`` random numbers
of the same length; the context (filler + pass key) is prefilled and compressed, then the question and each choice
are scored from a copy of the cache. ``KL(p_full || p_cache)`` over the choices is averaged over samples (mean ±
standard error), with the share of samples whose most likely choice is the pass key.

    python benchmarks/choice_kl.py --length 512 --num-samples 20 --budgets 512,256,128,64,32,16 \\
        --out benchmarks/results/choice_kl.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--num-samples", type=int, default=20)
    parser.add_argument("--num-distractors", type=int, default=3)
    parser.add_argument("--budgets", default="512,256,128,64,32,16")
    parser.add_argument("--caches", default="streaming,h2o,snapkv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from hf_longmem import load_default_model
    from hf_longmem.evals import choice_kl, score_choices
    from hf_longmem.evals.tasks import passkey

    model, tok = load_default_model()
    samples = passkey(tok, args.length, args.num_samples, seed=args.seed)
    cases = []
    for sample in samples:
        key = sample.turns[0].answers[0]
        rng = random.Random(sample.id)
        low, high = 10 ** (len(key) - 1), 10 ** len(key)
        choices = [" " + key] + [" " + str(rng.randrange(low, high)) for _ in range(args.num_distractors)]
        full = score_choices(model, tok, sample.context, choices, query=sample.turns[0].query)
        cases.append((sample, choices, full))
    rows = [{"cache": "full", "budget": None, "kl_mean": 0.0, "kl_se": 0.0, "accuracy": _acc([c[2] for c in cases])}]
    start = time.perf_counter()
    for name in args.caches.split(","):
        for budget in (int(b) for b in args.budgets.split(",")):
            kls, scores = [], []
            try:
                from hf_longmem import make_cache

                make_cache(name, model, budget=budget)
            except ValueError as error:  # e.g. SnapKV needs a budget larger than its observation window
                print(f"{name:10s} budget={budget:5d}  refused: {error}")
                rows.append({"cache": name, "budget": budget, "refused": str(error)})
                continue
            for sample, choices, full in cases:
                result = score_choices(
                    model,
                    tok,
                    sample.context,
                    choices,
                    name,
                    cache_options={"budget": budget},
                    query=sample.turns[0].query,
                )
                kls.append(choice_kl(full, result))
                scores.append(result)
            mean = sum(kls) / len(kls)
            se = math.sqrt(sum((k - mean) ** 2 for k in kls) / (len(kls) - 1) / len(kls)) if len(kls) > 1 else 0.0
            rows.append({"cache": name, "budget": budget, "kl_mean": mean, "kl_se": se, "accuracy": _acc(scores)})
            print(
                f"{name:10s} budget={budget:5d}  KL {mean:7.3f} ± {se:.3f}  pass-key chosen {rows[-1]['accuracy']:.2f}"
            )
    result = {
        "length": args.length,
        "num_samples": args.num_samples,
        "num_distractors": args.num_distractors,
        "seed": args.seed,
        "rows": rows,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _acc(scores) -> float:
    return sum(s.best == 0 for s in scores) / len(scores)


if __name__ == "__main__":
    raise SystemExit(main())
