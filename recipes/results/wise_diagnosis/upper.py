"""Capacity upper bound: jointly train ONE full down_proj copy (all entries, no mask) on all N facts."""

import json
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from eval_wise import load

from hf_longmem.editing import fictional_facts
from hf_longmem.editing.batching import pad_id as _pad_id
from hf_longmem.editing.batching import right_pad as _right_pad
from hf_longmem.editing.data import encode_pair
from hf_longmem.editing.evaluate import token_accuracy
from hf_longmem.editing.losses import target_cross_entropy

torch.set_num_threads(1)
mname = sys.argv[1] if sys.argv[1] != "default" else None
n = int(sys.argv[2])
steps = int(sys.argv[3])
layers = [int(x) for x in sys.argv[4].split(",")]
clamp = float(sys.argv[5]) if len(sys.argv) > 5 else None
model, tok, _ = load(mname, 0)
recs = fictional_facts(tok, n, seed=0, num_paraphrases=1)
enc = [encode_pair(tok, r.prompt, r.target) for r in recs]
ids, mask = _right_pad([e[0] for e in enc], _pad_id(tok))
tm = torch.zeros_like(ids, dtype=torch.bool)
for i, (row, k) in enumerate(enc):
    tm[i, k : len(row)] = True
for p in model.parameters():
    p.requires_grad_(False)
for ly in layers:
    W = model.model.layers[ly].mlp.down_proj.weight
    orig = W.detach().clone()
    W.requires_grad_(True)
    opt = torch.optim.Adam([W], lr=1e-2)
    t = time.time()
    for _s in range(steps):
        loss = target_cross_entropy(model(input_ids=ids, attention_mask=mask).logits, ids, tm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if clamp is not None:
            with torch.no_grad():
                W.copy_(torch.maximum(torch.minimum(W, orig + clamp), orig - clamp))
    W.requires_grad_(False)
    rel = token_accuracy(model, tok, [r.prompt for r in recs], [r.target for r in recs])
    gen = token_accuracy(model, tok, [r.paraphrases[0] for r in recs], [r.target for r in recs])
    print(
        json.dumps(
            {
                "model": mname,
                "layer": ly,
                "n": n,
                "steps": steps,
                "clamp": clamp,
                "final_loss": loss.item(),
                "rel": sum(rel) / n,
                "gen": sum(gen) / n,
                "delta_max": (W - orig).abs().max().item(),
                "s": time.time() - t,
            }
        ),
        flush=True,
    )
    with torch.no_grad():
        W.copy_(orig)
