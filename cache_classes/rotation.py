"""Position re-rotation shared by the cache methods that move kept keys (StreamingLLM/SirLLM's position shift) or
place memory at a constant distance (InfLLM/EM-LLM): where a method gets the model's RoPE, and the layer base class
of the pos-shift methods.

* :func:`model_rotation` derives the model's RoPE in the form a method needs (:class:`ModelRotary` per layer for the
  pos-shift methods, :class:`RotaryShift` for InfLLM/EM-LLM), or refuses with a ``ValueError`` that says why and what
  to do instead; :func:`shift_rotary` and :func:`rotary_for` are its two uses.
* :class:`ShiftedLayer`: a compressed layer whose kept keys may be moved to contiguous positions inside the cache.
"""

from __future__ import annotations

from hf_longmem.memory.rope import LayerRotation, ModelRotary, RotaryShift, shift_to_cache_positions

from .base import CompressedLayer

POSITION_MODES = ("true", "shift")

#: Forms of a model's RoPE a method can ask for: per decoder layer (any layout, NoPE layers) or one shared rotation.
Rotation = type[ModelRotary] | type[RotaryShift]


def model_rotation(kind: Rotation, *, model=None, config=None, refusal: str, missing: str):
    """The model's RoPE as ``kind`` (``kind.from_model(model)``, else ``kind.from_config(config)``: exact, or a
    ``ValueError``).

    Args:
        kind: :class:`ModelRotary` (per layer) or :class:`RotaryShift` (one rotation for every layer).
        refusal: the ``ValueError`` message where the RoPE cannot be reproduced exactly; ``{error}`` is the reason.
        missing: the message when neither ``model`` nor ``config`` is given.
    """
    if model is None and config is None:
        raise ValueError(missing)
    try:
        return kind.from_model(model) if model is not None else kind.from_config(config)
    except ValueError as error:
        raise ValueError(refusal.format(error=error)) from None


def shift_rotary(
    position_mode: str, rotary: LayerRotation | ModelRotary | None, config=None, model=None
) -> LayerRotation | ModelRotary | None:
    """The rotation a pos-shift cache applies (``None`` for true positions); validates ``position_mode``.

    Without an explicit ``rotary``, the rotation is derived from ``model`` or ``config`` (:class:`ModelRotary`, exact:
    a config's model is built on the meta device and probed); ``ValueError`` where it cannot be done exactly.
    """
    if position_mode not in POSITION_MODES:
        raise ValueError(f"`position_mode` must be one of {POSITION_MODES}, got {position_mode!r}")
    if position_mode != "shift" or rotary is not None:
        return rotary if position_mode == "shift" else None
    return model_rotation(
        ModelRotary,
        model=model,
        config=config,
        refusal="position_mode='shift': {error}. position_mode='true' needs no re-rotation",
        missing="position_mode='shift' needs the model's RoPE: pass `config=` or use make_cache(..., model)",
    )


def rotary_for(cls_name: str, config=None, rotary: RotaryShift | None = None, model=None) -> RotaryShift:
    """The model's RoPE as a :class:`RotaryShift` (InfLLM/EM-LLM place memory at a constant distance)."""
    if rotary is not None:
        return rotary
    return model_rotation(
        RotaryShift,
        model=model,
        config=config,
        refusal=f"unsupported model: {cls_name} re-rotates keys, which needs a RoPE it can reproduce exactly ({{error}})",
        missing=f"{cls_name} needs the model's RoPE: pass `config=` (or `rotary=`), or use make_cache(..., model)",
    )


def layer_rotation(shift: LayerRotation | ModelRotary | None, layer_idx: int) -> LayerRotation | None:
    """Decoder layer ``layer_idx``'s rotation (``None``: true positions, or a NoPE layer, where a shift is a no-op)."""
    if shift is None:
        return None
    rotation = shift.for_layer(layer_idx)
    return None if rotation.is_identity else rotation


class ShiftedLayer(CompressedLayer):
    """A layer whose kept keys may be moved to contiguous positions inside the cache (StreamingLLM, SirLLM)."""

    def __init__(self, rotary: LayerRotation | None):
        super().__init__()
        self.rotary = rotary  # set => position shift (this layer's rotation)
        self._evicted = False

    def keys_for_attention(self, keys, positions, real_before):
        if self.rotary is None or not self._evicted or keys.shape[-2] == 0:
            return keys  # nothing evicted yet: positions are already contiguous
        # the same slots in every head (StreamingLLM and SirLLM decide per row): one rotary table per row
        return shift_to_cache_positions(self.rotary, keys, positions[:, :1], real_before)

    def reset(self) -> None:
        super().reset()
        self._evicted = False


__all__ = ["POSITION_MODES", "ShiftedLayer", "layer_rotation", "model_rotation", "rotary_for", "shift_rotary"]
