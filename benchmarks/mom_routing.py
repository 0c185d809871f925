#!/usr/bin/env python
"""How a trained MoM checkpoint routes grouped MQAR, and the accuracy a model without key->value binding gets.

For each layer, on ``num_samples`` grouped MQAR samples (:func:`hf_longmem.evals.recall.mqar` with ``num_groups``):

* ``group_purity``: over the key tokens of the pairs, the share routed (top-1 memory) to their group's memory, the
  groups matched to different memories (the best one-to-one matching, :func:`group_purity`); 1.0 means one memory
  per group, about ``1 / M`` an even spread or a router that sends every key to one memory;
* ``pair_shares_memory``: share of pairs whose key and value tokens have a routed memory in common (then that
  memory's short convolution sees the key right before the value, which is how the binding is written).

It also prints the **no-binding level** of the evaluation rows: the accuracy of a model that knows which values
occurred in the asked key's group but not which key they belong to (it guesses uniformly among them), by Monte
Carlo over the generator.

    python benchmarks/mom_routing.py --checkpoint runs/memory/mom_m4_grouped --num-pairs 16 32 48 64
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from hf_longmem.evals.recall import RecallVocabulary, generate_recall


def no_binding_level(vocab: RecallVocabulary, num_pairs: int, num_groups: int, num_samples: int) -> float:
    """Expected accuracy of guessing uniformly among the distinct values that occurred in the asked key's group."""
    total = 0.0
    for sample in generate_recall(
        "mqar",
        vocab,
        1 + 2 * num_pairs + 2,
        num_samples,
        seed=99,
        num_pairs=num_pairs,
        num_queries=1,
        num_groups=num_groups,
    ):
        ids = sample.input_ids
        pairs = list(zip(ids[1 : 1 + 2 * num_pairs : 2], ids[2 : 2 + 2 * num_pairs : 2]))
        group_of = {key: vocab.key_group(key, num_groups) for key, _ in pairs}
        asked = ids[-2]
        distinct = {value for key, value in pairs if group_of[key] == group_of[asked]}
        total += 1.0 / len(distinct)
    return total / num_samples


def group_purity(memory: torch.Tensor, groups: torch.Tensor, num_memories: int, num_groups: int) -> float:
    """Share of key tokens routed to their group's memory, each memory serving at most ``ceil(G / M)`` groups.

    The groups are matched to memories one-to-one (when ``G <= M``) by the matching that keeps the most tokens, so
    a router that sends every key to the same memory scores about ``1 / G``, not 1.0 (taking each group's most
    frequent memory independently would let all groups claim that one memory).

    Args:
        memory: ``[...]`` the memory (top-1) each key token is routed to; groups: ``[...]`` its group.
    """
    counts = [torch.bincount(memory[groups == g], minlength=num_memories).tolist() for g in range(num_groups)]
    slots = [m for m in range(num_memories) for _ in range(-(-num_groups // num_memories))]
    best = {0: 0}  # bitmask of used slots -> most tokens kept by the groups matched so far
    for row in counts:  # exact matching, dynamic programming over the used slots (G, M are small)
        step: dict[int, int] = {}
        for used, kept in best.items():
            for s, m in enumerate(slots):
                if not used >> s & 1:
                    key = used | 1 << s
                    step[key] = max(step.get(key, -1), kept + row[m])
        best = step
    return max(best.values()) / max(memory.numel(), 1)


@torch.no_grad()
def routing_stats(model, vocab: RecallVocabulary, num_pairs: int, num_groups: int, num_samples: int) -> list[dict]:
    samples = generate_recall(
        "mqar", vocab, 1 + 4 * num_pairs, num_samples, seed=7, num_pairs=num_pairs, num_groups=num_groups
    )
    ids = torch.tensor([s.input_ids for s in samples])
    out = model(input_ids=ids)
    key_pos = torch.arange(1, 1 + 2 * num_pairs, 2)
    keys = ids[:, key_pos]  # [n, pairs]
    groups = torch.tensor([[vocab.key_group(int(k), num_groups) for k in row] for row in keys])
    topk = model.config.topk
    rows = []
    for layer, logits in enumerate(out.router_logits):
        chosen = logits.float().topk(topk, dim=-1).indices  # [n, seq, k]
        key_mem, value_mem = chosen[:, key_pos], chosen[:, key_pos + 1]  # [n, pairs, k]
        purity = group_purity(key_mem[..., 0], groups, logits.shape[-1], num_groups)
        shares = (key_mem[..., :, None] == value_mem[..., None, :]).any(-1).any(-1)
        rows.append({"layer": layer, "group_purity": purity, "pair_shares_memory": float(shares.float().mean())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num-pairs", type=int, nargs="+", default=[16, 32, 48, 64])
    parser.add_argument("--num-groups", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_longmem.modeling.mom  # noqa: F401  (registers mom_gdn)

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    vocab = RecallVocabulary(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    for pairs in args.num_pairs:
        row = {"num_pairs": pairs, "no_binding_level": round(no_binding_level(vocab, pairs, args.num_groups, 2000), 3)}
        if model.config.num_memories > 1:
            stats = routing_stats(model, vocab, pairs, args.num_groups, args.num_samples)
            row["layers"] = [{k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()} for s in stats]
        print(json.dumps(row))


if __name__ == "__main__":
    main()
