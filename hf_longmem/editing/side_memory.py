"""The WISE side memory: a module that replaces one FFN output projection and routes each sequence.

:class:`WISELayer` takes the place of the chosen projection (``mlp.down_proj`` of Llama/Mistral/Qwen2,
``mlp.fc_out`` of GPT-J, ``mlp.c_proj`` of GPT-2, ...). It registers the original ``weight``/``bias`` Parameters
under the same names, so the model's ``state_dict`` keys, ``save_pretrained`` and parameter count are unchanged and
the main memory stays frozen and untouched; the side memories are non-persistent buffers (saved only by
:meth:`hf_longmem.editing.WISEEditor.save_pretrained`).

Side memories held, in the layout of the original weight (``(out, in)`` for ``nn.Linear``, ``(in, out)`` for GPT-2's
``Conv1D``):

- ``shard``: the shard being edited (a copy of the main memory until its first edit);
- ``pending.{i}``: full shards waiting for the next merge (every ``save_freq`` edits a shard is stored);
- WISE-Merge: ``merged``, the TIES merge of all merged shards;
- WISE-Retrieve: ``memory.{i}``, one TIES merge per group of ``merge_freq // save_freq`` shards, each with the
  smallest edit score of its group as threshold base.

Until the scheduled merge, stored shards are routed like memories. EasyEdit instead merges them lazily on the first
forward after editing (and in merge mode cannot reach them before); doing it here would make inference change the
weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .config import WISEConfig
from .merging import merge_task_vectors
from .routing import MAIN, RouteContext, RouteMemo, activation_scores, choose_routes, token_scores

__all__ = ["EASYEDIT_LAYERS", "WISELayer", "default_layer", "find_ffn_output_modules", "resolve_target_module"]

#: Relative names (inside a decoder layer) of FFN output projections, by architecture family.
FFN_OUTPUT_NAMES: tuple[str, ...] = (
    "mlp.down_proj",  # Llama, Mistral, Qwen2, Gemma, Phi-3, ...
    "mlp.fc_out",  # GPT-J
    "mlp.c_proj",  # GPT-2 (Conv1D)
    "mlp.dense_4h_to_h",  # GPT-NeoX, Falcon
    "mlp.fc2",  # Phi
    "fc2",  # OPT
    "feed_forward.w2",  # InternLM-style
    "mlp.w2",
)
_LAYER_PATTERN = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")

#: Layers of EasyEdit's ``hparams/WISE`` files: (model_type, num_hidden_layers, hidden_size, intermediate_size or
#: None for any) -> layer index.
EASYEDIT_LAYERS: dict[tuple[str, int, int, int | None], int] = {
    ("llama", 32, 4096, 11008): 27,  # llama-7b (Llama-2-7B)
    ("llama", 32, 4096, 14336): 29,  # llama3-8b
    ("llama", 28, 3072, 8192): 27,  # llama3.2-3b
    ("mistral", 32, 4096, 14336): 27,  # mistral-7b
    ("qwen2", 28, 3584, 18944): 23,  # qwen2.5-7b
    ("gptj", 28, 4096, None): 21,  # gpt-j-6B (mlp.fc_out)
    ("gpt2", 48, 1600, None): 8,  # gpt2-xl (EasyEdit edits c_fc there; we edit the output projection c_proj)
}


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module) or isinstance(module, WISELayer)


def find_ffn_output_modules(model: nn.Module) -> dict[int, str]:
    """Layer index -> full name of its FFN output projection, found by name (see :data:`FFN_OUTPUT_NAMES`).

    Raises:
        ValueError: no decoder layer with a known FFN output projection (pass ``target_module``).
    """
    found: dict[int, str] = {}
    prefixes: set[str] = set()
    for name, module in model.named_modules():
        match = _LAYER_PATTERN.match(name)
        if match is None or match["rest"] not in FFN_OUTPUT_NAMES or not _is_projection(module):
            continue
        prefixes.add(match["prefix"])
        found.setdefault(int(match["index"]), name)
    if not found:
        raise ValueError(
            f"could not find an FFN output projection ({', '.join(FFN_OUTPUT_NAMES)}) in the decoder layers of "
            f"{type(model).__name__}; pass WISEConfig(target_module='<full module name>')."
        )
    if len(prefixes) > 1:
        raise ValueError(
            f"found FFN output projections under several layer lists {sorted(prefixes)}; pass "
            "WISEConfig(target_module=...)."
        )
    return dict(sorted(found.items()))


def default_layer(model: nn.Module, num_layers: int) -> int:
    """The layer WISE edits by default.

    EasyEdit's layer for the checkpoints it ships a YAML file for (:data:`EASYEDIT_LAYERS`, matched on the config's
    model type, depth, hidden and intermediate sizes), else ``min(num_layers - 1, floor(0.85 * num_layers))``:
    a late layer, which gives EasyEdit's choice for Llama-2-7B / Mistral-7B (27 of 32) and Qwen2.5-7B (23 of 28).
    For GPT-2 XL EasyEdit edits ``mlp.c_fc`` (the FFN *input* projection) of layer 8; we keep the layer but edit the
    output projection ``mlp.c_proj``, the value matrix the paper duplicates.
    """
    config = getattr(model, "config", None)
    if config is not None:
        model_type = getattr(config, "model_type", None)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        inter = getattr(config, "intermediate_size", None)
        for (mtype, layers, hsize, isize), layer in EASYEDIT_LAYERS.items():
            if mtype == model_type and layers == num_layers and hsize == hidden and isize in (None, inter):
                return layer
    return min(num_layers - 1, math.floor(0.85 * num_layers))


def resolve_target_module(model: nn.Module, config: WISEConfig) -> str:
    """Full name of the module to duplicate, from ``config.target_module`` / ``config.layer`` / the default rule.

    Raises:
        ValueError: the module does not exist, is not a linear projection, or ``layer`` is out of range.
    """
    modules = dict(model.named_modules())
    if config.target_module is not None:
        name = config.target_module
        for suffix in (".weight", ".bias"):
            if name.endswith(suffix) and name not in modules:
                name = name[: -len(suffix)]
        if name not in modules:
            raise ValueError(f"target_module={config.target_module!r} is not a module of {type(model).__name__}.")
        if not _is_projection(modules[name]):
            raise ValueError(
                f"target_module={name!r} is a {type(modules[name]).__name__}; WISE duplicates an nn.Linear "
                "(or GPT-2 Conv1D) FFN output projection."
            )
        return name
    layers = find_ffn_output_modules(model)
    num_layers = max(layers) + 1
    if config.layer is not None:
        if config.layer not in layers:
            index = config.layer + num_layers if config.layer < 0 else config.layer
            if index not in layers:
                raise ValueError(f"layer={config.layer} is out of range: the model has layers 0..{num_layers - 1}.")
            return layers[index]
        return layers[config.layer]
    return layers[default_layer(model, num_layers)]


def resolve_act_fn(model: nn.Module, config: WISEConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation function of ``"easyedit"`` routing scores (``None`` for ``"paper"``)."""
    if config.routing_score == "paper":
        return None
    from transformers.activations import ACT2FN

    model_config = getattr(model, "config", None)
    name = getattr(model_config, "hidden_act", None) or getattr(model_config, "activation_function", None)
    if name is None or name not in ACT2FN:
        raise ValueError(
            f"routing_score='easyedit' needs the model config's hidden_act/activation_function (got {name!r}); "
            "use WISEConfig(routing_score='paper')."
        )
    return ACT2FN[name]


