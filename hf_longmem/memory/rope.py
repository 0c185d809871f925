"""Re-rotating cached keys to new RoPE positions, derived from the model's own RoPE.

HF models cache keys *after* RoPE. Moving a key cached at position ``p`` to ``p + delta`` is one more rotation by
``delta`` — and "rotating by ``delta``" is exactly what the model's own code computes for a token at position
``delta``: ``cos, sin = rotary_emb(x, delta)``, ``apply_rotary_pos_emb(q, k, cos, sin)``. Using the model's rotary
module and the ``apply_rotary_pos_emb`` of its attention's own module (looked up in
``sys.modules[type(attention).__module__]``) makes the rotation right for every layout by construction: rotate-half
(Llama), interleaved pairs (Cohere, GLM, GPT-J, ERNIE-4.5), partial rotary (Phi, StableLM, GPT-NeoX, GLM), half-width
tables (GPT-OSS) and per-layer-type frequencies (Gemma-3's ``layer_type`` argument). Two details make it exact:

* the magnitude factor some RoPE types fold into ``cos``/``sin`` (YaRN's ``attention_scaling``) is divided out — it
  is ``cos`` at position 0, measured once per layer;
* a negative delta uses ``cos(|d|)`` and ``-sin(|d|)`` (cos is even, sin odd), so tables indexed by position
  (GPT-J's ``embed_positions``) are never indexed with a negative number.

The rotation composes only when the angle is linear in the position (:data:`SHIFTABLE_ROPE_TYPES`); ``dynamic`` and
``longrope`` change the frequencies with the sequence length and are refused.

Per decoder layer (:class:`ModelRotary`): the layer's rotary module is the one its model calls for it (the
model-level ``rotary_emb``, with ``layer_type=config.layer_types[i]`` when its ``forward`` takes one, or a
``*local*`` rotary for sliding layers where a model has two, or one inside the attention module). Each layer is then
*probed*: its attention module is run once on one hidden state at a few positions with a recording cache (the
forward stops at ``cache.update``), which shows the keys exactly as the model caches them. A layer whose keys do not
depend on the position gets no rotation (NoPE: SmolLM3's ``no_rope_layers``, EXAONE-4's global layers, Llama-4's
NoPE layers); otherwise the derived rotation must map the position-0 key onto the keys at the other positions (and
back, with negative deltas), or the model is refused. Refused, with a ``ValueError`` naming the feature: no rotary
embedding (absolute positions, ALiBi), non-linear RoPE types, multi-head latent attention (DeepSeek-V2/V3 cache the
rotary part after the latent part), RoPE applied by a function other than ``apply_rotary_pos_emb`` (Llama-4's
complex-valued RoPE), and any layer whose probe does not match.

Layers built alike (same attention class, same plain attributes such as ``use_rope``/``is_sliding`` apart from
``layer_idx``, same rotary call) share one probe, so a uniform model is probed once.

:meth:`ModelRotary.from_config` builds the same thing without weights: the model is built on the meta device, one
attention module per kind of layer is materialised on the CPU with random weights for its probe, and the rotary
modules are rebuilt from the config. It is exact for the same reasons (the rotation never depends on the weights);
it costs one float32 attention module per kind of layer (about 1 s for a Llama-7B config on one CPU thread).

Deviations / limits: the probe runs each kind of attention module once, on the model's device, when a cache is
built; RoPE layouts other than ``apply_rotary_pos_emb(q, k, cos, sin)`` / ``(x, sin, cos)`` are refused even where
they might be linear (Llama-4's complex ``freqs_cis``); rotating a row's slots costs one rotary-table evaluation per
slot (per head only when the heads' deltas differ) plus the model's own apply function, about 1.3x the former
hand-written rotate-half on CPU.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Callable

import torch
from torch import nn

# RoPE variants whose angle is linear in the position (inv_freq may be rescaled, the magnitude factor is divided out).
# "dynamic" and "longrope" change inv_freq with the sequence length: a delta is not defined.
SHIFTABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

#: Positions at which each layer is probed (the first one must be 0).
PROBE_POSITIONS = (0, 1, 5, 37)

_CACHE_ARGUMENTS = ("cache", "layer_past", "past_key_values", "past_key_value")


#: The largest ``|delta|`` a cached table covers: ``2 * (2N + 1) * head_dim`` float32 (32 MiB at ``head_dim`` 128),
#: one table per rotation and device, shared by the layers; larger deltas recompute their tables per call.
TABLE_POSITIONS = 1 << 14


class LayerRotation:
    """The rotation of one decoder layer's post-RoPE states by position deltas.

    Subclasses implement :meth:`rotate`. ``for_layer`` returns the rotation itself, so one rotation can stand for
    every layer of a model (what :class:`RotaryShift` does).
    """

    #: ``True`` when the layer has no RoPE: :meth:`rotate` returns its input.
    is_identity = False

    def rotate(
        self, keys: torch.Tensor, delta: torch.Tensor, *, query: bool = False, max_delta: int | None = None
    ) -> torch.Tensor:
        """Rotates ``keys`` by ``delta`` positions.

        Args:
            keys: ``[batch, heads, seq, head_dim]`` post-RoPE keys (or queries with ``query=True``).
            delta: ``[batch, seq]`` (same for every head) or ``[batch, heads, seq]`` integer position offsets, of
                either sign (0 leaves a key unchanged).
            query: rotate as the model rotates queries (the ``q`` output of ``apply_rotary_pos_emb``).
            max_delta: a bound the caller knows on ``|delta|`` (no device sync to find it): a rotation may then read
                its tables from a cache instead of recomputing them (fewer ops per decoding step, same values).

        Returns:
            ``[batch, heads, seq, head_dim]`` states as if RoPE had been applied at ``position + delta``.
        """
        raise NotImplementedError

    def rotate_to(
        self,
        states: torch.Tensor,
        positions: torch.Tensor,
        target: int,
        *,
        query: bool = False,
        max_delta: int | None = None,
    ) -> torch.Tensor:
        """``states [batch, heads, seq, head_dim]`` at ``positions [batch, seq]`` rotated to the one position
        ``target`` (a delta of ``target - positions``, see :meth:`rotate`). A rotation may share the work between
        the layers of a forward that rotate the same ``positions`` tensor (InfLLM's memory query)."""
        return self.rotate(states, target - positions, query=query, max_delta=max_delta)

    def for_layer(self, layer_idx: int) -> LayerRotation:
        """The rotation of decoder layer ``layer_idx`` (this one, for a rotation shared by all layers)."""
        return self


class NoRotation(LayerRotation):
    """A layer without RoPE (NoPE): positions are not in the keys, a shift changes nothing."""

    is_identity = True

    def rotate(
        self, keys: torch.Tensor, delta: torch.Tensor, *, query: bool = False, max_delta: int | None = None
    ) -> torch.Tensor:
        return keys


class RotaryShift(LayerRotation):
    """An explicit rotate-half RoPE (Llama's layout) on the first ``2 * len(inv_freq)`` channels, for every layer.

    Use :meth:`from_model` (or :meth:`from_config`) for a transformers model: they derive each layer's rotation from
    the model's own code. This class is for our own architectures and tests, whose RoPE is known to be this one.

    Args:
        inv_freq: ``[rotary_dim // 2]`` inverse frequencies. The first ``rotary_dim`` channels of a head are rotated
            (HF's ``rotate_half`` layout); the rest (partial rotary) are left alone.
    """

    def __init__(self, inv_freq: torch.Tensor):
        if inv_freq.ndim != 1 or inv_freq.numel() == 0:
            raise ValueError(f"`inv_freq` must be a non-empty 1-D tensor, got shape {tuple(inv_freq.shape)}")
        self.inv_freq = inv_freq.detach().to(torch.float32)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelRotary:
        """The per-layer rotations of a transformers model (see :class:`ModelRotary`)."""
        return ModelRotary.from_model(model)

    @classmethod
    def from_config(cls, config) -> ModelRotary:
        """The per-layer rotations of the model a transformers config describes (see :class:`ModelRotary`)."""
        return ModelRotary.from_config(config)

    def rotate(
        self, keys: torch.Tensor, delta: torch.Tensor, *, query: bool = False, max_delta: int | None = None
    ) -> torch.Tensor:
        rot = self.rotary_dim
        if rot > keys.shape[-1]:
            raise ValueError(f"rotary dim {rot} exceeds head_dim {keys.shape[-1]}")
        if delta.ndim == 2:
            delta = delta[:, None, :]
        angles = delta.to(torch.float32)[..., None] * self.inv_freq.to(keys.device)  # [b, h or 1, seq, rot/2]
        angles = torch.cat((angles, angles), dim=-1)  # [b, h or 1, seq, rot]
        cos, sin = angles.cos(), angles.sin()
        k_rot = keys[..., :rot].to(torch.float32)
        half = rot // 2
        rotated_half = torch.cat((-k_rot[..., half:], k_rot[..., :half]), dim=-1)
        out = (k_rot * cos + rotated_half * sin).to(keys.dtype)
        if rot == keys.shape[-1]:
            return out
        return torch.cat((out, keys[..., rot:]), dim=-1)


class ModuleRotation(LayerRotation):
    """One layer's rotation computed by the model's own rotary module and ``apply_rotary_pos_emb``.

    Args:
        rotary_emb: the layer's rotary module; ``rotary_emb(x, position_ids, **call_kwargs)`` returns its pair of
            ``[batch, seq, dim]`` tables.
        apply_fn: the attention module's ``apply_rotary_pos_emb``.
        call_kwargs: extra arguments of the rotary call (Gemma-3's ``layer_type``).
        width: channels handed to ``apply_fn`` (the first ``width`` of a head; ``None`` = all), for attention modules
            that slice the rotary part before applying RoPE (Phi, StableLM, GPT-J's ``rotary_dim``).
    """

    def __init__(
        self, rotary_emb: nn.Module, apply_fn: Callable, call_kwargs: dict | None = None, width: int | None = None
    ):
        self.rotary_emb = rotary_emb
        self.apply_fn = apply_fn
        self.call_kwargs = dict(call_kwargs or {})
        self.width = width
        self._by_device: dict[torch.device, nn.Module] = {}
        # the `kernels` package turns the function into a module (``use_kernel_forward_from_hub``): its forward
        signature = inspect.signature(apply_fn.forward if isinstance(apply_fn, nn.Module) else apply_fn)
        names = list(signature.parameters)
        if len(names) >= 4 and names[2:4] == ["cos", "sin"]:
            self.style = "qk"  # apply(q, k, cos, sin, unsqueeze_dim=1) on [b, h, s, d]
        elif len(names) == 3 and names[1:3] == ["sin", "cos"]:
            self.style = "single_sin_cos"  # GPT-J: apply(x, sin, cos) on [b, s, h, d]
        else:
            raise ValueError(
                f"unsupported RoPE: `{apply_fn.__module__}.apply_rotary_pos_emb{signature}` has "
                "neither the (q, k, cos, sin) nor the (x, sin, cos) signature"
            )
        with torch.no_grad():
            tables = self._tables(torch.zeros(1, 1, dtype=torch.long), torch.device("cpu"), normalise=False)
        zero = [bool((t == 0).all()) for t in tables]
        if zero == [False, True]:
            self._sin_index = 1
        elif zero == [True, False]:
            self._sin_index = 0
        else:
            raise ValueError(
                f"unsupported RoPE: {type(rotary_emb).__name__} does not return a (cos, sin) pair with sin(0) = 0"
            )
        cos0 = tables[1 - self._sin_index]  # [1, 1, dim]: the magnitude factor (1 unless YaRN-like scaling)
        if bool((cos0 == 0).any()):
            raise ValueError(f"unsupported RoPE: {type(rotary_emb).__name__} gives cos(0) = 0 on some channel")
        self._inv_scale = (1.0 / cos0.reshape(-1)).to(torch.float32)  # [dim]
        self._unscaled = bool((self._inv_scale == 1).all())
        self._inv_scale_on: dict[torch.device, torch.Tensor] = {}
        # tables of every delta in [-N, N] per device (see `_signed_tables`); only for RoPE whose tables depend on
        # the position alone (a dynamic RoPE re-scales with the largest position it is called with)
        rope_type = getattr(rotary_emb, "rope_type", None)
        if isinstance(rope_type, dict):  # per layer type (Gemma-3)
            rope_type = rope_type.get(self.call_kwargs.get("layer_type"))
        self._static = rope_type in SHIFTABLE_ROPE_TYPES
        self._signed: dict[torch.device, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._half_formula: dict[tuple[int, bool], bool] = {}  # (head_dim, query) -> see `_is_rotate_half`
        self._flip: dict[tuple[torch.device, int], torch.Tensor] = {}  # [head_dim] -1 (first half) / +1 (second)
        self._step: tuple | None = None  # the latest `rotate_to` tables, see there

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_signed"] = {}  # a cache: deep copies and pickles start without it
        state["_flip"], state["_step"] = {}, None
        return state

    def _is_rotate_half(self, head_dim: int, query: bool) -> bool:
        """Whether ``apply_fn`` on all ``head_dim`` channels is Llama's rotate-half,
        ``x * cos + cat(-x2, x1) * sin``, bit for bit: then ``x * cos + roll(x, d / 2) * (sin * [-1.., +1..])`` gives
        the same values in 4 ops (no second state rotated, no ``cat``). Checked once per head size on random float32
        inputs; any other layout (interleaved pairs, partial rotary, half-width tables) keeps ``apply_fn``."""
        key = (head_dim, query)
        if key not in self._half_formula:
            ok = self.style == "qk" and self.width in (None, head_dim) and head_dim % 2 == 0
            if ok:
                generator = torch.Generator().manual_seed(0)
                x = torch.randn(2, 3, 5, head_dim, generator=generator)
                cos, sin = torch.randn(2, 2, 5, head_dim, generator=generator)
                try:
                    with torch.no_grad():
                        out = self.apply_fn(x, x, cos, sin)[0 if query else 1]
                    flip = self._flip_on(torch.device("cpu"), head_dim)
                    ok = torch.equal(out, x * cos[:, None] + x.roll(head_dim // 2, -1) * (sin * flip)[:, None])
                except Exception:  # an apply function that takes other inputs: keep calling it
                    ok = False
            self._half_formula[key] = ok
        return self._half_formula[key]

    def _flip_on(self, device: torch.device, head_dim: int) -> torch.Tensor:
        flip = self._flip.get((device, head_dim))
        if flip is None:
            flip = torch.ones(head_dim, device=device)
            flip[: head_dim // 2] = -1.0
            self._flip[(device, head_dim)] = flip
        return flip

    def _half_tables(
        self, delta: torch.Tensor, max_delta: int | None, head_dim: int, query: bool, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cos, sin * flip)`` ``[b, 1, s, d]`` of the deltas ``[b, s]`` from the cached tables, or ``None`` where
        the rotate-half formula or the cached tables do not apply."""
        if max_delta is None or not self._is_rotate_half(head_dim, query):
            return None
        signed = self._signed_tables(max_delta, device)
        if signed is None or signed[1].shape[-1] != head_dim:  # tables narrower than the head: partial rotary
            return None
        size, cos_table, sin_table = signed
        row = delta + size
        return cos_table[row][:, None], (sin_table[row] * self._flip_on(device, head_dim))[:, None]

    def rotate_to(
        self,
        states: torch.Tensor,
        positions: torch.Tensor,
        target: int,
        *,
        query: bool = False,
        max_delta: int | None = None,
    ) -> torch.Tensor:
        """:meth:`LayerRotation.rotate_to`; the tables of the latest ``positions`` (by identity and version) are
        kept, so that the layers sharing this rotation read them once per forward (InfLLM's memory query)."""
        head_dim = states.shape[-1]
        step = self._step
        # an inference tensor has no version counter (an in-place change could not be seen): not kept
        version = None if positions.is_inference() else positions._version
        key = (target, max_delta, head_dim, query, states.device, version)
        if version is not None and step is not None and step[0] is positions and step[1] == key:
            tables = step[2]
        else:
            tables = self._half_tables(target - positions, max_delta, head_dim, query, states.device)
            if tables is None:
                return self.rotate(states, target - positions, query=query, max_delta=max_delta)
            self._step = (positions, key, tables)
        return self._rotate_half(states, *tables)

    @staticmethod
    def _rotate_half(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        part = states.to(torch.float32)
        return (part * cos + part.roll(states.shape[-1] // 2, -1) * sin).to(states.dtype)

    def _signed_tables(self, max_delta: int, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """``(N, cos, sin)``: ``[2N + 1, dim]`` float32 tables of the deltas ``-N..N`` (row ``delta + N``), exactly
        the values :meth:`rotate` computes per call (sin carries the sign of the delta); ``None`` when the RoPE is
        not static or ``max_delta`` exceeds :data:`TABLE_POSITIONS`. Grown by doubling, shared by the layers that
        share this rotation."""
        if not self._static or max_delta > TABLE_POSITIONS:
            return None
        cached = self._signed.get(device)
        if cached is not None and cached[0] >= max_delta:
            return cached
        size = min(TABLE_POSITIONS, max(max_delta, 1024, 2 * cached[0] if cached is not None else 0))
        with torch.no_grad():
            delta = torch.arange(-size, size + 1, device=device)
            tables = self._tables(delta.abs()[None], device)
            sin = tables[self._sin_index][0] * delta.sign().to(torch.float32)[:, None]
            self._signed[device] = (size, tables[1 - self._sin_index][0], sin)
        return self._signed[device]

    def _module_on(self, device: torch.device) -> nn.Module:
        buffers = list(self.rotary_emb.buffers())
        if not buffers or buffers[0].device == device:
            return self.rotary_emb
        if device not in self._by_device:
            self._by_device[device] = copy.deepcopy(self.rotary_emb).to(device)
        return self._by_device[device]

    def _tables(self, positions: torch.Tensor, device: torch.device, normalise: bool = True):
        """``positions`` ``[n, seq]`` (non-negative) -> the rotary module's two ``[n, seq, dim]`` float32 tables."""
        module = self._module_on(device)
        x = torch.zeros(1, dtype=torch.float32, device=device)
        out = module(x, positions.to(device=device, dtype=torch.long), **self.call_kwargs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"unsupported RoPE: {type(self.rotary_emb).__name__} does not return a pair of tables")
        tables = [t.to(torch.float32) for t in out]
        if normalise and not self._unscaled:
            if device not in self._inv_scale_on:
                self._inv_scale_on[device] = self._inv_scale.to(device)
            tables = [t * self._inv_scale_on[device] for t in tables]
        return tables

    def rotate(
        self, keys: torch.Tensor, delta: torch.Tensor, *, query: bool = False, max_delta: int | None = None
    ) -> torch.Tensor:
        batch, heads, seq, head_dim = keys.shape
        if delta.ndim == 2:
            delta = delta[:, None, :]
        delta = delta.expand(batch, delta.shape[1], seq)  # [b, 1 or h, s] (a broadcast delta is expanded)
        if delta.shape[1] == 1:  # one delta per row and slot: tables [b, s], heads broadcast
            positions = delta[:, 0]
            states = keys
        else:  # per-head deltas: every (row, head) is its own "batch" of the rotary call
            positions = delta.reshape(batch * heads, seq)
            states = keys.reshape(batch * heads, 1, seq, head_dim)
        if delta.shape[1] == 1:  # Llama's rotate-half from the cached tables: 4 ops (see `_is_rotate_half`)
            tables = self._half_tables(positions, max_delta, head_dim, query, keys.device)
            if tables is not None:
                return self._rotate_half(keys, *tables)
        signed = self._signed_tables(max_delta, keys.device) if max_delta is not None else None
        if signed is not None:  # rows of the cached tables: 3 ops instead of the rotary module's call
            size, cos_table, sin_table = signed
            row = positions + size
            cos, sin = cos_table[row], sin_table[row]
        else:
            magnitude = positions.abs()
            tables = self._tables(magnitude, keys.device)
            sin = tables[self._sin_index] * positions.sign().to(torch.float32)[..., None]  # sin(-d) = -sin(d)
            cos = tables[1 - self._sin_index]
        width = self.width or head_dim
        part = states[..., :width].to(torch.float32)
        if self.style == "qk":
            # the function rotates a query and a key; the other slot gets one head (less work, the output unused)
            other = part[:, :1]
            rotated = self.apply_fn(part, other, cos, sin)[0] if query else self.apply_fn(other, part, cos, sin)[1]
        else:
            rotated = self.apply_fn(part.transpose(1, 2), sin, cos).transpose(1, 2)
        rotated = rotated.to(keys.dtype)
        if width < head_dim:
            rotated = torch.cat((rotated, states[..., width:]), dim=-1)
        return rotated.reshape(batch, heads, seq, head_dim)


class ModelRotary:
    """The rotation of every decoder layer of a model (:class:`ModuleRotation` or :class:`NoRotation` per layer).

    Args:
        layers: one rotation per decoder layer.
        description: the model, for messages.
    """

    def __init__(self, layers: list[LayerRotation], description: str = "model"):
        self.layers = list(layers)
        self.description = description

    def for_layer(self, layer_idx: int) -> LayerRotation:
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"{self.description} has {len(self.layers)} decoder layers, no layer {layer_idx}")
        return self.layers[layer_idx]

    def rotate(
        self, keys: torch.Tensor, delta: torch.Tensor, *, query: bool = False, max_delta: int | None = None
    ) -> torch.Tensor:
        """Rotates with the rotation all layers share; refused where layers differ (use :meth:`for_layer`)."""
        first = self.layers[0]
        if any(not _same_rotation(first, other) for other in self.layers[1:]):
            raise ValueError(
                f"{self.description}: the decoder layers rotate differently (per-layer-type RoPE or NoPE layers); "
                "rotate with `for_layer(layer_idx)`"
            )
        return first.rotate(keys, delta, query=query, max_delta=max_delta)

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelRotary:
        """Derives and probes each decoder layer's rotation from ``model`` (see the module docstring)."""
        config = _text_config(model.config)
        decoder, layers = _decoder_layers(model, config)
        rotations, probed = [], {}
        with torch.no_grad():
            for layer_idx, layer in enumerate(layers):
                attention = _attention_of(layer, layer_idx, config)
                rotary, call_kwargs = _rotary_for(decoder, attention, layer_idx, config)
                key = _layer_key(attention, rotary, call_kwargs)
                if key not in probed:
                    probed[key] = _probe_layer(attention, rotary, call_kwargs, layer_idx, config)
                rotations.append(probed[key])
        return cls(rotations, config.model_type or type(model).__name__)

    @classmethod
    def from_config(cls, config) -> ModelRotary:
        """The same rotations without weights: the model is built on the meta device and probed layer by layer."""
        from transformers import AutoModelForCausalLM

        text_config = _text_config(config)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(text_config)
        except Exception as error:  # noqa: BLE001 - any failure to build means the config cannot be used alone
            raise ValueError(
                f"key re-rotation: cannot build a {getattr(text_config, 'model_type', '?')} model from its config "
                f"to derive its RoPE ({type(error).__name__}: {error}); build the cache from the model instead "
                "(make_cache(name, model))"
            ) from None
        decoder, layers = _decoder_layers(model, text_config)
        rebuilt: dict[int, nn.Module] = {}
        rotations, probed = [], {}
        with torch.no_grad():
            for layer_idx, layer in enumerate(layers):
                attention = _attention_of(layer, layer_idx, text_config)
                rotary, call_kwargs = _rotary_for(decoder, attention, layer_idx, text_config)
                key = _layer_key(attention, rotary, call_kwargs)
                if key in probed:  # a layer built like one already probed (most layers of most models)
                    rotations.append(probed[key])
                    continue
                attention.to_empty(device="cpu")
                generator = torch.Generator().manual_seed(layer_idx)
                for param in attention.parameters():
                    param.copy_(torch.rand(param.shape, generator=generator, dtype=param.dtype) - 0.4)
                if rotary is not None:
                    if id(rotary) not in rebuilt:
                        rebuilt[id(rotary)] = _rebuild_rotary(rotary, text_config)
                    rotary = rebuilt[id(rotary)]
                probed[key] = _probe_layer(attention, rotary, call_kwargs, layer_idx, text_config)
                rotations.append(probed[key])
                attention.to_empty(device="meta")
        return cls(rotations, text_config.model_type)


# ----------------------------------------------------------------------------------------------------- discovery
def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _same_rotation(a: LayerRotation, b: LayerRotation) -> bool:
    if a is b:
        return True
    if isinstance(a, ModuleRotation) and isinstance(b, ModuleRotation):
        return (a.rotary_emb, a.apply_fn, a.call_kwargs, a.width) == (b.rotary_emb, b.apply_fn, b.call_kwargs, b.width)
    return False


def _decoder_layers(model: nn.Module, config) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder (the module that owns the layers and the shared rotary) and its ``[num_hidden_layers]`` layers."""
    num_layers = getattr(config, "num_hidden_layers", None)
    for candidate in model.modules():  # the shallowest module holding a ModuleList of the decoder layers
        for child in candidate.children():
            if isinstance(child, nn.ModuleList) and len(child) == num_layers:
                return candidate, child
    raise ValueError(
        f"key re-rotation: cannot find the {num_layers} decoder layers of {type(model).__name__} to derive its RoPE"
    )


def _layer_key(attention: nn.Module, rotary: nn.Module | None, call_kwargs: dict) -> tuple:
    """What decides a layer's rotation: the attention's class, its plain attributes (``use_rope``, ``is_sliding``,
    ``sliding_window``, ``rotary_ndims``, ... but not ``layer_idx``), its submodules' classes and the rotary call.

    Layers with equal keys run the same code on the same rotary, so one probe stands for all of them. (transformers'
    attention modules decide per layer in ``__init__``, storing the decision as such an attribute.)
    """
    plain = tuple(
        sorted(
            (name, value)
            for name, value in vars(attention).items()
            if not name.startswith("_")
            and name not in ("layer_idx", "training")
            and isinstance(value, (bool, int, float, str, type(None)))
        )
    )
    children = tuple((name, type(child).__name__) for name, child in attention.named_children())
    return type(attention), plain, children, id(rotary), tuple(sorted(call_kwargs.items()))


def _attention_of(layer: nn.Module, layer_idx: int, config) -> nn.Module:
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer_idx] not in ("full_attention", "sliding_attention"):
        raise ValueError(
            f"unsupported model: hf_longmem caches handle full and sliding-window attention layers, {config.model_type} "
            f"layer {layer_idx} is a {layer_types[layer_idx]!r} layer"
        )
    for module in layer.modules():
        if module is not layer and type(module).__name__.endswith("Attention"):
            if hasattr(module, "kv_lora_rank") or hasattr(module, "qk_rope_head_dim"):
                raise ValueError(
                    f"unsupported model: key re-rotation does not handle multi-head latent attention (MLA): "
                    f"{config.model_type} layer {layer_idx} ({type(module).__name__}) caches keys whose rotary part "
                    "follows a non-rotary part, with values of another width"
                )
            return module
    raise ValueError(f"key re-rotation: layer {layer_idx} of {config.model_type} has no attention module")


def _is_rotary(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding")


def _rotary_for(decoder: nn.Module, attention: nn.Module, layer_idx: int, config) -> tuple[nn.Module | None, dict]:
    """The rotary module the model uses for ``attention`` and the extra arguments of its call (``None``: none)."""
    own = [m for m in attention.modules() if _is_rotary(m)]
    if own:
        rotary = own[0]
    else:
        shared = {name: m for name, m in decoder.named_children() if _is_rotary(m)}
        if not shared:
            return None, {}
        layer_types = getattr(config, "layer_types", None)
        sliding = bool(layer_types) and layer_types[layer_idx] == "sliding_attention"
        local = [m for name, m in shared.items() if "local" in name]
        others = [m for name, m in shared.items() if "local" not in name]
        if sliding and local:
            rotary = local[0]
        elif len(others) == 1:
            rotary = others[0]
        else:
            raise ValueError(
                f"unsupported model: key re-rotation cannot tell which of the rotary embeddings {sorted(shared)} of "
                f"{config.model_type} layer {layer_idx} uses"
            )
    call_kwargs = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        layer_types = getattr(config, "layer_types", None)
        if not layer_types:
            raise ValueError(f"key re-rotation: {type(rotary).__name__} needs a layer type, the config has none")
        call_kwargs["layer_type"] = layer_types[layer_idx]
    rope_type = getattr(rotary, "rope_type", "default")
    if isinstance(rope_type, dict):
        rope_type = rope_type.get(call_kwargs.get("layer_type"), "default")
    if rope_type not in SHIFTABLE_ROPE_TYPES:
        raise ValueError(
            f"unsupported model: key re-rotation needs a RoPE whose angle is linear in the position "
            f"({', '.join(SHIFTABLE_ROPE_TYPES)}); {config.model_type} layer {layer_idx} uses rope_type={rope_type!r}"
        )
    return rotary, call_kwargs


def _rebuild_rotary(rotary: nn.Module, config) -> nn.Module:
    """A CPU copy of a meta-device rotary module, built again from its config (its buffers are computed there)."""
    try:
        with torch.device("cpu"):
            return type(rotary)(getattr(rotary, "config", config))
    except Exception as error:  # noqa: BLE001
        raise ValueError(
            f"key re-rotation: cannot rebuild {type(rotary).__name__} from the config ({error}); build the cache "
            "from the model instead (make_cache(name, model))"
        ) from None


# ----------------------------------------------------------------------------------------------------- probing
class _Captured(Exception):
    pass


class _RecordingCache:
    """Stands in for the cache in one attention forward: records the keys handed to ``update`` and stops there."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = key_states, value_states
        raise _Captured


def _cached_keys(attention: nn.Module, position_embeddings, hidden: torch.Tensor, position_ids: torch.Tensor):
    """``[n, kv_heads, 1, head_dim]`` keys the attention module hands its cache (or raises ``ValueError``)."""
    params = inspect.signature(attention.forward).parameters
    cache_arg = next((name for name in _CACHE_ARGUMENTS if name in params), None)
    if cache_arg is None or "position_embeddings" not in params:
        raise ValueError(f"{type(attention).__name__}.forward takes no cache or no `position_embeddings` argument")
    recorder = _RecordingCache()
    kwargs = {
        "hidden_states": hidden,
        "position_embeddings": position_embeddings,
        "attention_mask": None,
        cache_arg: recorder,
    }
    if "position_ids" in params:
        kwargs["position_ids"] = position_ids
    was_training = attention.training
    attention.eval()
    try:
        attention(**kwargs)
    except _Captured:
        pass
    finally:
        attention.train(was_training)
    if recorder.keys is None:
        raise ValueError(f"{type(attention).__name__} did not hand its keys to the cache")
    return recorder.keys, recorder.values


def _probe_layer(attention, rotary, call_kwargs, layer_idx, config) -> LayerRotation:
    """The verified rotation of one layer (``NoRotation`` for a NoPE layer); ``ValueError`` if none is exact."""
    model_type = config.model_type
    if rotary is None:
        raise ValueError(
            f"unsupported model: key re-rotation needs RoPE, {model_type} has no rotary embedding "
            "(absolute or ALiBi positions)"
        )
    module = sys.modules[type(attention).__module__]
    apply_fn = getattr(module, "apply_rotary_pos_emb", None)
    if apply_fn is None:
        raise ValueError(
            f"unsupported model: key re-rotation needs the attention's `apply_rotary_pos_emb`; "
            f"{module.__name__} has none (a RoPE of another form, e.g. complex-valued)"
        )
    param = next(attention.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    hidden_size = getattr(config, "hidden_size", None)
    generator = torch.Generator().manual_seed(1234 + layer_idx)
    count = len(PROBE_POSITIONS)
    hidden = torch.randn(1, 1, hidden_size, generator=generator).expand(count, 1, hidden_size)
    hidden = hidden.to(device=device, dtype=dtype).contiguous()
    positions = torch.tensor(PROBE_POSITIONS, device=device)[:, None]  # [n, 1]
    try:
        embeddings = rotary(hidden, positions, **call_kwargs)
        keys, values = _cached_keys(attention, embeddings, hidden, positions)
    except ValueError as error:
        raise ValueError(f"key re-rotation: cannot probe {model_type} layer {layer_idx}'s RoPE: {error}") from None
    except Exception as error:  # noqa: BLE001 - the model's own code failed on the probe
        raise ValueError(
            f"key re-rotation: cannot probe {model_type} layer {layer_idx}'s RoPE ({type(error).__name__}: {error})"
        ) from None
    if keys.ndim != 4 or keys.shape[0] != count or keys.shape[2] != 1:
        raise ValueError(
            f"unsupported model: key re-rotation needs [batch, kv_heads, seq, head_dim] keys; {model_type} layer "
            f"{layer_idx} caches keys of shape {tuple(keys.shape)} for {count} single tokens"
        )
    keys = keys.to(torch.float32)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    magnitude = float(keys.abs().max()) + 1e-6
    if torch.allclose(keys, keys[:1].expand_as(keys), rtol=0, atol=tol * magnitude):
        return NoRotation()
    try:
        rotation = ModuleRotation(rotary, apply_fn, call_kwargs, _rotary_width(attention, keys.shape[-1]))
        delta = positions.reshape(count, 1).expand(count, keys.shape[1])[:, :, None]  # [n, h, 1] per-head form
        forward = rotation.rotate(keys[:1].expand_as(keys).contiguous(), positions.reshape(count, 1))
        backward = rotation.rotate(keys, -delta)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001
        raise ValueError(
            f"unsupported model: key re-rotation cannot apply {model_type}'s RoPE to cached keys "
            f"(layer {layer_idx}, {type(error).__name__}: {error})"
        ) from None
    if not (
        torch.allclose(forward.float(), keys, rtol=0, atol=tol * magnitude)
        and torch.allclose(backward.float(), keys[:1].expand_as(keys), rtol=0, atol=tol * magnitude)
    ):
        raise ValueError(
            f"unsupported model: key re-rotation cannot reproduce {model_type}'s RoPE on cached keys (layer "
            f"{layer_idx}: rotating the position-0 key does not give the keys the model caches at other positions)"
        )
    return rotation


def _rotary_width(attention: nn.Module, head_dim: int) -> int | None:
    """Channels the attention hands ``apply_rotary_pos_emb`` when it slices the rotary part first (else ``None``)."""
    for name in ("rotary_ndims", "rotary_dim"):
        width = getattr(attention, name, None)
        if isinstance(width, int) and 0 < width < head_dim:
            return width
    return None


def shift_to_cache_positions(
    rotary: LayerRotation, keys: torch.Tensor, positions: torch.Tensor, real_before: torch.Tensor
) -> torch.Tensor:
    """The StreamingLLM/SirLLM "position shift": stored keys moved to contiguous positions before the query.

    Slot ``j`` of ``stored`` slots is moved to position ``real_before - stored + j``, right before the first new
    token (which the model places at ``real_before``); pad slots are left alone (they are masked).

    Args:
        rotary: the layer's rotation.
        keys: ``[batch, kv_heads, stored, head_dim]`` post-RoPE keys at their true positions.
        positions: ``[batch, kv_heads or 1, stored]`` true positions, negative for pad slots (``1``: the same slots
            in every head, one rotary table per row).
        real_before: ``[batch]`` real tokens seen before this step.

    Returns:
        ``[batch, kv_heads, stored, head_dim]`` keys at their positions inside the cache.
    """
    if rotary.is_identity:
        return keys
    stored = keys.shape[-2]
    target = real_before[:, None, None] - stored + torch.arange(stored, device=keys.device)
    delta = torch.where(positions < 0, torch.zeros_like(target), target - positions.long())
    return rotary.rotate(keys, delta)
