"""Shared plumbing for architectures that wrap a pretrained causal LM (LongMem, HMT, CMT).

A wrapper config embeds the backbone's config as ``backbone_config`` (a nested config, serialised inside the
wrapper's ``config.json``) and may record where the backbone came from (``backbone_name_or_path``). The wrapper
model owns the backbone as a submodule named ``backbone``, so ``save_pretrained`` / ``from_pretrained`` of the
wrapper save and load backbone and memory weights together. :meth:`BackboneWrapperMixin.from_backbone` builds a
fresh wrapper around an existing model (or a path/repo id) and copies its weights in.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from hf_longmem.modeling.remote_code import RemoteCodeMixin

# Fields that must agree between a wrapper's backbone_config and a backbone it is given.
_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def as_backbone_config(backbone_config: PretrainedConfig | dict[str, Any] | None) -> PretrainedConfig | None:
    """A ``PretrainedConfig`` from a config, its dict (``model_type`` required) or ``None``."""
    if backbone_config is None or isinstance(backbone_config, PretrainedConfig):
        return backbone_config
    if not isinstance(backbone_config, dict):
        raise ValueError(f"backbone_config must be a PretrainedConfig or a dict, got {type(backbone_config).__name__}")
    fields = dict(backbone_config)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError("backbone_config must name its model_type (e.g. 'llama')")
    return AutoConfig.for_model(model_type, **fields)


class BackboneWrapperConfig(RemoteCodeMixin, PretrainedConfig):
    """Base config of a wrapper: the backbone's config plus which parameters train.

    Args:
        backbone_config: the wrapped causal LM's config (or its dict). Required to build a model.
        backbone_name_or_path: where the backbone weights came from (recorded for model cards; optional).
        freeze_backbone: keep the backbone's own parameters frozen (``requires_grad=False``).
    """

    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        backbone_name_or_path: str | None = None,
        freeze_backbone: bool = True,
        **kwargs,
    ):
        self.backbone_config = as_backbone_config(backbone_config)
        self.backbone_name_or_path = backbone_name_or_path
        self.freeze_backbone = bool(freeze_backbone)
        tie = kwargs.pop("tie_word_embeddings", None)
        if self.backbone_config is not None:
            if tie is not None:  # the wrapper's flag is the backbone's: it is the backbone that ties (or not)
                self.backbone_config.tie_word_embeddings = bool(tie)
            tie = getattr(self.backbone_config, "tie_word_embeddings", False)
            kwargs.setdefault("vocab_size", self.backbone_config.vocab_size)
            kwargs.setdefault("hidden_size", self.backbone_config.hidden_size)
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                kwargs.setdefault(name, getattr(self.backbone_config, name, None))
        super().__init__(tie_word_embeddings=bool(tie), **kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PretrainedConfig:
        """The backbone's config (its ``num_hidden_layers``, ``hidden_size``, ``vocab_size``, ...), as composite
        transformers configs return their ``text_config``; ``self`` while no backbone config is set."""
        return self.backbone_config if self.backbone_config is not None else self

    def require_backbone_config(self) -> PretrainedConfig:
        """The backbone config, or a ``ValueError`` naming ``backbone_config`` when it is missing."""
        if self.backbone_config is None:
            raise ValueError(f"{type(self).__name__} needs backbone_config (the wrapped causal LM's config)")
        return self.backbone_config


def check_backbone_matches(expected: PretrainedConfig, backbone: PreTrainedModel) -> None:
    """``ValueError`` naming ``backbone`` when its config disagrees with ``expected`` on a shape field."""
    actual = backbone.config
    for field in _SHAPE_FIELDS:
        want, got = getattr(expected, field, None), getattr(actual, field, None)
        if want != got:
            raise ValueError(f"backbone does not match backbone_config: {field} is {got!r}, config says {want!r}")


def build_backbone(config: BackboneWrapperConfig) -> PreTrainedModel:
    """A randomly initialised causal LM for ``config.backbone_config`` (weights come from ``from_pretrained``)."""
    return AutoModelForCausalLM.from_config(config.require_backbone_config())


def freeze_backbone(backbone: PreTrainedModel) -> None:
    """Turn off gradients of every backbone parameter."""
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)


class BackboneEmbeddingsMixin:
    """Embedding accessors and ``resize_token_embeddings`` of a model that holds the wrapped LM as ``self.backbone``:
    its embeddings are the backbone's."""

    backbone: PreTrainedModel

    # ---- embeddings: the backbone's -----------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_output_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True) -> nn.Embedding:
        """The backbone's ``resize_token_embeddings`` (it re-ties its own head), then every ``vocab_size`` that
        describes it (the wrapper config, its ``backbone_config``) follows."""
        embeddings = self.backbone.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        vocab_size = embeddings.weight.shape[0]
        for config in (self.config, self.config.backbone_config, self.backbone.config):
            config.vocab_size = vocab_size
        self.vocab_size = vocab_size
        return embeddings


class BackboneWrapperMixin(BackboneEmbeddingsMixin):
    """For wrapper ``PreTrainedModel`` classes that hold the wrapped LM as ``self.backbone``."""

    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel | str, **config_kwargs):
        """Build a wrapper around ``backbone`` (a model, a local path or a repo id) and copy its weights in.

        Args:
            backbone: the pretrained causal LM, or where ``AutoModelForCausalLM.from_pretrained`` finds it.
            **config_kwargs: the wrapper config's own fields (memory sizes, which parts train, ...).
        """
        name_or_path = None
        if isinstance(backbone, str):
            name_or_path = backbone
            backbone = AutoModelForCausalLM.from_pretrained(backbone)
        if not isinstance(backbone, PreTrainedModel):
            raise ValueError(f"backbone must be a PreTrainedModel or a path/repo id, got {type(backbone).__name__}")
        config_kwargs.setdefault("backbone_name_or_path", name_or_path or getattr(backbone, "name_or_path", None))
        config = cls.config_class(backbone_config=backbone.config.to_dict(), **config_kwargs)
        model = cls(config)
        check_backbone_matches(config.backbone_config, backbone)
        missing, unexpected = model.backbone.load_state_dict(backbone.state_dict(), strict=False)
        if unexpected or [name for name in missing if not name.endswith("lm_head.weight")]:
            raise ValueError(f"backbone weights do not fit: missing {missing}, unexpected {unexpected}")
        model.to(dtype=next(backbone.parameters()).dtype, device=next(backbone.parameters()).device)
        if config.freeze_backbone:
            freeze_backbone(model.backbone)
        return model

    def trainable_parameter_count(self) -> int:
        """Number of parameters that receive gradients."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