class WISELayer(nn.Module):
    """Main memory plus side memories, with per-sequence routing.

    Args:
        base: the original projection (``nn.Linear`` or GPT-2 ``Conv1D``); its Parameters are reused, not copied.
        config: the editor's configuration.
        act_fn: activation of ``"easyedit"`` scores, ``None`` for ``"paper"`` scores.

    Shapes: input ``(B, T, in)`` (or ``(T, in)``, treated as one sequence), output ``(B, T, out)``.
    """

    def __init__(self, base: nn.Module, config: WISEConfig, act_fn: Callable | None):
        super().__init__()
        if not (isinstance(base, nn.Linear) or _is_conv1d(base)):
            raise ValueError(f"WISELayer wraps an nn.Linear or Conv1D, got {type(base).__name__}.")
        self.weight = base.weight
        self.bias = base.bias
        self.transposed = _is_conv1d(base)
        self.in_features = base.weight.shape[0] if self.transposed else base.weight.shape[1]
        self.out_features = base.weight.shape[1] if self.transposed else base.weight.shape[0]
        self._original = (base,)  # not registered: its Parameters are ours
        self.wise_config = config
        self.act_fn = act_fn
        # --- side memories and their bookkeeping ---
        self.register_buffer("shard", base.weight.detach().clone(), persistent=False)
        self.shard_scores: list[float] = []
        self.pending_names: list[str] = []
        self.pending_scores: list[list[float]] = []
        self.memory_names: list[str] = []
        self.memory_min_scores: list[float] = []
        self.has_merged = False
        self.num_edits = 0
        self.num_merges = 0
        self.global_min_score = math.inf  # WISE-Merge: smallest score of every edit so far (EasyEdit never resets it)
        # --- runtime state ---
        self.disabled = False
        self.editing = False
        self.train_weight: torch.Tensor | None = None
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None
        self.context = RouteContext()
        self.memo = RouteMemo()
        self.last_routes: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------------------------
    # Linear algebra

    @property
    def original(self) -> nn.Module:
        """The projection this layer replaced (same Parameters)."""
        return self._original[0]

    def project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` through ``weight`` (in the original layout) plus the original bias: ``(..., in) -> (..., out)``.

        EasyEdit computes side outputs without the bias (``F.linear(x, new_weight)``), which for biased projections
        (GPT-J ``fc_out``) shifts every side output by ``-b``; the bias is shared here.
        """
        weight = weight.to(x.dtype)
        if self.transposed:
            out = x @ weight
            return out + self.bias.to(x.dtype) if self.bias is not None else out
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    # ------------------------------------------------------------------------------------------------------------------
    # Memories

    def _new_name(self, prefix: str) -> str:
        index = 0
        while f"{prefix}_{index}" in self._buffers:
            index += 1
        return f"{prefix}_{index}"

    def shard_has_edits(self) -> bool:
        return len(self.shard_scores) > 0

    def candidates(self) -> list[tuple[str, torch.Tensor, float]]:
        """Side memories that can be routed to: ``(label, weight, threshold)``, in a fixed order."""
        ratio = self.wise_config.act_ratio
        out: list[tuple[str, torch.Tensor, float]] = []
        if not self.wise_config.retrieve:
            threshold = self.global_min_score * ratio
            if self.has_merged:
                out.append(("merged", self._buffers["merged"], threshold))
            for i, name in enumerate(self.pending_names):
                out.append((f"pending.{i}", self._buffers[name], threshold))
            if self.shard_has_edits():
                out.append(("shard", self.shard, threshold))
            return out
        if self.shard_has_edits():
            out.append(("shard", self.shard, min(self.shard_scores) * ratio))
        for i, (name, scores) in enumerate(zip(self.pending_names, self.pending_scores)):
            out.append((f"pending.{i}", self._buffers[name], min(scores) * ratio))
        for i, (name, score) in enumerate(zip(self.memory_names, self.memory_min_scores)):
            out.append((f"memory.{i}", self._buffers[name], score * ratio))
        return out

    def add_edit_score(self, score: float) -> None:
        """Record the in-scope score of an edit just written into the shard."""
        self.shard_scores.append(float(score))
        self.global_min_score = min(self.global_min_score, float(score))

    def finish_edit(self, generator: torch.Generator | None = None) -> list[str]:
        """Count one edit; store the shard every ``save_freq`` edits and merge every ``merge_freq`` edits.

        Returns:
            the events that happened (``"saved shard"``, ``"merged"``).
        """
        events: list[str] = []
        self.num_edits += 1
        config = self.wise_config
        if self.num_edits % config.save_freq == 0:
            name = self._new_name("pending")
            self.register_buffer(name, self.shard.clone(), persistent=False)
            self.pending_names.append(name)
            self.pending_scores.append(list(self.shard_scores))
            self.shard.copy_(self.weight.detach())
            self.shard_scores = []
            events.append("saved shard")
        if self.num_edits % config.merge_freq == 0 and self.pending_names:
            self.merge_pending(generator)
            events.append("merged")
        return events

    def merge_pending(self, generator: torch.Generator | None = None) -> None:
        """Merge the stored shards (WISE-Merge: into ``merged``; WISE-Retrieve: into a new memory)."""
        config = self.wise_config
        shards = [self._buffers[name] for name in self.pending_names]
        k = len(shards)
        base = self.weight.detach()
        if not config.retrieve:
            if self.has_merged:
                # EasyEdit's later merges: the new shards at 0.4 / k each, the previous merged memory at 0.6.
                tensors = [*shards, self._buffers["merged"]]
                weights = [0.4 / k] * k + [0.6]
            else:
                tensors, weights = shards, [config.weights / k] * k
            merged = merge_task_vectors(
                base, tensors, weights, algorithm=config.merge_alg, density=config.densities, generator=generator
            )
            self.register_buffer("merged", merged, persistent=False)
            self.has_merged = True
        else:
            merged = merge_task_vectors(
                base,
                shards,
                [config.weights / k] * k,
                algorithm=config.merge_alg,
                density=config.densities,
                generator=generator,
            )
            name = self._new_name("memory")
            self.register_buffer(name, merged, persistent=False)
            self.memory_names.append(name)
            self.memory_min_scores.append(min(min(s) for s in self.pending_scores))
        for name in self.pending_names:
            del self._buffers[name]
        self.pending_names, self.pending_scores = [], []
        self.num_merges += 1
        self.memo.clear()

    # ------------------------------------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.project(x, self.weight)
        if self.disabled:
            return main
        if self.editing:
            if self.train_weight is None:
                raise RuntimeError("WISELayer.editing is set but no train_weight was given.")
            side = self.project(x, self.train_weight)
            self.recorded = (main, side)
            return side
        candidates = self.candidates()
        if not candidates:
            return main
        squeeze = x.dim() == 2
        if squeeze:
            x, main = x.unsqueeze(0), main.unsqueeze(0)
        batch, length = x.shape[0], x.shape[1]
        context = self.context
        outputs: dict[int, torch.Tensor] = {}
        memo_ok = self.wise_config.route_on_generate == "prompt" and self.memo.matches(context, batch)
        if memo_ok and self.memo.extra.get("num_candidates") == len(candidates):
            routes = self.memo.routes.to(x.device)
        else:
            mask = context.attention_mask
            if mask is not None and (mask.shape[0] != batch or mask.shape[1] < length):
                mask = None
            if mask is not None:
                mask = mask[:, -length:]
            scores = []
            for k, (_, weight, _) in enumerate(candidates):
                outputs[k] = self.project(x, weight)
                per_token = token_scores(main, outputs[k], self.act_fn)
                scores.append(activation_scores(per_token, mask, max_pool_above=self.wise_config.max_pool_above))
            score_tensor = torch.stack(scores)  # (K, B)
            thresholds = torch.tensor([c[2] for c in candidates], dtype=torch.float32, device=x.device)
            routes = choose_routes(score_tensor, thresholds)
            self.last_scores = score_tensor.detach()
            if not context.continuation:
                self.memo.routes = routes.detach()
                self.memo.cache_ref = context.cache_ref
                self.memo.extra = {"num_candidates": len(candidates)}
        self.last_routes = routes.detach()
        out = main
        for k in torch.unique(routes).tolist():
            if k == MAIN:
                continue
            rows = routes == k
            side = outputs[k][rows] if k in outputs else self.project(x[rows], candidates[k][1])
            if out is main:
                out = main.clone()
            out[rows] = side
        return out.squeeze(0) if squeeze else out

    # ------------------------------------------------------------------------------------------------------------------
    # Serialization helpers

    def memory_tensors(self) -> dict[str, torch.Tensor]:
        """Side memories to save: ``shard``, ``pending.{i}``, ``merged``, ``memory.{i}`` (original layout)."""
        out = {"shard": self.shard}
        for i, name in enumerate(self.pending_names):
            out[f"pending.{i}"] = self._buffers[name]
        if self.has_merged:
            out["merged"] = self._buffers["merged"]
        for i, name in enumerate(self.memory_names):
            out[f"memory.{i}"] = self._buffers[name]
        return out

    def routing_state(self) -> dict[str, Any]:
        """JSON-ready bookkeeping (edit counts and the scores thresholds come from)."""
        return {
            "num_edits": self.num_edits,
            "num_merges": self.num_merges,
            "shard_scores": list(self.shard_scores),
            "pending_scores": [list(s) for s in self.pending_scores],
            "memory_min_scores": list(self.memory_min_scores),
            "has_merged": self.has_merged,
            "global_min_score": None if math.isinf(self.global_min_score) else self.global_min_score,
        }

    def load_memories(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restore what :meth:`memory_tensors` and :meth:`routing_state` returned (shapes checked by the caller)."""
        device, dtype = self.weight.device, self.weight.dtype
        for name in [*self.pending_names, *self.memory_names, *(["merged"] if self.has_merged else [])]:
            del self._buffers[name]
        self.shard.copy_(tensors["shard"].to(device=device, dtype=dtype))
        num_pending = len(state["pending_scores"])
        num_memories = len(state["memory_min_scores"])
        self.pending_names, self.memory_names = [], []
        for i in range(num_pending):
            name = self._new_name("pending")
            self.register_buffer(name, tensors[f"pending.{i}"].to(device=device, dtype=dtype), persistent=False)
            self.pending_names.append(name)
        for i in range(num_memories):
            name = self._new_name("memory")
            self.register_buffer(name, tensors[f"memory.{i}"].to(device=device, dtype=dtype), persistent=False)
            self.memory_names.append(name)
        self.has_merged = bool(state["has_merged"])
        if self.has_merged:
            self.register_buffer("merged", tensors["merged"].to(device=device, dtype=dtype), persistent=False)
        self.shard_scores = [float(s) for s in state["shard_scores"]]
        self.pending_scores = [[float(s) for s in group] for group in state["pending_scores"]]
        self.memory_min_scores = [float(s) for s in state["memory_min_scores"]]
        self.num_edits = int(state["num_edits"])
        self.num_merges = int(state["num_merges"])
        score = state.get("global_min_score")
        self.global_min_score = math.inf if score is None else float(score)
        self.memo.clear()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, variant={self.wise_config.variant}, "
            f"edits={self.num_edits}, memories={len(self.candidates())}"
        )
