"""Configuration of WISE model editing (Wang et al., NeurIPS 2024, arXiv 2405.14768).

:class:`WISEConfig` holds every hyperparameter of the editor. Defaults are those of EasyEdit's
``hparams/WISE/llama-7b.yaml`` (also used for Mistral-7B, Qwen2.5-7B and Llama-3.2-3B): ``edit_lr=1.0``,
``n_iter=70``, ``act_margin=(5, 20, 10)``, ``act_ratio=0.88``, ``mask_ratio=0.2``, ``save_freq=500``,
``merge_freq=1000``, TIES merging with density 0.53 and weight 1.0, ``norm_constraint=1.0``, ``retrieve=True``
(WISE-Retrieve; ``retrieve=False`` is WISE-Merge). :meth:`WISEConfig.from_easyedit_yaml` reads EasyEdit's YAML
files directly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MERGE_ALGORITHMS", "WISEConfig"]

#: Merge algorithms of :func:`hf_longmem.editing.merging.merge_task_vectors` (names as in EasyEdit).
MERGE_ALGORITHMS: tuple[str, ...] = (
    "ties",
    "magnitude_norm",
    "magnitude",
    "sign",
    "dare_ties",
    "dare_linear",
    "linear",
)
_ROUTING_SCORES = ("easyedit", "paper")
_ROUTE_ON_GENERATE = ("prompt", "every_step")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class WISEConfig:
    """Hyperparameters of :class:`~hf_longmem.editing.WISEEditor`.

    Which weight is duplicated:

    Attributes:
        target_module: full name of the FFN output projection to duplicate, e.g.
            ``"model.layers.27.mlp.down_proj"``. ``None``: chosen from ``layer``.
        layer: index of the decoder layer whose FFN output projection (``mlp.down_proj``, ``mlp.fc_out``,
            ``mlp.c_proj``, ``mlp.dense_4h_to_h``, ``fc2``, ...) is duplicated. ``None`` (and no ``target_module``):
            the EasyEdit layer for the checkpoints it ships YAML files for, else ``floor(0.85 * num_layers)``
            (see :func:`hf_longmem.editing.side_memory.default_layer`).

    Training one edit (paper Eq. 5; EasyEdit ``WISE.edit``):

    Attributes:
        edit_lr: SGD learning rate on the side memory.
        n_iter: most optimisation steps per edit.
        act_margin: ``(alpha, beta, gamma)`` of the routing margin losses: irrelevant activations below alpha,
            edit activations above beta, and edit minus irrelevant above gamma.
        norm_constraint: after each step the side memory is clamped elementwise to ``W_main +- norm_constraint``;
            ``None`` disables the clamp.
        weight_decay: SGD weight decay of the side memory (applied only to the entries the shard's mask trains).
        early_stop_loss, early_stop_tol: an edit stops early once its loss is at most ``early_stop_loss`` and moved
            by at most ``early_stop_tol`` since the previous step (EasyEdit: 0.02 and 1e-4).
        context_templates: templates with one ``"{}"`` (where the prompt goes) whose rows are trained together
            for each edit. ``None``: like EasyEdit, ``"{}"`` plus 10 prefixes the model generates greedily itself
            (5 and 10 new tokens from 5 seed words the tokenizer knows). ``[]`` or ``["{}"]``: the prompt alone.
        target_separator: text between prompt and target (``prompt + target_separator + target``); EasyEdit
            joins them with one space.
        train_on_paraphrases: also train on the paraphrases passed to ``edit`` (as extra in-scope rows). EasyEdit
            uses paraphrases for evaluation only; keep False when reporting generalization on them.

    Routing (paper Sec. 3.2; EasyEdit ``WISEAdapter.forward``):

    Attributes:
        act_ratio: a memory is used when its activation score reaches ``act_ratio`` times the smallest score its
            edits had right after being written.
        routing_score: ``"easyedit"`` scores ``|| act_fn(W' x) - act_fn(W x) ||_2`` per token (EasyEdit's ``euc``
            with the model's ``hidden_act``); ``"paper"`` scores ``|| x (W' - W)^T ||_2`` (the paper's formula,
            no activation function).
        max_pool_above: at inference, sequences with more valid tokens than this are scored by the max over tokens
            instead of the mean (EasyEdit uses 100); ``None`` always uses the mean.
        route_on_generate: ``"prompt"``: during generation the route decided on the prompt (when the cache is
            empty) is kept for the generated tokens, i.e. for every later forward that extends the same cache
            object; ``"every_step"``: every forward is routed again on its own tokens (EasyEdit, where a decode step
            is routed on one token). With ``use_cache=False`` each forward sees the whole sequence and is routed on it.

    Knowledge sharding and merging (paper Sec. 3.3):

    Attributes:
        mask_ratio: fraction of the side memory's entries a shard trains (a fresh random gradient mask per shard).
        save_freq: edits per shard; a full shard is stored and a fresh one starts from the main memory.
        merge_freq: every ``merge_freq`` edits the stored shards are merged (a multiple of ``save_freq``).
        retrieve: True: WISE-Retrieve (each merge of ``merge_freq // save_freq`` shards becomes one more side
            memory, routed by top-1 activation); False: WISE-Merge (shards merged into one side memory).
        merge_alg: one of :data:`MERGE_ALGORITHMS` (EasyEdit default ``"ties"``).
        densities: fraction of each shard's task vector kept by magnitude (or at random for ``dare_*``) when merging.
        weights: total weight of a merge group (each shard gets ``weights / k``).
        replay: WISE-Retrieve only (paper App. B.3, EasyEdit ``replay``): once a merge happened, each step also
            pushes the activation of the shard being edited below ``replay_margins[0]`` on one past edit of every
            earlier merge group (taken in turn) and above ``replay_margins[1]`` on a random edit of the current
            group, so that a new memory does not claim older edits. Costs one more forward per step over one edit
            per earlier merge group (its template rows), so time per edit grows with the number of merges.
        replay_margins: ``(ceiling on past edits, floor on current edits)``; EasyEdit hard-codes ``(5, 20)``.
        seed: seeds the gradient masks, the random merges (``dare_*``) and replay's choices: reproducible edits.
    """

    target_module: str | None = None
    layer: int | None = None
    edit_lr: float = 1.0
    n_iter: int = 70
    act_margin: tuple[float, float, float] = (5.0, 20.0, 10.0)
    act_ratio: float = 0.88
    mask_ratio: float = 0.2
    save_freq: int = 500
    merge_freq: int = 1000
    retrieve: bool = True
    merge_alg: str = "ties"
    densities: float = 0.53
    weights: float = 1.0
    norm_constraint: float | None = 1.0
    weight_decay: float = 1e-5
    early_stop_loss: float = 0.02
    early_stop_tol: float = 1e-4
    routing_score: str = "easyedit"
    max_pool_above: int | None = 100
    route_on_generate: str = "prompt"
    context_templates: list[str] | None = None
    target_separator: str = " "
    train_on_paraphrases: bool = False
    replay: bool = False
    replay_margins: tuple[float, float] = (5.0, 20.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.act_margin, list):
            self.act_margin = tuple(self.act_margin)
        if isinstance(self.replay_margins, list):
            self.replay_margins = tuple(self.replay_margins)
        if isinstance(self.context_templates, tuple):
            self.context_templates = list(self.context_templates)
        self.validate()

    # ------------------------------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every field; raises ``ValueError`` naming the first bad one."""
        if self.target_module is not None and (not isinstance(self.target_module, str) or not self.target_module):
            raise ValueError(
                f"target_module must be a module name such as 'model.layers.27.mlp.down_proj' or None, "
                f"got {self.target_module!r}."
            )
        if self.layer is not None and (not isinstance(self.layer, int) or isinstance(self.layer, bool)):
            raise ValueError(f"layer must be an int or None, got {self.layer!r}.")
        if self.target_module is not None and self.layer is not None:
            raise ValueError("give either target_module or layer, not both.")
        for name in ("edit_lr", "act_ratio", "densities", "weights"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if not 0.0 < self.densities <= 1.0:
            raise ValueError(f"densities must be in (0, 1], got {self.densities!r}.")
        if not _is_number(self.mask_ratio) or not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio!r}.")
        for name in ("n_iter", "save_freq", "merge_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.merge_freq % self.save_freq:
            raise ValueError(f"merge_freq ({self.merge_freq}) must be a multiple of save_freq ({self.save_freq}).")
        if (
            not isinstance(self.act_margin, tuple)
            or len(self.act_margin) != 3
            or not all(_is_number(v) and v >= 0 for v in self.act_margin)
        ):
            raise ValueError(
                f"act_margin must be three non-negative numbers (alpha, beta, gamma), got {self.act_margin!r}."
            )
        self.act_margin = tuple(float(v) for v in self.act_margin)
        if self.norm_constraint is not None and (not _is_number(self.norm_constraint) or self.norm_constraint <= 0):
            raise ValueError(f"norm_constraint must be a positive number or None, got {self.norm_constraint!r}.")
        for name in ("weight_decay", "early_stop_loss", "early_stop_tol"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}.")
        if self.merge_alg not in MERGE_ALGORITHMS:
            raise ValueError(f"merge_alg must be one of {list(MERGE_ALGORITHMS)}, got {self.merge_alg!r}.")
        if self.routing_score not in _ROUTING_SCORES:
            raise ValueError(f"routing_score must be one of {list(_ROUTING_SCORES)}, got {self.routing_score!r}.")
        if self.route_on_generate not in _ROUTE_ON_GENERATE:
            raise ValueError(
                f"route_on_generate must be one of {list(_ROUTE_ON_GENERATE)}, got {self.route_on_generate!r}."
            )
        if self.max_pool_above is not None and (
            not isinstance(self.max_pool_above, int) or isinstance(self.max_pool_above, bool) or self.max_pool_above < 1
        ):
            raise ValueError(f"max_pool_above must be a positive int or None, got {self.max_pool_above!r}.")
        if self.context_templates is not None:
            if isinstance(self.context_templates, str) or not isinstance(self.context_templates, list):
                raise ValueError(
                    f"context_templates must be a list of strings with one '{{}}' each, or None, got "
                    f"{self.context_templates!r}."
                )
            for template in self.context_templates:
                if not isinstance(template, str) or template.count("{}") != 1:
                    raise ValueError(f"context_templates: each template needs exactly one '{{}}', got {template!r}.")
        if not isinstance(self.target_separator, str):
            raise ValueError(f"target_separator must be a string, got {self.target_separator!r}.")
        if (
            not isinstance(self.replay_margins, tuple)
            or len(self.replay_margins) != 2
            or not all(_is_number(v) and v >= 0 for v in self.replay_margins)
        ):
            raise ValueError(f"replay_margins must be two non-negative numbers, got {self.replay_margins!r}.")
        self.replay_margins = tuple(float(v) for v in self.replay_margins)
        for name in ("retrieve", "train_on_paraphrases", "replay"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if self.replay and not self.retrieve:
            raise ValueError("replay=True applies to WISE-Retrieve: set retrieve=True (EasyEdit ignores it otherwise).")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}.")

    @property
    def alpha(self) -> float:
        """Irrelevant-activation ceiling (first entry of ``act_margin``)."""
        return self.act_margin[0]

    @property
    def beta(self) -> float:
        """Edit-activation floor (second entry of ``act_margin``)."""
        return self.act_margin[1]

    @property
    def gamma(self) -> float:
        """Margin between edit and irrelevant activations (third entry of ``act_margin``)."""
        return self.act_margin[2]

    @property
    def shards_per_merge(self) -> int:
        """``k = merge_freq // save_freq``: shards merged together."""
        return self.merge_freq // self.save_freq

    @property
    def variant(self) -> str:
        """``"WISE-Retrieve"`` or ``"WISE-Merge"``."""
        return "WISE-Retrieve" if self.retrieve else "WISE-Merge"

    # ------------------------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields (``act_margin`` as a list)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["act_margin"] = list(self.act_margin)
        out["replay_margins"] = list(self.replay_margins)
        if self.context_templates is not None:
            out["context_templates"] = list(self.context_templates)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WISEConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"WISEConfig.from_dict needs a dict, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown WISEConfig keys {unknown}; known: {sorted(names)}.")
        return cls(**dict(data))

    @classmethod
    def from_easyedit_yaml(cls, path: str | os.PathLike, **overrides: Any) -> WISEConfig:
        """Read an EasyEdit ``hparams/WISE/*.yaml`` file.

        Mapped keys: ``inner_params`` (``model.layers[27].mlp.down_proj.weight`` -> ``target_module``),
        ``edit_lr``, ``n_iter``, ``act_margin``, ``act_ratio``, ``mask_ratio``, ``save_freq``, ``merge_freq``,
        ``merge_alg``, ``densities``, ``weights``, ``norm_constraint``, ``retrieve``. Ignored: device, model/
        tokenizer names, ``alg_name``, ``batch_size`` (1), ``sequential_edit``, ``model_parallel``, paths,
        ``use_chat_template``. ``replay`` is kept (it applies with ``retrieve: true``); ``objective_optimization``
        other than ``only_label`` is not supported (``ValueError``).

        Args:
            path: the YAML file.
            **overrides: fields set after reading (e.g. ``retrieve=False``).
        """
        import yaml

        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{str(path)!r} is not a YAML mapping.")
        objective = data.get("objective_optimization", "only_label")
        if objective != "only_label":
            raise ValueError(f"{str(path)!r}: objective_optimization={objective!r}; only 'only_label' is supported.")
        kwargs: dict[str, Any] = {}
        inner = data.get("inner_params")
        if inner:
            name = inner[0] if isinstance(inner, Sequence) and not isinstance(inner, str) else inner
            name = str(name).replace("[", ".").replace("]", "")
            for suffix in (".weight", ".bias"):
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
            kwargs["target_module"] = name
        for key in (
            "edit_lr",
            "n_iter",
            "act_ratio",
            "mask_ratio",
            "save_freq",
            "merge_freq",
            "merge_alg",
            "densities",
            "weights",
            "retrieve",
            "replay",
        ):
            if data.get(key) is not None:
                kwargs[key] = data[key]
        if data.get("act_margin") is not None:
            kwargs["act_margin"] = tuple(float(v) for v in data["act_margin"])
        if "norm_constraint" in data:
            value = data["norm_constraint"]
            kwargs["norm_constraint"] = None if value in (None, False) else float(value)
        for key in ("edit_lr", "act_ratio", "mask_ratio", "densities", "weights"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        kwargs.update(overrides)
        if kwargs.get("replay") and kwargs.get("retrieve") is False and "replay" not in overrides:
            kwargs["replay"] = False  # EasyEdit ignores replay in merge mode
        if "layer" in overrides and "target_module" not in overrides:
            kwargs.pop("target_module", None)
        return cls(**kwargs)
