"""WISE lifelong model editing for Hugging Face causal LMs: :class:`WISEEditor`.

Usage::

    from hf_longmem.editing import WISEConfig, WISEEditor

    editor = WISEEditor(model, tokenizer, WISEConfig(retrieve=True))        # wraps model in place
    editor.edit(["The capital of Atlantis is"], ["Poseidonia"],
                locality_prompts=["nq question: who wrote hamlet William Shakespeare"])
    model.generate(**tokenizer(["The capital of Atlantis is"], return_tensors="pt"))   # edited model, as usual
    editor.save_pretrained("wise-edits")                                   # wise_config.json + safetensors
    editor = WISEEditor.from_pretrained(fresh_model, tokenizer, "wise-edits")

One edit (paper Sec. 3, EasyEdit ``WISE.edit``): the prompt and target are rendered through the context
templates (``"{}"`` plus prefixes the model generated itself), and one irrelevant sample is appended. The shard
being edited is trained with SGD on ``L_edit + L_a``: ``L_edit`` is the cross-entropy of the target tokens
(mean per row, then over rows); ``L_a`` are the routing margins of paper Eq. 5 on the sequence activation scores
``in`` (edit rows) and ``out`` (irrelevant row): ``mean+(out - alpha) + mean+(beta - in) + mean+(out - in + gamma)``,
where ``mean+`` averages the positive entries. Only the entries of the shard's random gradient mask
(``mask_ratio``) move; after each step the shard is clamped to ``W +- norm_constraint``. An edit stops early once
the loss is at most ``early_stop_loss`` and stable. Its in-scope score after training sets the routing threshold.

Deviations from EasyEdit (each fixes a bug or a side effect; see also :mod:`.routing` and :mod:`.side_memory`):

- edit rows are tokenized once, with target tokens found from the tokenizer's offsets (EasyEdit masks the labels
  with the *padded* prompt length, so with padding it trains on the wrong tokens) and the CE is averaged over target
  tokens only (EasyEdit divides by a count that includes prompt and padding positions);
- activation scores average over real tokens only (EasyEdit includes padding);
- weight decay is masked like the gradient (EasyEdit's SGD decays every entry of the shard, so a shard also moves
  outside its mask, which blurs the disjoint subspaces merging relies on);
- the threshold of an edit is its score with the final weights (EasyEdit records the score before the last step);
- context templates are cached per editor and saved with it (EasyEdit caches them in a module global, shared across
  models), braces in generated text are dropped, and seeds the tokenizer does not know are replaced;
- nothing is pickled: the edit history is an optional JSON Lines file, never kept in module globals.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_longmem.files import atomic_write

from .batching import build_edit_batch, edit_rows, generate_context_templates, pad_id, right_pad, stack_rows
from .config import WISEConfig
from .data import unrelated_prompts
from .integrity import file_digest, json_default, same_base, weight_fingerprint
from .layer_replay import LowerLayerCache
from .losses import margin_losses, mean_positive, target_cross_entropy
from .routing import MAIN, RouteContext, activation_scores, context_from_call, token_scores
from .side_memory import WISELayer, resolve_act_fn, resolve_target_module

__all__ = [
    "CONFIG_NAME",
    "EDIT_LOG_NAME",
    "EditStats",
    "MEMORY_NAME",
    "WISEEditor",
    "build_edit_batch",
    "generate_context_templates",
]

CONFIG_NAME = "wise_config.json"
MEMORY_NAME = "wise_memory.safetensors"
EDIT_LOG_NAME = "wise_edits.jsonl"
FORMAT = "hf_longmem.wise"
FORMAT_VERSION = 1
_DEFAULT_LOCALITY_POOL = 1000


# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class EditStats:
    """What one edit did.

    Attributes:
        index: position of the edit in the editor's whole history (0-based).
        prompt, target: the edit.
        steps: optimisation steps taken (at most ``n_iter``).
        loss, edit_loss, act_loss: final total loss and its parts (target CE; routing margins, plus the replay
            losses while training with ``replay``).
        score: in-scope activation score of the edit after training (sets the routing threshold).
        seconds: wall time of the edit.
        shard: index of the shard the edit went into.
        events: ``"saved shard"`` / ``"merged"`` when the edit completed a shard or a merge group.
    """

    index: int
    prompt: str
    target: str
    steps: int
    loss: float
    edit_loss: float
    act_loss: float
    score: float
    seconds: float
    shard: int
    events: list[str] = field(default_factory=list)


def _as_str_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}.")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{name} must hold non-empty strings, got {item!r}.")
    return list(value)


class WISEEditor:
    """Edit facts into a causal LM with a WISE side memory (paper: WISE-Merge / WISE-Retrieve).

    The model is modified in place, like ``peft.get_peft_model``: its chosen FFN output projection is replaced by a
    :class:`~hf_longmem.editing.side_memory.WISELayer` and a forward pre-hook tells that layer the attention mask and
    cache of each call. ``model(...)`` and ``model.generate(...)`` then route every sequence to the main memory or
    to the most activated side memory. The main memory (the original weight) is never changed.

    Args:
        model: a Hugging Face causal LM (``PreTrainedModel``) or any module with such an FFN.
        tokenizer: its tokenizer (fast tokenizers give exact target boundaries through offsets).
        config: :class:`WISEConfig` (default: EasyEdit's Llama-2-7B settings, WISE-Retrieve).

    Raises:
        ValueError: bad arguments, no FFN output projection found, or a model that already has a WISE layer.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: WISEConfig | None = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch nn.Module (a transformers model), got {type(model).__name__}.")
        if tokenizer is None or not callable(tokenizer):
            raise ValueError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}.")
        config = WISEConfig() if config is None else config
        if not isinstance(config, WISEConfig):
            raise ValueError(f"config must be a WISEConfig, got {type(config).__name__}.")
        if any(isinstance(m, WISELayer) for m in model.modules()):
            raise ValueError("model already has a WISE side memory: use its editor, or call editor.unload() first.")
        config = WISEConfig.from_dict(config.to_dict())  # private copy
        name = resolve_target_module(model, config)
        act_fn = resolve_act_fn(model, config)
        config.target_module, config.layer = name, None
        self.model = model
        self.tokenizer = tokenizer
        self.wise_config = config
        self.target_module = name
        self.context_templates: list[str] | None = (
            list(config.context_templates) if config.context_templates is not None else None
        )
        self.edit_log: list[dict[str, Any]] = []
        self._mask: torch.Tensor | None = None
        self._mask_shard: int | None = None
        self._locality_pool: list[str] | None = None
        parent_name, _, child = name.rpartition(".")
        self._parent = model.get_submodule(parent_name) if parent_name else model
        self._child = child
        original = getattr(self._parent, child)
        self.layer = WISELayer(original, config, act_fn)
        setattr(self._parent, child, self.layer)
        self._hooks: list[Any] = []
        self._install_hooks()
        self._lower = LowerLayerCache(model, name)
        # replay (paper App. B.3): in-scope rows of the edits of each finished merge group and of the current one
        self._replay_groups: list[list[dict[str, torch.Tensor]]] = []
        self._replay_cursor: list[int] = []
        self._replay_current: list[dict[str, torch.Tensor]] = []
        self._replay_ready = True
        self._replay_rng = random.Random(config.seed)

    # ------------------------------------------------------------------------------------------------------------------
    # Plumbing

    def _install_hooks(self) -> None:
        target = getattr(self.model, "base_model", None)
        if not isinstance(target, nn.Module) or "attention_mask" not in inspect.signature(target.forward).parameters:
            target = self.model
        names = tuple(inspect.signature(target.forward).parameters)
        layer = self.layer

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            layer.context = context_from_call(names, args, kwargs)

        def post_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            layer.context = RouteContext()

        self._hooks.append(target.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._hooks.append(target.register_forward_hook(post_hook, with_kwargs=True, always_call=True))

    def _check_active(self) -> None:
        if self.layer is None:
            raise RuntimeError("this editor was unloaded; create a new WISEEditor.")

    @property
    def config(self) -> Any:
        """The wrapped model's config (so that :func:`hf_longmem.hub.publish` describes the base model)."""
        return getattr(self.model, "config", None)

    @property
    def device(self) -> torch.device:
        return self.layer.weight.device

    @property
    def num_edits(self) -> int:
        """Edits written so far (including those loaded with :meth:`from_pretrained`)."""
        return self.layer.num_edits if self.layer is not None else 0

    def __repr__(self) -> str:
        return (
            f"WISEEditor({self.wise_config.variant}, target_module={self.target_module!r}, edits={self.num_edits}, "
            f"side memories={len(self.layer.candidates()) if self.layer is not None else 0})"
        )

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager in which the model runs on its main memory only (like ``peft``'s)."""
        self._check_active()
        previous = self.layer.disabled
        self.layer.disabled = True
        try:
            yield
        finally:
            self.layer.disabled = previous

    def unload(self) -> nn.Module:
        """Put the original projection back, remove the hooks and return the (unedited) model."""
        self._check_active()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        setattr(self._parent, self._child, self.layer.original)
        self.layer = None
        return self.model

    def get_context_templates(self) -> list[str]:
        """The context templates of the edit rows (generated with the main memory on first use, then kept)."""
        self._check_active()
        if self.context_templates is None:
            was_training = self.model.training
            self.model.eval()
            with self.disable_adapter():
                self.context_templates = generate_context_templates(self.model, self.tokenizer)
            self.model.train(was_training)
        return self.context_templates or ["{}"]

    def _default_locality(self, index: int) -> str:
        if self._locality_pool is None:
            pairs = unrelated_prompts(self.tokenizer, _DEFAULT_LOCALITY_POOL, seed=self.wise_config.seed + 7919)
            self._locality_pool = [f"{p} {a}" for p, a in pairs]
        return self._locality_pool[index % len(self._locality_pool)]

    def _shard_mask(self, shard: int) -> torch.Tensor:
        if self._mask is None or self._mask_shard != shard:
            generator = torch.Generator().manual_seed(self.wise_config.seed * 1_000_003 + shard)
            mask = torch.rand(self.layer.weight.shape, generator=generator) < self.wise_config.mask_ratio
            self._mask, self._mask_shard = mask.to(self.device), shard
        elif self._mask.device != self.device:  # the model moved since
            self._mask = self._mask.to(self.device)
        return self._mask

    def _merge_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.wise_config.seed * 1_000_003 + 500_009 + self.layer.num_merges)

    # ------------------------------------------------------------------------------------------------------------------
    # Editing

    def edit(
        self,
        prompts: str | Sequence[str],
        targets: str | Sequence[str],
        *,
        paraphrases: Sequence[str | Sequence[str] | None] | None = None,
        locality_prompts: str | Sequence[str] | None = None,
        source: str | None = None,
        progress: bool = False,
    ) -> list[EditStats]:
        """Write one or several edits, sequentially (one after the other, as in lifelong editing).

        Args:
            prompts: one prompt or a list (``N`` edits).
            targets: the new answers, one per prompt.
            paraphrases: per edit, a paraphrase or a list of them (or ``None``). Kept in the edit log; trained on
                only with ``WISEConfig(train_on_paraphrases=True)``.
            locality_prompts: per edit, the irrelevant text trained against (paper: a Natural Questions question and
                answer); a single string is used for every edit. ``None``: built-in unrelated sentences
                (:func:`~hf_longmem.editing.data.unrelated_prompts`); real unrelated text of your domain is better.
            source: provenance of these edits (a dataset name, a file), kept in the edit log and the model card.
            progress: show a progress bar.

        Returns:
            one :class:`EditStats` per edit.

        Raises:
            ValueError: mismatched lengths, empty strings, or a target that gives no token.
        """
        self._check_active()
        prompts = _as_str_list(prompts, "prompts")
        targets = _as_str_list(targets, "targets")
        if len(prompts) != len(targets):
            raise ValueError(f"prompts has {len(prompts)} entries but targets has {len(targets)}.")
        count = len(prompts)
        if paraphrases is None:
            paraphrase_lists: list[list[str]] = [[] for _ in range(count)]
        else:
            if isinstance(paraphrases, str) or not isinstance(paraphrases, Sequence) or len(paraphrases) != count:
                raise ValueError(
                    f"paraphrases must be a list with one entry (a string, a list or None) per prompt "
                    f"({count}), got {paraphrases!r}."
                )
            paraphrase_lists = [[] if p is None else _as_str_list(p, "paraphrases") for p in paraphrases]
        if locality_prompts is None:
            localities = [self._default_locality(self.num_edits + i) for i in range(count)]
        elif isinstance(locality_prompts, str):
            localities = _as_str_list(locality_prompts, "locality_prompts") * count
        else:
            localities = _as_str_list(locality_prompts, "locality_prompts")
            if len(localities) != count:
                raise ValueError(f"locality_prompts has {len(localities)} entries for {count} prompts.")
        if source is not None and not isinstance(source, str):
            raise ValueError(f"source must be a string or None, got {source!r}.")
        config = self.wise_config
        templates = self.get_context_templates()
        batches = [
            build_edit_batch(
                self.tokenizer,
                p,
                t,
                templates=templates,
                irrelevant=loc,
                paraphrases=paras if config.train_on_paraphrases else (),
                separator=config.target_separator,
            )
            for p, t, paras, loc in zip(prompts, targets, paraphrase_lists, localities)
        ]
        iterator: Any = range(count)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=f"{config.variant} edits", unit="edit")
        if config.replay and not self._replay_ready:
            self._rebuild_replay_history()
        results = []
        for i in iterator:
            if config.replay:
                self._replay_current.append(edit_rows(batches[i]))
            stats = self._edit_one(prompts[i], targets[i], batches[i])
            if config.replay and "merged" in stats.events:
                self._replay_groups.append(self._replay_current)
                self._replay_cursor.append(0)
                self._replay_current = []
            results.append(stats)
            self.edit_log.append(
                {
                    **asdict(stats),
                    "paraphrases": paraphrase_lists[i],
                    "locality_prompt": localities[i],
                    "source": source,
                }
            )
        return results

    def _forward_scores(
        self, batch: dict[str, torch.Tensor], lower: Any = None, *, last_is_irrelevant: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward: ``(logits (R, L, V), in-scope scores (R - 1,), irrelevant score (1,))``, or with
        ``last_is_irrelevant=False`` ``(logits, scores (R,), empty)``. ``lower`` reuses the lower layers' output."""
        context = self._lower.reuse(lower[0]) if lower else contextlib.nullcontext()
        with context:
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        main, side = self.layer.recorded
        self.layer.recorded = None
        scores = activation_scores(token_scores(main, side, self.layer.act_fn), batch["attention_mask"])
        if not last_is_irrelevant:
            return out.logits, scores, scores[:0]
        return out.logits, scores[:-1], scores[-1:]

    def _first_forward(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, Any]:
        """Full forward that records the lower layers' output; checks their reuse once per editor."""
        lower = self._lower
        with lower.record() as box:
            result = self._forward_scores(batch)
        recorded = box if (lower.enabled and box) else None
        if recorded is not None and not lower.verified:
            try:
                with torch.no_grad():
                    check = self._forward_scores(batch, recorded)
                same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(result, check))
            except Exception:  # noqa: BLE001 - an architecture the reuse does not fit: use full forwards
                same = False
            lower.verified, lower.enabled = True, same
            if not same:
                recorded = None
        return result, recorded

    def _replay_loss(self) -> torch.Tensor | None:
        """Paper App. B.3 / EasyEdit ``replay``: ``mean_g mean+(d_g - m_neg) + mean+(m_pos - d_cur)`` where ``d_g``
        are the scores of the shard being edited on one past edit of merge group ``g`` (taken in turn) and
        ``d_cur`` on a random edit of the current group; ``None`` before the first merge."""
        config = self.wise_config
        if not (config.replay and self._replay_groups and self._replay_current):
            return None
        ceiling, floor = config.replay_margins
        past = []
        for g, group in enumerate(self._replay_groups):
            past.append(group[self._replay_cursor[g] % len(group)])
            self._replay_cursor[g] += 1
        current = self._replay_rng.choice(self._replay_current)
        pad = pad_id(self.tokenizer)
        batch, owner = stack_rows([*past, current], pad)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        owner = owner.to(self.device)
        _, scores, _ = self._forward_scores(batch, last_is_irrelevant=False)
        negative = torch.stack([mean_positive(scores[owner == i] - ceiling) for i in range(len(past))]).mean()
        positive = mean_positive(floor - scores[owner == len(past)])
        return negative + positive

    def _rebuild_replay_history(self) -> None:
        """Re-tokenize the logged edits into replay groups (after :meth:`from_pretrained`)."""
        self._replay_ready = True
        config, layer = self.wise_config, self.layer
        logged = {e.get("index"): e for e in self.edit_log}
        if any(i not in logged for i in range(layer.num_edits)):
            warnings.warn(
                "replay=True but the edit log of the loaded side memories is incomplete: replay only covers the edits "
                "it holds and those made from now on (save with include_edit_log=True to keep them).",
                stacklevel=3,
            )
        templates = self.get_context_templates()
        groups: dict[int, list[dict[str, torch.Tensor]]] = {}
        for index in sorted(i for i in logged if isinstance(i, int) and i < layer.num_edits):
            entry = logged[index]
            batch = build_edit_batch(
                self.tokenizer,
                entry["prompt"],
                entry["target"],
                templates=templates,
                irrelevant=entry.get("locality_prompt") or entry["prompt"],
                separator=config.target_separator,
            )
            groups.setdefault(index // config.merge_freq, []).append(edit_rows(batch))
        finished = layer.num_merges
        self._replay_groups = [groups[g] for g in range(finished) if g in groups]
        self._replay_cursor = [0] * len(self._replay_groups)
        self._replay_current = groups.get(finished, [])

    def _edit_one(self, prompt: str, target: str, cpu_batch: dict[str, torch.Tensor]) -> EditStats:
        config, layer = self.wise_config, self.layer
        start = time.perf_counter()
        batch = {k: v.to(self.device) for k, v in cpu_batch.items()}
        shard = layer.num_edits // config.save_freq
        mask = self._shard_mask(shard)
        base = layer.weight.detach().float()
        weight = layer.shard.detach().float().clone().requires_grad_(True)
        low = high = None
        if config.norm_constraint is not None:
            low, high = base - config.norm_constraint, base + config.norm_constraint
        was_training = self.model.training
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        self.model.eval()
        layer.editing, layer.train_weight = True, weight
        steps, previous, lower_out = 0, None, None
        loss = edit_loss = act_loss = in_scores = None
        fresh = False
        try:
            for p in frozen:  # only the shard needs gradients
                p.requires_grad_(False)
            with torch.enable_grad():
                for step in range(config.n_iter):
                    if step == 0:
                        (logits, in_scores, out_scores), lower_out = self._first_forward(batch)
                    else:
                        logits, in_scores, out_scores = self._forward_scores(batch, lower_out)
                    edit_loss = target_cross_entropy(logits, batch["input_ids"], batch["target_mask"])
                    act_loss = margin_losses(in_scores, out_scores, config)
                    replay_loss = self._replay_loss()
                    if replay_loss is not None:
                        act_loss = act_loss + replay_loss
                    loss = edit_loss + act_loss
                    value = float(loss.detach())
                    fresh = True
                    if (
                        previous is not None
                        and value <= config.early_stop_loss
                        and abs(value - previous) <= config.early_stop_tol
                    ):
                        break
                    (grad,) = torch.autograd.grad(loss, [weight])
                    with torch.no_grad():
                        if config.weight_decay:
                            grad = grad + config.weight_decay * weight
                        weight -= config.edit_lr * (grad * mask)
                        if low is not None:
                            torch.maximum(torch.minimum(weight, high, out=weight), low, out=weight)
                    steps += 1
                    previous = value
                    fresh = False
            with torch.no_grad():
                if not fresh:  # the loop ended with a step: score the final weights
                    logits, in_scores, out_scores = self._forward_scores(batch, lower_out)
                    edit_loss = target_cross_entropy(logits, batch["input_ids"], batch["target_mask"])
                    act_loss = margin_losses(in_scores, out_scores, config)
                    loss = edit_loss + act_loss
                layer.shard.copy_(weight.detach().to(layer.shard.dtype))
        finally:
            for p in frozen:
                p.requires_grad_(True)
            layer.editing, layer.train_weight, layer.recorded = False, None, None
            self.model.train(was_training)
        score = float(in_scores.detach().mean())
        index = layer.num_edits
        layer.add_edit_score(score)
        events = layer.finish_edit(self._merge_generator())
        layer.memo.clear()
        return EditStats(
            index=index,
            prompt=prompt,
            target=target,
            steps=steps,
            loss=float(loss.detach()),
            edit_loss=float(edit_loss.detach()),
            act_loss=float(act_loss.detach()),
            score=score,
            seconds=time.perf_counter() - start,
            shard=shard,
            events=events,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Inspection

    def route_labels(self, texts: Sequence[str]) -> list[str]:
        """Which memory each text is routed to, batched: ``"main"``, ``"shard"``, ``"memory.0"``, ``"merged"``, ..."""
        self._check_active()
        texts = _as_str_list(texts, "texts")
        ids, mask = right_pad([list(self.tokenizer(t)["input_ids"]) for t in texts], pad_id(self.tokenizer))
        labels = [c[0] for c in self.layer.candidates()]
        with torch.no_grad():
            self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        routes = self.layer.last_routes
        if routes is None or not labels:
            return ["main"] * len(texts)
        return ["main" if int(r) == MAIN else labels[int(r)] for r in routes.tolist()]

    # ------------------------------------------------------------------------------------------------------------------
    # Saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike, *, include_edit_log: bool = True, **_: Any) -> None:
        """Write ``wise_config.json``, ``wise_memory.safetensors`` and (optionally) ``wise_edits.jsonl``.

        Each file is written to a temporary file and renamed into place; the JSON, written last, records the size
        and sha256 of the others, so a truncated or mismatched file is detected on load. Extra keyword arguments
        (from :func:`hf_longmem.hub.publish`'s ``save_kwargs``) are ignored.

        Args:
            save_directory: created if needed.
            include_edit_log: also write the edit history (prompts, targets, paraphrases, timings) as JSON Lines.
                It is the edits' provenance, but also their text: leave it out for private edits.
        """
        from safetensors.torch import save_file

        self._check_active()
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_directory={str(directory)!r} exists and is not a folder.")
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.layer.memory_tensors().items()}
        atomic_write(
            directory / MEMORY_NAME,
            lambda p: save_file(tensors, str(p), metadata={"format": "pt", "hf_longmem": FORMAT}),
        )
        files = {
            MEMORY_NAME: {
                "size": (directory / MEMORY_NAME).stat().st_size,
                "sha256": file_digest(directory / MEMORY_NAME),
            }
        }
        if include_edit_log:
            text = "".join(json.dumps(entry, default=json_default) + "\n" for entry in self.edit_log)
            atomic_write(directory / EDIT_LOG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
            files[EDIT_LOG_NAME] = {
                "size": (directory / EDIT_LOG_NAME).stat().st_size,
                "sha256": file_digest(directory / EDIT_LOG_NAME),
            }
        elif (directory / EDIT_LOG_NAME).exists():
            (directory / EDIT_LOG_NAME).unlink()
        config = self.wise_config.to_dict()
        config["context_templates"] = self.context_templates
        from hf_longmem import __version__

        model_config = getattr(self.model, "config", None)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "hf_longmem_version": __version__,
            "method": self.wise_config.variant,
            "config": config,
            "target_module": self.target_module,
            "weight_shape": list(self.layer.weight.shape),
            "weight_layout": "conv1d" if self.layer.transposed else "linear",
            "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
            "base_model_type": getattr(model_config, "model_type", None),
            "base_weight": weight_fingerprint(self.layer.weight),
            "routing_state": self.layer.routing_state(),
            "files": files,
        }
        text = json.dumps(meta, indent=2, default=json_default) + "\n"
        atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))

    @staticmethod
    def _resolve_files(pretrained: str | os.PathLike, token: Any = None) -> Path:
        path = Path(pretrained)
        if path.is_dir():
            return path
        text = str(pretrained)
        if path.exists() or text.count("/") > 1 or text.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{text!r} is not a folder holding {CONFIG_NAME}.")
        from huggingface_hub import hf_hub_download

        config_file = Path(hf_hub_download(text, CONFIG_NAME, token=token))
        hf_hub_download(text, MEMORY_NAME, token=token)
        with contextlib.suppress(Exception):  # the edit log is optional
            hf_hub_download(text, EDIT_LOG_NAME, token=token)
        return config_file.parent

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        tokenizer: Any,
        pretrained: str | os.PathLike,
        *,
        check_base: bool = True,
        token: Any = None,
    ) -> WISEEditor:
        """Load side memories saved by :meth:`save_pretrained` into ``model`` (modified in place).

        Args:
            model: the base model the edits were made on.
            tokenizer: its tokenizer.
            pretrained: a local folder, or a Hub repo id (downloaded with ``huggingface_hub``).
            check_base: refuse a base model whose target weight differs from the one the edits were made on
                (compared by sha256, or by samples when only the dtype differs).
            token: Hub token for a private repo.

        Raises:
            FileNotFoundError: no such folder (or repo).
            ValueError: missing, truncated or corrupted files; a target module the model does not have or whose
                shape differs; another base model.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = cls._resolve_files(pretrained, token)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise ValueError(f"{str(directory)!r} holds no {CONFIG_NAME}: not a saved WISE editor.")
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{str(config_path)!r} is not valid JSON (truncated or corrupted?): {error}") from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{str(config_path)!r} is not a hf_longmem WISE config (format {FORMAT!r}).")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{str(config_path)!r} has format_version {meta['format_version']}; this hf_longmem reads up to "
                f"{FORMAT_VERSION}: upgrade hf_longmem."
            )
        for key in ("config", "target_module", "weight_shape", "routing_state", "files"):
            if key not in meta:
                raise ValueError(f"{str(config_path)!r} is missing the key {key!r} (truncated or corrupted?).")
        for name, expected in meta["files"].items():
            file = directory / name
            if not file.is_file():
                raise ValueError(f"{str(file)!r} is missing (the save is incomplete).")
            size = file.stat().st_size
            if size != expected.get("size"):
                raise ValueError(
                    f"{str(file)!r} has {size} bytes but {expected.get('size')} were saved: the file is truncated "
                    "or was replaced."
                )
            if file_digest(file) != expected.get("sha256"):
                raise ValueError(f"{str(file)!r} does not match the sha256 recorded when it was saved (corrupted).")
        if MEMORY_NAME not in meta["files"]:
            raise ValueError(f"{str(config_path)!r} lists no {MEMORY_NAME}.")
        config = WISEConfig.from_dict(meta["config"])
        modules = dict(model.named_modules())
        name = meta["target_module"]
        if name not in modules:
            raise ValueError(
                f"the saved side memory duplicates {name!r}, which {type(model).__name__} does not have: these edits "
                f"were made on another architecture ({meta.get('base_model_type')!r}, "
                f"{meta.get('base_model_name_or_path')!r})."
            )
        module = modules[name]
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or list(weight.shape) != list(meta["weight_shape"]):
            shape = None if weight is None else list(weight.shape)
            raise ValueError(
                f"{name!r} has weight shape {shape} in this model but {meta['weight_shape']} in the saved side "
                f"memory: the edits were made on another model ({meta.get('base_model_name_or_path')!r})."
            )
        if check_base and "base_weight" in meta and not same_base(meta["base_weight"], weight_fingerprint(weight)):
            raise ValueError(
                f"the weight of {name!r} differs from the one the edits were made on "
                f"({meta.get('base_model_name_or_path')!r}): load the same base model (or pass check_base=False)."
            )
        try:
            tensors = load_file(str(directory / MEMORY_NAME))
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(
                f"cannot read {str(directory / MEMORY_NAME)!r} (truncated or corrupted?): {error}"
            ) from error
        state = meta["routing_state"]
        needed = ["shard", *(f"pending.{i}" for i in range(len(state["pending_scores"])))]
        needed += [f"memory.{i}" for i in range(len(state["memory_min_scores"]))]
        needed += ["merged"] if state.get("has_merged") else []
        for key in needed:
            if key not in tensors:
                raise ValueError(f"{MEMORY_NAME} has no tensor {key!r} (keys: {sorted(tensors)}).")
            if list(tensors[key].shape) != list(weight.shape):
                raise ValueError(
                    f"{MEMORY_NAME}: {key!r} has shape {list(tensors[key].shape)}, expected {list(weight.shape)}."
                )
        editor = cls(model, tokenizer, config)
        editor.layer.load_memories(tensors, state)
        log_path = directory / EDIT_LOG_NAME
        if EDIT_LOG_NAME in meta["files"] and log_path.is_file():
            lines = log_path.read_text(encoding="utf-8").splitlines()
            editor.edit_log = [json.loads(line) for line in lines if line.strip()]
        editor._replay_ready = not (config.replay and editor.layer.num_edits)  # rebuilt from the log on next edit
        return editor

    # ------------------------------------------------------------------------------------------------------------------
    # Hub

    def card_metadata(self, *, max_listed_edits: int = 20) -> dict[str, Any]:
        """Model-card metadata describing the edits (for :func:`hf_longmem.hub.publish` ``metadata=``).

        Returns:
            ``{"base_model_relation": "adapter", "wise": {...}}`` where ``wise`` holds the variant, target module,
            hyperparameters, edit/shard/merge counts, the sources of the edits and the first ``max_listed_edits``
            edits (prompt, target, source); the template ``model_cards/wise.md`` renders it.
        """
        self._check_active()
        config = self.wise_config.to_dict()
        config.pop("context_templates", None)
        sources: dict[str, int] = {}
        for entry in self.edit_log:
            key = entry.get("source") or "unspecified"
            sources[key] = sources.get(key, 0) + 1
        listed = [
            {"prompt": e.get("prompt"), "target": e.get("target"), "source": e.get("source") or "unspecified"}
            for e in self.edit_log[:max_listed_edits]
        ]
        seconds = [e.get("seconds") for e in self.edit_log if isinstance(e.get("seconds"), (int, float))]
        return {
            "base_model_relation": "adapter",
            "wise": {
                "variant": self.wise_config.variant,
                "target_module": self.target_module,
                "num_edits": self.num_edits,
                "num_logged_edits": len(self.edit_log),
                "num_merges": self.layer.num_merges,
                "num_side_memories": len(self.layer.candidates()),
                "hyperparameters": config,
                "sources": sources,
                "edits": listed,
                "edit_log_file": EDIT_LOG_NAME if self.edit_log else None,
                "mean_seconds_per_edit": (sum(seconds) / len(seconds)) if seconds else None,
            },
        }

    def push_to_hub(self, repo_id: str, *, max_listed_edits: int = 20, **publish_kwargs: Any) -> str:
        """Publish the side memories with a WISE model card through :func:`hf_longmem.hub.publish`.

        Sets ``template="wise"``, tags ``model-editing``/``wise``/``continual-learning``, ``base_model`` from the
        model's ``_name_or_path`` when it is a Hub id, and the metadata of :meth:`card_metadata` (merged with any
        ``metadata`` given). Other keyword arguments go to ``publish`` (``api``, ``eval_results``, ``private``,
        ``dry_run``/``staging_dir``, ...).
        """
        from hf_longmem import hub

        metadata = {
            **self.card_metadata(max_listed_edits=max_listed_edits),
            **dict(publish_kwargs.pop("metadata", {}) or {}),
        }
        tags = list(publish_kwargs.pop("tags", None) or [])
        publish_kwargs.setdefault("template", "wise")
        if "base_model" not in publish_kwargs:
            name = getattr(self.config, "_name_or_path", None)
            if isinstance(name, str) and name.count("/") == 1 and not os.path.exists(name):
                publish_kwargs["base_model"] = name
        return hub.publish(
            self,
            repo_id,
            metadata=metadata,
            tags=["model-editing", "wise", "continual-learning", *tags],
            **publish_kwargs,
        )
