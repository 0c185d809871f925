#!/usr/bin/env python
"""Continual pre-training recipe: a sequence of generated text domains, language-modelling loss on every token.

The method of Ibrahim et al. (2024): LR re-warming + re-decaying per stage (``schedule: {kind: rewarm_cosine}``) or
the infinite schedule (``{kind: infinite}``), plus replay of a fraction of earlier data (``{name: replay, ratio}``).

    accelerate launch recipes/continual_pretrain.py --config recipes/configs/continual_rewarm_replay.yaml
    python recipes/continual_pretrain.py --config recipes/configs/continual_infinite_replay.yaml

Writes ``results.json``, ``metrics.jsonl`` and ``stability_gap.png`` into ``output_dir``; see ``docs/continual.md``.
"""

from hf_longmem.continual.recipe import main

if __name__ == "__main__":
    main(loss_on="all", description=__doc__.split("\n\n")[0])
