#!/usr/bin/env python
"""How well a model's FFN inputs separate the subjects of fictional-fact edit prompts (what WISE's routing needs).

    python benchmarks/edit_activation_cosine.py --models hf_longmem/assets/tiny-longmem runs/tiny-longmem-v4

For ``--num_facts`` prompts of :func:`hf_longmem.editing.data.fictional_facts` (each about a different subject), the
input of every decoder layer's ``mlp.down_proj`` (the matrix WISE edits; its input is the activation WISE routes on)
at the prompt's last token is collected; printed per layer: the mean, 5th and 95th percentile of the pairwise cosine
between the activations of different subjects asked with the same template (the pairs routing must tell apart), for
the prompts and for each prompt against the other subjects' paraphrases of that template.
High cosines (near 1) mean the edit of one subject fires on every other: the routing cannot keep edits apart.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_longmem.editing.data import fictional_facts


@torch.no_grad()
def last_token_ffn_inputs(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """``[layers, prompts, intermediate]``: the input of each layer's ``mlp.down_proj`` at each prompt's last token."""
    layers = model.model.layers
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args, i=i: captured[i].append(args[0][0, -1]))
        for i, layer in enumerate(layers)
    ]
    try:
        for prompt in prompts:
            model(**tokenizer(prompt, return_tensors="pt"))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([torch.stack(rows) for rows in captured])


def pairwise_cosines(a: torch.Tensor, b: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Cosines between row ``i`` of ``a`` and row ``j != i`` of ``b`` (``[n, d]`` each) where ``same[i, j]``."""
    sims = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    return sims[same & ~torch.eye(len(a), dtype=torch.bool)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--num_facts", type=int, default=50)
    args = parser.parse_args()
    for path in args.models:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        facts = fictional_facts(tokenizer, args.num_facts, num_paraphrases=1)
        prompts = last_token_ffn_inputs(model, tokenizer, [f.prompt for f in facts])
        paraphrases = last_token_ffn_inputs(model, tokenizer, [f.paraphrases[0] for f in facts])
        templates = [f.prompt.replace(f.subject, "{s}") for f in facts]
        same = torch.tensor([[a == b for b in templates] for a in templates])  # same template, other subject
        for layer in range(prompts.shape[0]):
            row = {"model": path, "layer": layer}
            for name, other in (("prompt_vs_prompt", prompts), ("prompt_vs_paraphrase", paraphrases)):
                cos = pairwise_cosines(prompts[layer], other[layer], same)
                q = torch.quantile(cos, torch.tensor([0.05, 0.95]))
                row[name] = {
                    "mean": round(cos.mean().item(), 3),
                    "p5": round(q[0].item(), 3),
                    "p95": round(q[1].item(), 3),
                }
            print(json.dumps(row))


if __name__ == "__main__":
    main()
