"""Diagnose WISE reliability loss: edit-time, routing, overwriting, merging, representation overlap."""

import argparse
import contextlib
import json
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from eval_wise import load

from hf_longmem.editing import WISEConfig, WISEEditor, fictional_facts, unrelated_prompts
from hf_longmem.editing.batching import pad_id as _pad_id
from hf_longmem.editing.batching import right_pad as _right_pad
from hf_longmem.editing.data import encode_pair
from hf_longmem.editing.evaluate import predicted_tokens, token_accuracy
from hf_longmem.editing.routing import activation_scores, token_scores

p = argparse.ArgumentParser()
p.add_argument("--model", default=None)
p.add_argument("--n", type=int, default=100)
p.add_argument("--ck", default="1,10,25,50,100")
p.add_argument("--option", action="append", default=[])
p.add_argument("--retrieve", type=int, default=1)
p.add_argument("--out", default=None)
a = p.parse_args()
torch.set_num_threads(1)
opts = {"save_freq": 25, "merge_freq": 50, "retrieve": bool(a.retrieve)}
for o in a.option:
    k, _, v = o.partition("=")
    try:
        opts[k] = json.loads(v)
    except json.JSONDecodeError:
        opts[k] = v
cfg = WISEConfig.from_dict(opts)
model, tok, name = load(a.model, 0)
recs = fictional_facts(tok, a.n, seed=0, num_paraphrases=1)
irr = [f"{p} {q}" for p, q in unrelated_prompts(tok, a.n, seed=1000)]
cks = [int(x) for x in a.ck.split(",")]
before = predicted_tokens(model, tok, [r.locality_prompt for r in recs], [r.locality_answer for r in recs])
ed = WISEEditor(model, tok, cfg)
L = ed.layer


def seq_scores(texts_pairs, weight):
    """activation score of weight vs main on prompt+target rows (mean over tokens, eval rule)."""
    enc = [encode_pair(tok, pp, tt) for pp, tt in texts_pairs]
    ids, mask = _right_pad([e[0] for e in enc], _pad_id(tok))
    box = {}
    h = L.register_forward_hook(lambda m, i, o: box.__setitem__("x", i[0]))
    with torch.no_grad(), ed.disable_adapter():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    h.remove()
    x = box["x"]
    main = L.project(x, L.weight)
    side = L.project(x, weight)
    return activation_scores(token_scores(main, side, L.act_fn), mask, max_pool_above=cfg.max_pool_above)


@contextlib.contextmanager
def forced(weight):
    orig = L.forward
    L.forward = lambda x: L.project(x, weight)
    try:
        yield
    finally:
        L.forward = orig


rows = []
stats = []
t0 = time.time()
for i, r in enumerate(recs):
    s = ed.edit(r.prompt, r.target, locality_prompts=[irr[i]])[0]
    # edit-time reliability: the shard right after this edit, forced
    with forced(L.shard if L.shard_has_edits() else None) if L.shard_has_edits() else contextlib.nullcontext():
        rel_now = token_accuracy(model, tok, [r.prompt], [r.target])[0] if L.shard_has_edits() else float("nan")
    stats.append(
        {
            "i": i,
            "steps": s.steps,
            "edit_loss": s.edit_loss,
            "act_loss": s.act_loss,
            "score": s.score,
            "rel_forced_now": rel_now,
            "events": s.events,
        }
    )
    if i + 1 in cks:
        done = recs[: i + 1]
        pairs = [(x.prompt, x.target) for x in done]
        rel = token_accuracy(model, tok, [x.prompt for x in done], [x.target for x in done])
        labels = ed.route_labels([f"{x.prompt} {x.target}" for x in done])
        cands = L.candidates()
        cand_scores = {lab: seq_scores(pairs, w).tolist() for lab, w, th in cands}
        ths = {lab: th for lab, _, th in cands}
        # forced per candidate reliability
        forced_rel = {}
        for lab, w, _th in cands:
            with forced(w):
                forced_rel[lab] = token_accuracy(model, tok, [x.prompt for x in done], [x.target for x in done])
        loc_scores = {
            lab: seq_scores([(x.locality_prompt, x.locality_answer) for x in done], w).tolist() for lab, w, _ in cands
        }
        after = predicted_tokens(model, tok, [x.locality_prompt for x in done], [x.locality_answer for x in done])
        loc = [sum(int(u == v) for u, v in zip(b, c)) / len(b) for b, c in zip(before, after)]
        n_side = sum(lab != "main" for lab in labels)
        # which memory should each edit be in? (its shard index -> group)
        best_forced = [max(forced_rel[lab][j] for lab in forced_rel) if forced_rel else 0 for j in range(len(done))]
        row = {
            "T": i + 1,
            "rel": sum(rel) / len(rel),
            "loc": sum(loc) / len(loc),
            "routed_side_frac": n_side / len(done),
            "rel_if_routed_correctly(best forced memory)": sum(best_forced) / len(done),
            "forced_rel": {k: sum(v) / len(v) for k, v in forced_rel.items()},
            "thresholds": ths,
            "score_stats": {k: {"min": min(v), "mean": sum(v) / len(v), "max": max(v)} for k, v in cand_scores.items()},
            "loc_score_stats": {
                k: {"min": min(v), "mean": sum(v) / len(v), "max": max(v)} for k, v in loc_scores.items()
            },
            "edit_time_rel_mean": sum(s["rel_forced_now"] for s in stats[: i + 1]) / (i + 1),
            "mean_edit_loss": sum(s["edit_loss"] for s in stats[: i + 1]) / (i + 1),
            "edit_scores_min_mean": (
                min(s["score"] for s in stats[: i + 1]),
                sum(s["score"] for s in stats[: i + 1]) / (i + 1),
            ),
            "labels_hist": {lab: labels.count(lab) for lab in set(labels)},
            "rel_by_route": {
                lab: sum(rr for rr, ll in zip(rel, labels) if ll == lab) / max(1, labels.count(lab))
                for lab in set(labels)
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
print("time", time.time() - t0, file=sys.stderr)
if a.out:
    json.dump({"rows": rows, "stats": stats, "opts": opts}, open(a.out, "w"), indent=1)
