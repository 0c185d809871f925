"""Edit batches for WISE: prompt + target rows (with context templates), right-padded, and the generated context
templates of EasyEdit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .data import encode_pair, known_text

#: Seeds of EasyEdit's generated context templates, then fallbacks used when the tokenizer does not know them.
TEMPLATE_SEEDS: tuple[str, ...] = ("I", "You", "Because", "Yes", "Q: ")
FALLBACK_TEMPLATE_SEEDS: tuple[str, ...] = ("The", "A", "In", "There", "Here", "What", "One", "Some", "It", "We")
#: (max new tokens, templates per seed) of the generated context templates (EasyEdit: [[5, 5], [10, 5]] / 5 seeds).
TEMPLATE_LENGTHS: tuple[int, ...] = (5, 10)


def pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (R, L), attention_mask (R, L))`` with right padding."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def build_edit_batch(
    tokenizer: Any,
    prompt: str,
    target: str,
    *,
    templates: Sequence[str],
    irrelevant: str,
    paraphrases: Sequence[str] = (),
    separator: str = " ",
) -> dict[str, torch.Tensor]:
    """The training rows of one edit: ``prompt`` through each template (+ paraphrases), then the irrelevant text.

    Args:
        tokenizer: the model's tokenizer.
        prompt, target: the edit.
        templates: templates with one ``"{}"`` (the prompt goes there; the target follows the whole template).
        irrelevant: unrelated text (last row; only its activation score is used).
        paraphrases: extra in-scope prompts (``train_on_paraphrases``).
        separator: text between prompt and target.

    Returns:
        ``input_ids`` ``(R, L)`` (right padded), ``attention_mask`` ``(R, L)`` and ``target_mask`` ``(R, L)`` bool,
        True at the target tokens of the ``R - 1`` edit rows (all False on the last, irrelevant row).
    """
    if not isinstance(irrelevant, str) or not irrelevant.strip():
        raise ValueError(f"locality prompt (irrelevant sample) must be a non-empty string, got {irrelevant!r}.")
    rows: list[tuple[list[int], int]] = []
    for template in templates:
        prefix, suffix = template.split("{}")
        rows.append(encode_pair(tokenizer, prefix + prompt + suffix, target, separator))
    for paraphrase in paraphrases:
        rows.append(encode_pair(tokenizer, paraphrase, target, separator))
    irrelevant_ids = list(tokenizer(irrelevant)["input_ids"])
    if not irrelevant_ids:
        raise ValueError(f"locality prompt {irrelevant!r} gives no token.")
    ids, mask = right_pad([r[0] for r in rows] + [irrelevant_ids], pad_id(tokenizer))
    target_mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (row, num_prompt) in enumerate(rows):
        target_mask[i, num_prompt : len(row)] = True
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target_mask}


def edit_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The in-scope rows of an edit batch (its irrelevant last row dropped, trailing padding trimmed)."""
    mask = batch["attention_mask"][:-1]
    width = int(mask.sum(-1).max())
    return {"input_ids": batch["input_ids"][:-1, :width], "attention_mask": mask[:, :width]}


def stack_rows(parts: Sequence[dict[str, torch.Tensor]], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Concatenate the rows of several edits (right padded); returns the batch and each row's edit index ``(R,)``."""
    width = max(p["input_ids"].shape[1] for p in parts)
    ids, masks, owner = [], [], []
    for index, part in enumerate(parts):
        extra = width - part["input_ids"].shape[1]
        ids.append(F.pad(part["input_ids"], (0, extra), value=pad_id))
        masks.append(F.pad(part["attention_mask"], (0, extra), value=0))
        owner += [index] * part["input_ids"].shape[0]
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}, torch.tensor(owner)


def generate_context_templates(
    model: nn.Module,
    tokenizer: Any,
    *,
    seeds: Sequence[str] = TEMPLATE_SEEDS,
    fallback_seeds: Sequence[str] = FALLBACK_TEMPLATE_SEEDS,
    lengths: Sequence[int] = TEMPLATE_LENGTHS,
    num_seeds: int = 5,
) -> list[str]:
    """EasyEdit's context templates: ``"{}"`` plus ``"<greedy continuation of a seed> {}"`` per seed and length.

    Seeds the tokenizer does not know (see :func:`~hf_longmem.editing.data.known_text`) are replaced by known
    fallback seeds, up to ``num_seeds``; with none known, only ``"{}"`` is returned. Braces in generated text are
    dropped so that each template has exactly one ``"{}"``.

    Returns:
        ``1 + num_seeds * len(lengths)`` templates (11 with the defaults).
    """
    chosen = [s for s in seeds if known_text(tokenizer, s.strip())]
    for seed in fallback_seeds:
        if len(chosen) >= num_seeds:
            break
        if seed not in chosen and known_text(tokenizer, seed):
            chosen.append(seed)
    chosen = chosen[:num_seeds]
    if not chosen:
        return ["{}"]
    device = next(model.parameters()).device
    encoded = [list(tokenizer(seed)["input_ids"]) for seed in chosen]
    pad = pad_id(tokenizer)
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    templates = ["{}"]
    for length in lengths:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=int(length),
                min_new_tokens=int(length),
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
            )
        for text in tokenizer.batch_decode(out, skip_special_tokens=True):
            text = text.replace("{", "").replace("}", "")
            templates.append(text + " {}")
    return templates
