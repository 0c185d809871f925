"""Memories as model state: a memory's KV states are computed once, stored (safetensors), and spliced into the cache
of a later answer, so answering from memory prefills only the question.

    kv = KVMemory(model, tokenizer)                   # refuses models whose keys cannot be re-rotated
    state = kv.encode("tiger : The pass key is 48213.")      # KVState: ids + per-layer keys/values/positions
    blob = kv.to_bytes(state); kv.from_bytes(blob)           # safetensors, tagged with the model's fingerprint
    text, prefill = kv.generate("System prompt\\n", [state, ...], "\\nQuestion: ...", max_new_tokens=8)

How it is exact: each memory is encoded on its own, at positions ``0..n-1`` (HF caches keys after RoPE). Spliced
after ``L`` cached tokens, its keys are rotated by ``L`` positions with the model's own RoPE
(:class:`hf_longmem.memory.rope.ModelRotary`, the re-rotation StreamingLLM and InfLLM use): since RoPE attention
depends only on relative positions, these are the keys and values the memory's tokens get at positions
``L..L+n-1`` when they attend to themselves only. The answer is therefore *equal* (float tolerance) to one forward
over the same token sequence where each memory block attends causally to itself and the question attends to
everything (:meth:`KVMemory.reference_logits`, the block-attention of Prompt Cache / Block-Attention) — which is
"re-prefilling the same text" with memories encoded independently. The prefix (system prompt) is an ordinary causal
block at positions ``0..P-1`` and is cached once per text.

``encode(text, context=prefix)`` encodes a memory *after* the prompt's prefix instead (positions ``P..P+n-1``,
attending to it, as in a plain prompt). Spliced first after that prefix it needs no rotation, and the answer equals
re-prefilling the plain causal prompt (tested); a second memory is moved by the rotation but still sees the prefix at
the distance it was encoded with, which the plain prompt does not have (an approximation, no equality claimed).

``compress="snapkv"`` (any registered cache name, with its options) encodes a memory through that cache and keeps
only what it retains; the kept slots are moved to contiguous positions when spliced (StreamingLLM's position
shift). That is an approximation by the method's own rule, not an exact equality.

Refused with ``ValueError`` (checked when :class:`KVMemory` is built): caches that are not per-head keys/values
(ALiBi, multi-head latent attention; ``hf_longmem.cache_classes.base.check_cache_layout``), bidirectional or position-bias
attention (``check_model_attention``), RoPE that cannot be re-rotated (absolute positions, dynamic/longrope scaling;
``ModelRotary.from_model``), sliding-window layers (a spliced memory could fall out of the window), and compressing
caches whose state is more than one set of keys/values/positions per layer (DuoAttention's streaming heads, ThinK's
pruned channels, InfLLM/EM-LLM block stores).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from hf_longmem.cache_classes.base import CompressedLayer, check_cache_layout, check_model_attention
from hf_longmem.memory.rope import ModelRotary
from hf_longmem.validation import check_int

__all__ = ["KVMemory", "KVState", "block_attention_mask"]


@dataclass
class KVState:
    """One memory's model state.

    Attributes:
        input_ids: ``[n]`` the memory's tokens.
        keys / values: per decoder layer ``[kv_heads, stored, head_dim]`` (``stored == n`` unless compressed).
        positions: per decoder layer ``[kv_heads, stored]`` int64 position of each slot (``0..n-1``, or
            ``P..P+n-1`` after a ``P``-token context).
    """

    input_ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    #: ``""``, or the hash of the prefix the memory was encoded after (:meth:`KVMemory.encode` ``context=``).
    context: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def stored(self) -> int:
        return int(self.keys[0].shape[-2])


def block_attention_mask(blocks: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive ``[1, 1, T, T]`` mask for consecutive blocks of the given lengths: every block but the last attends
    causally to itself only; the last block (the question) attends causally to everything."""
    total = sum(blocks)
    block_of = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(blocks))  # (T,)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    same = block_of[:, None] == block_of[None, :]
    last = (block_of == len(blocks) - 1)[:, None]
    allowed = causal & (same | last)
    mask = torch.zeros(total, total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def _check_compressor(name: str, cache) -> None:
    """A cache whose retained state is exactly each layer's ``keys`` / ``values`` / ``positions`` (else ValueError:
    a memory read from them would silently lose what the method keeps elsewhere)."""
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, DynamicLayer) and not isinstance(layer, CompressedLayer):
            continue
        extra = [
            n
            for n in getattr(layer, "batch_state", ())
            if n not in ("keys", "values") and ("keys" in n or "values" in n)
        ]
        if not isinstance(layer, CompressedLayer) or extra:
            raise ValueError(
                f"compress={name!r}: its {type(layer).__name__} keeps state beyond one set of keys/values/positions "
                f"({', '.join(extra) or 'a block store or separate memory'}), which a stored memory cannot hold; use "
                "a method that evicts or merges slots (e.g. streaming, snapkv, h2o, sirllm, kvmerger, d2o)"
            )


