import json
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from eval_wise import load

from hf_longmem.editing import fictional_facts
from hf_longmem.editing.data import encode_pair

torch.set_num_threads(1)
mname = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "default" else None
model, tok, _ = load(mname, 0)
recs = fictional_facts(tok, 100, seed=0, num_paraphrases=1)
nl = model.config.num_hidden_layers


def keys(pairs):
    out = {ly: [] for ly in range(nl)}
    hs = []
    box = {}
    for ly in range(nl):
        hs.append(
            model.model.layers[ly].mlp.down_proj.register_forward_hook(lambda m, i, o, ly=ly: box.__setitem__(ly, i[0]))
        )
    for p, t in pairs:
        ids, n = encode_pair(tok, p, t)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for ly in range(nl):
            out[ly].append(box[ly][0, n - 1])  # last prompt token (predicts first target token)
    for h in hs:
        h.remove()
    return {ly: torch.stack(v) for ly, v in out.items()}


K = keys([(r.prompt, r.target) for r in recs])
P = keys([(r.paraphrases[0], r.target) for r in recs])
fam = [r.prompt.split(r.subject)[0] for r in recs]
for ly in range(nl):
    k = K[ly]
    kn = torch.nn.functional.normalize(k, dim=-1)
    cos = kn @ kn.T
    off = cos[~torch.eye(len(k), dtype=bool)]
    same = torch.tensor([[fam[i] == fam[j] and i != j for j in range(len(k))] for i in range(len(k))])
    kc = k - k.mean(0)
    s = torch.linalg.svdvals(kc)
    er = (s.sum() ** 2 / (s**2).sum()).item()
    pn = torch.nn.functional.normalize(P[ly], dim=-1)
    pc = (kn * pn).sum(-1)
    # nearest neighbour of paraphrase key among edit keys is its own edit?
    nn_ok = ((pn @ kn.T).argmax(-1) == torch.arange(len(k))).float().mean().item()
    # centered cosine within same family
    kcn = torch.nn.functional.normalize(kc, dim=-1)
    ccos = kcn @ kcn.T
    print(
        json.dumps(
            {
                "layer": ly,
                "mean_cos": off.mean().item(),
                "mean_cos_same_family": cos[same].mean().item(),
                "max_offdiag_cos": off.max().item(),
                "eff_rank_centered": er,
                "norm": k.norm(dim=-1).mean().item(),
                "centered_cos_same_family": ccos[same].mean().item(),
                "para_vs_edit_cos": pc.mean().item(),
                "para_nn_is_own_edit": nn_ok,
            }
        )
    )
