#!/usr/bin/env python
"""Which layer of the embedded model can serve as LongMem's memory layer: per layer and head, how often the
question's last token, scored with its un-rotated query against the chunk-mean un-rotated keys of the earlier
segments (LongMem's retrieval, ``hf_longmem.memory.memory_bank.ChunkMemoryBank``), puts a chunk holding the pass key
in its top-k; and, on prompts the backbone reads whole, its attention mass on the pass-key line.

    python benchmarks/memory_layer_probe.py --lengths 1024 4096 8192 --num-samples 20

Samples whose pass key lies in the last segment are skipped for the retrieval rate (it is local there).
"""

from __future__ import annotations

import argparse
import json

import torch

from hf_longmem.default_model import load_default_model
from hf_longmem.evals.tasks import generate_task
from hf_longmem.files import atomic_write_text


def _find_last(seq: list[int], sub: list[int]) -> int:
    for start in range(len(seq) - len(sub), -1, -1):
        if seq[start : start + len(sub)] == sub:
            return start
    raise ValueError("the answer's tokens do not occur in the prompt")


def probe(length: int, num_samples: int, segment: int, chunk: int, topk: int, seed: int) -> dict:
    model, tokenizer = load_default_model()
    model.set_attn_implementation("eager")
    config = model.config
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    queries: dict[int, torch.Tensor] = {}
    keys: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(model.model.layers):  # projections before RoPE: [1, seq, heads * head_dim]
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, o, index=index: queries.__setitem__(index, o))
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, o, index=index: keys.__setitem__(index, o))
    hits = torch.zeros(layers, heads)
    mass = torch.zeros(layers, heads)
    num_retrieval = num_mass = 0
    for sample in generate_task("passkey", tokenizer, length, num_samples, seed=seed):
        ids = tokenizer(sample.context + sample.turns[0].query, verbose=False)["input_ids"]
        answer = tokenizer(" " + sample.turns[0].answers[0], add_special_tokens=False)["input_ids"]
        key_start = _find_last(ids, answer)
        key_span = slice(max(key_start - 6, 0), key_start + len(answer) + 2)  # "... pass key is 71432 ."
        if length <= 1024:
            with torch.no_grad():
                attentions = model(torch.tensor([ids]), output_attentions=True).attentions
            mass += torch.stack([a[0, :, -1, key_span].sum(-1) for a in attentions])
            num_mass += 1
        last_start = (len(ids) - 1) // segment * segment
        if key_start + len(answer) > last_start:
            continue
        memory: dict[int, list[torch.Tensor]] = {index: [] for index in range(layers)}
        with torch.no_grad():
            for start in range(0, last_start, segment):
                model(torch.tensor([ids[start : start + segment]]))
                for index in range(layers):
                    memory[index].append(keys[index][0])
            model(torch.tensor([ids[last_start:]]))
        target = set(range(key_start // chunk, (key_start + len(answer) - 1) // chunk + 1))
        for index in range(layers):
            stored = torch.cat(memory[index]).view(-1, kv_heads, head_dim)  # [tokens, kv_heads, head_dim]
            usable = stored.shape[0] // chunk * chunk
            means = stored[:usable].view(-1, chunk, kv_heads, head_dim).mean(1)  # [chunks, kv_heads, head_dim]
            means = means.repeat_interleave(heads // kv_heads, dim=1)
            scores = torch.einsum("hd,chd->hc", queries[index][0, -1].view(heads, head_dim), means)
            top = scores.topk(min(topk, scores.shape[1]), dim=-1).indices  # [heads, topk]
            hits[index] += torch.tensor([float(bool(target & set(row.tolist()))) for row in top])
        num_retrieval += 1
    result = {
        "length": length,
        "retrieval_samples": num_retrieval,
        "key_chunk_in_topk": (hits / max(num_retrieval, 1)).tolist(),
    }
    if num_mass:
        result["attention_mass_on_key_line"] = (mass / num_mass).tolist()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--num-samples", type=int, default=20)
    parser.add_argument("--segment-length", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--topk-chunks", type=int, default=16)
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for length in args.lengths:
        row = probe(length, args.num_samples, args.segment_length, args.chunk_size, args.topk_chunks, args.seed)
        rows.append(row)
        print(f"length {length}: pass-key chunk in the top-{args.topk_chunks} ({row['retrieval_samples']} samples)")
        for index, per_head in enumerate(row["key_chunk_in_topk"]):
            print(f"  layer {index}: " + " ".join(f"{v:.2f}" for v in per_head))
        if "attention_mass_on_key_line" in row:
            print("  attention mass of the last token on the pass-key line:")
            for index, per_head in enumerate(row["attention_mass_on_key_line"]):
                print(f"  layer {index}: " + " ".join(f"{v:.3f}" for v in per_head))
    if args.out:
        atomic_write_text(args.out, json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