class KVMemory:
    """Encodes memories into KV states and answers from them without re-prefilling.

    Args:
        model: a transformers causal LM with RoPE.
        tokenizer: its tokenizer.
        compress: a registered cache name (``hf_longmem.available_caches()``) to encode memories through, or ``None``.
        **compress_options: that cache's options (e.g. ``budget=64``).
    """

    def __init__(self, model, tokenizer, *, compress: str | None = None, **compress_options):
        if not hasattr(model, "config") or not callable(tokenizer):
            raise ValueError("`model` must be a transformers model and `tokenizer` its tokenizer")
        config = (
            model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        )
        check_cache_layout(config)
        check_model_attention(model, needs_attention=False)
        layer_types = getattr(config, "layer_types", None) or []
        if any("sliding" in str(t) or "chunked" in str(t) for t in layer_types) or (
            getattr(config, "sliding_window", None)
            and getattr(config, "use_sliding_window", True) is not False
            and not layer_types
        ):
            raise ValueError(
                f"unsupported model: {config.model_type} has sliding-window (or chunked) attention layers; a spliced "
                "memory could fall outside their window, so answers would not equal re-prefilling"
            )
        self.rotary = ModelRotary.from_model(model)  # ValueError where the keys cannot be re-rotated
        if compress is not None:
            from hf_longmem.registry import make_cache

            _check_compressor(compress, make_cache(compress, model, **compress_options))
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.compress = compress
        self.compress_options = dict(compress_options)
        self.num_layers = int(config.num_hidden_layers)
        self.fingerprint = self._fingerprint()
        self._prefixes: dict[str, tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = {}
        #: Tokens run through the model by :meth:`encode` so far (the one-time cost of memories).
        self.encoded_tokens = 0
        #: Tokens the last :meth:`generate` / :meth:`logits` prefilled (the question, and a prefix seen first).
        self.last_prefill_tokens = 0

    def _fingerprint(self) -> str:
        """Identifies the model and encoding (:attr:`fingerprint`): a state from another model or compression is
        refused."""
        payload = {
            "model": getattr(self.config, "_name_or_path", "") or "",
            "type": self.config.model_type,
            "layers": self.num_layers,
            "hidden": getattr(self.config, "hidden_size", None),
            "params": sum(p.numel() for p in self.model.parameters()),
            "weights": float(sum(p.detach().float().sum() for p in self.model.parameters())),
            "compress": self.compress,
            "options": self.compress_options,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _ids(self, text: str, *, special: bool) -> torch.Tensor:
        if not isinstance(text, str):
            raise ValueError(f"expected a string, got {type(text).__name__}")
        return torch.tensor(self.tokenizer(text, add_special_tokens=special)["input_ids"], dtype=torch.long)

    @torch.no_grad()
    def _prefill(self, ids: torch.Tensor, cache) -> None:
        if ids.numel() == 0:
            raise ValueError("cannot encode an empty text")
        self.model(input_ids=ids[None].to(self._device()), cache=cache, use_cache=True)

    @staticmethod
    def context_hash(prefix: str) -> str:
        return hashlib.sha256(prefix.encode()).hexdigest()[:16]

    @torch.no_grad()
    def encode(self, text: str, *, context: str | None = None) -> KVState:
        """The KV states of ``text`` on its own at positions ``0..n-1`` (through ``compress`` if set), or, with
        ``context`` (the prefix it will be spliced after), as it continues that prefix at positions ``P..P+n-1``.

        A memory encoded after the prefix attends to it, as in a plain prompt: spliced first after that prefix, it
        needs no rotation and the answer equals re-prefilling the plain causal prompt; memories spliced after it are
        moved by the re-rotation but keep the prefix as they saw it (an approximation, see the module docstring).
        """
        ids = self._ids(text, special=False)
        skip = 0
        if context is not None:
            if self.compress is not None:
                raise ValueError("`context` cannot be combined with `compress` (the cache would compress the prefix)")
            context_ids = self._ids(context, special=True)
            skip = context_ids.numel()
            ids_run = torch.cat([context_ids, ids])
        else:
            ids_run = ids
        if self.compress is None:
            cache = DynamicCache(config=self.model.config)
        else:
            from hf_longmem.registry import make_cache

            cache = make_cache(self.compress, self.model, **self.compress_options)
        self._prefill(ids_run, cache)
        self.encoded_tokens += ids_run.numel()
        keys, values, positions = [], [], []
        for layer in cache.layers[: self.num_layers]:
            k, v = layer.keys[0][:, skip:], layer.values[0][:, skip:]  # [kv_heads, stored, head_dim]
            pos = getattr(layer, "positions", None)
            if pos is None:
                pos = torch.arange(skip, skip + k.shape[-2], device=k.device).expand(k.shape[0], -1)
            else:
                pos = pos[0].to(torch.long)  # [kv_heads, stored]
            keys.append(k.detach().cpu().contiguous())
            values.append(v.detach().cpu().contiguous())
            positions.append(pos.expand(k.shape[0], -1).cpu().contiguous())
        return KVState(ids, keys, values, positions, "" if context is None else self.context_hash(context))

    def to_bytes(self, state: KVState) -> bytes:
        """``state`` as safetensors bytes, tagged with :attr:`fingerprint`."""
        tensors = {"input_ids": state.input_ids}
        for i in range(len(state.keys)):
            tensors[f"keys.{i}"] = state.keys[i]
            tensors[f"values.{i}"] = state.values[i]
            tensors[f"positions.{i}"] = state.positions[i]
        # safetensors.torch.save takes no metadata on bytes; the fingerprint travels as a uint8 tensor.
        tensors["fingerprint"] = torch.tensor(list(self.fingerprint.encode()), dtype=torch.uint8)
        tensors["context"] = torch.tensor(list(state.context.encode()), dtype=torch.uint8)
        return st_save(tensors)

    def from_bytes(self, data: bytes) -> KVState:
        """A state written by :meth:`to_bytes` of the same model and compression (else ``ValueError``)."""
        tensors = st_load(data)
        tag = bytes(tensors.pop("fingerprint", torch.zeros(0, dtype=torch.uint8)).tolist()).decode(errors="replace")
        if tag != self.fingerprint:
            raise ValueError(
                f"KV state was encoded by another model or compression (fingerprint {tag!r}, this one "
                f"{self.fingerprint!r}); encode the memory again"
            )
        n = self.num_layers
        return KVState(
            tensors["input_ids"],
            [tensors[f"keys.{i}"] for i in range(n)],
            [tensors[f"values.{i}"] for i in range(n)],
            [tensors[f"positions.{i}"] for i in range(n)],
            bytes(tensors.get("context", torch.zeros(0, dtype=torch.uint8)).tolist()).decode(),
        )

    def _prefix_state(self, prefix: str) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], bool]:
        """The prefix's ids and per-layer ``[kv_heads, P, d]`` keys/values (computed once per text)."""
        fresh = prefix not in self._prefixes
        if fresh:
            ids = self._ids(prefix, special=True)
            cache = DynamicCache(config=self.model.config)
            self._prefill(ids, cache)
            self._prefixes[prefix] = (
                ids,
                [layer.keys[0] for layer in cache.layers[: self.num_layers]],
                [layer.values[0] for layer in cache.layers[: self.num_layers]],
            )
        return (*self._prefixes[prefix], fresh)

    def splice(self, prefix: str, states: list[KVState]) -> tuple[DynamicCache, torch.Tensor, int]:
        """A cache holding ``prefix`` then each memory, its slots moved to contiguous positions after what precedes
        it -> ``(cache, ids of the cached slots [L], prefix tokens computed now)``."""
        if not all(isinstance(s, KVState) and len(s.keys) == self.num_layers for s in states):
            raise ValueError(f"`states` must be KVStates of this model ({self.num_layers} layers)")
        if any(s.context and s.context != self.context_hash(prefix) for s in states):
            raise ValueError("a memory was encoded after another prefix (`context`) than the one it is spliced after")
        ids, pre_keys, pre_values, fresh = self._prefix_state(prefix)
        device, dtype = self._device(), pre_keys[0].dtype
        cache = DynamicCache(config=self.model.config)
        offsets, start = [], ids.numel()
        for state in states:
            offsets.append(start)
            start += state.stored
        for layer in range(self.num_layers):
            keys, values = [pre_keys[layer]], [pre_values[layer]]
            rotation = self.rotary.for_layer(layer)
            for state, offset in zip(states, offsets):
                k = state.keys[layer].to(device=device, dtype=dtype)[None]  # [1, kv_heads, s, d]
                target = offset + torch.arange(state.stored, device=device)
                delta = (target - state.positions[layer].to(device))[None]  # [1, kv_heads, s]
                keys.append(rotation.rotate(k, delta)[0])
                values.append(state.values[layer].to(device=device, dtype=dtype))
            cache.update(torch.cat(keys, dim=-2)[None], torch.cat(values, dim=-2)[None], layer)
        # The tokens of the kept slots (positions count from the context's length for a memory encoded after one).
        kept_ids = [ids] + [s.input_ids[s.positions[0][0] - (s.positions[0][0][0] if s.context else 0)] for s in states]
        return cache, torch.cat(kept_ids), ids.numel() if fresh else 0

    @torch.no_grad()
    def logits(self, prefix: str, states: list[KVState], suffix: str) -> torch.Tensor:
        """``[len(suffix tokens), vocab]`` logits of the suffix read over the spliced cache."""
        cache, cached, prefix_cost = self.splice(prefix, states)
        suffix_ids = self._ids(suffix, special=False)
        if suffix_ids.numel() == 0:
            raise ValueError("`suffix` must not be empty")
        length = cached.numel()
        device = self._device()
        out = self.model(
            input_ids=suffix_ids[None].to(device),
            cache=cache,
            position_ids=torch.arange(length, length + suffix_ids.numel(), device=device)[None],
            attention_mask=torch.ones(1, length + suffix_ids.numel(), dtype=torch.long, device=device),
            use_cache=True,
        )
        self.last_prefill_tokens = prefix_cost + suffix_ids.numel()
        return out.logits[0]

    @torch.no_grad()
    def reference_logits(self, prefix: str, texts: list[str], suffix: str) -> torch.Tensor:
        """The same suffix logits by re-prefilling everything in one forward (memories as independent blocks)."""
        parts = [self._ids(prefix, special=True), *(self._ids(t, special=False) for t in texts)]
        suffix_ids = self._ids(suffix, special=False)
        ids = torch.cat([*parts, suffix_ids])
        dtype = next(self.model.parameters()).dtype
        mask = block_attention_mask([p.numel() for p in parts] + [suffix_ids.numel()], dtype).to(self._device())
        out = self.model(input_ids=ids[None].to(self._device()), attention_mask=mask, use_cache=False)
        self.last_prefill_tokens = ids.numel()
        return out.logits[0, -suffix_ids.numel() :]

    @torch.no_grad()
    def generate(self, prefix: str, states: list[KVState], suffix: str, max_new_tokens: int) -> tuple[str, int]:
        """Greedy answer over the spliced cache -> ``(text, tokens prefilled for it)``."""
        from hf_longmem.evals.profiling import greedy_generate

        check_int("max_new_tokens", max_new_tokens, low=1)
        cache, cached, prefix_cost = self.splice(prefix, states)
        suffix_ids = self._ids(suffix, special=False)
        if suffix_ids.numel() == 0:
            raise ValueError("`suffix` must not be empty")
        out = greedy_generate(
            self.model,
            suffix_ids[None].to(self._device()),
            cache,
            max_new_tokens=max_new_tokens,
            past_length=cached.numel(),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self.last_prefill_tokens = prefix_cost + suffix_ids.numel()
        tokens = out.sequences[0, : out.lengths[0]]
        return self.tokenizer.decode(tokens, skip_special_tokens=True), self.last_prefill_tokens
