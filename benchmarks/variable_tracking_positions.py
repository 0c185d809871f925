"""Variable tracking (2 chains x 2 hops) on the embedded model: which variables of the asked chain it names, and
whether it names variables of the other chain (greedy, full cache, 50 samples per length, seed 1234).

    python benchmarks/variable_tracking_positions.py
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import torch

from hf_longmem import load_default_model
from hf_longmem.evals.tasks import variable_tracking

HOP = re.compile(r"VAR (\w+) = VAR (\w+)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--num-samples", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_default_model()
    for length in args.lengths:
        hits, other_chain, sizes = Counter(), 0, Counter()
        samples = variable_tracking(tokenizer, length, args.num_samples, seed=1234, num_chains=2, num_hops=2)
        for sample in samples:
            inputs = tokenizer(sample.context + sample.turns[0].query, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            named = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).split()
            chain = sample.turns[0].answers[0].split()  # the asked chain, in assignment order
            other = {v for pair in HOP.findall(sample.context) if not set(pair) & set(chain) for v in pair}
            for position, variable in enumerate(chain):
                hits[position] += variable in named
            other_chain += any(v in other for v in named)
            sizes[len(named)] += 1
        print(
            f"{length} tokens: asked chain named by position {dict(hits)} of {len(samples)}; "
            f"outputs naming a variable of the other chain: {other_chain}; output sizes (words): {dict(sizes)}"
        )


if __name__ == "__main__":
    main()
