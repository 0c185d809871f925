#!/usr/bin/env python
"""Continual fine-tuning recipe: a sequence of generated tasks, loss on the answers only.

    accelerate launch recipes/continual_finetune.py --config recipes/configs/continual_ewc.yaml
    accelerate launch --cpu --num_processes 2 recipes/continual_finetune.py --config recipes/configs/continual_tiny.yaml
    python recipes/continual_finetune.py --config recipes/configs/continual_naive.yaml --set train.steps_per_task=50
    python recipes/continual_finetune.py --config ... --resume     # continue from the newest checkpoint

Writes ``results.json`` (accuracy matrix, ACC / forgetting / BWT / FWT, min-ACC / WC-ACC, the periodic
evaluations), ``metrics.jsonl`` and ``stability_gap.png`` into ``output_dir``; see ``docs/continual.md``.
"""

from hf_longmem.continual.recipe import main

if __name__ == "__main__":
    main(loss_on="answer", description=__doc__.split("\n\n")[0])
