"""One conformance suite for the memory architectures: they must behave like any transformers model.

Written for hf_longmem in the spirit of transformers' ``ModelTesterMixin`` (``tests/test_modeling_common.py``) and
``GenerationTesterMixin`` (``tests/generation/test_utils.py``): the same features, checked against what they must
equal rather than only that they run. An architecture's test module gets all of it with a small tester::

    class TestTitansConformance(ConformanceSuite):
        tester = TitansTester()      # a ModelTester subclass: config + model + inputs

What an architecture cannot have is declared on its classes (``_unsupported_features`` of
:class:`hf_longmem.modeling.causal_lm.MemoryModelMixin`, transformers' ``supports_gradient_checkpointing`` /
``_supports_sdpa``); the suite then checks the refusal (a ``ValueError`` naming the feature), never a silent ``None``.

Tolerances: where both sides run the same operations on the same numbers (``inputs_embeds`` vs the ids' embedding
lookup, a checkpointed recompute, a save/load round trip, ``return_dict=False``) the suite asks for exact equality.
Where the operations differ (a cached decode vs one full forward, a padded row vs the row alone, eager vs SDPA
attention) float32 sums run in a different order: each of ``L`` layers adds a relative rounding error of a few
``2**-24 * sqrt(width)``, i.e. about 1e-6 for these tiny models; :data:`ATOL` / :data:`RTOL` leave a factor ~20.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from tests.helpers.remote_roundtrip import assert_fresh_process_roundtrip

ATOL, RTOL = 2e-5, 1e-4


class ModelTester:
    """What one architecture supplies to :class:`ConformanceSuite` (subclass it in the architecture's test module).

    Attributes:
        model_class: the ``<Name>ForCausalLM`` class.
        base_model_class: the class whose checkpoint ``model.<base_model_prefix>`` is (``<Name>Model`` or, for a
            wrapper, the backbone's class); the suite loads such a checkpoint into ``model_class``.
        num_hidden_states: ``len(hidden_states)`` the model returns (its layers + 1).
        stateful: the model's memory cannot be rolled back (``_is_stateful``).
        doc: its documentation page (``docs/<name>.md``), which must name every declared-unsupported feature.
        batch_size, seq_length: inputs of most checks (``seq_length`` should cross a segment/chunk boundary).
        max_new_tokens: tokens the generation checks produce.
    """

    model_class: type[PreTrainedModel]
    base_model_class: type[PreTrainedModel] | None = None
    num_hidden_states: int
    stateful: bool = True
    batch_size: int = 2
    seq_length: int = 11
    max_new_tokens: int = 4
    doc: str  # the architecture's doc, relative to the repository root (lists what is declared unsupported)

    def get_config(self, **overrides) -> PretrainedConfig:
        """A tiny config (1-2 layers, width 32-64); ``overrides`` are config fields (``tie_word_embeddings``, ...)."""
        raise NotImplementedError

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        """Make the memory matter in a fresh ``model`` (livelier gates, a memorized bank, ...); default: nothing."""
        return model

    def create_model(self, config: PretrainedConfig | None = None, seed: int = 0, **overrides) -> PreTrainedModel:
        """A seeded, prepared model in eval mode."""
        torch.manual_seed(seed)
        model = self.model_class(config if config is not None else self.get_config(**overrides))
        return self.prepare_model(model).eval()

    def reference_logits(self, model: PreTrainedModel, prompt: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, S, vocab]`` of one full forward over ``sequences`` (``[rows, S]``, each row the continuation
        of its ``prompt`` row, rows repeated as generate repeats them) without a cache: what cached generation must
        reproduce. Override where the model defines the continuation of a prompt otherwise (CMT reads the memories
        retrieved for the prompt)."""
        with torch.no_grad():
            return model(input_ids=sequences, use_cache=False).logits

    def training_loss(self, model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
        """The loss of one training step on ``ids`` (default: the LM loss); override where the trainable parts
        learn from another objective (CMT's memory training loss)."""
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    def input_ids(self, batch: int | None = None, length: int | None = None, seed: int = 1) -> torch.Tensor:
        """``[batch, length]`` random ids that avoid the special tokens (ids 0-3)."""
        vocab = self.get_config().get_text_config().vocab_size
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(4, vocab, (batch or self.batch_size, length or self.seq_length), generator=generator)


def randomize_(module: nn.Module, std: float = 0.2) -> None:
    """Larger-than-default ``N(0, std²)`` matrices, so attention is peaked and greedy tokens depend on every input."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, std)


def tiny_backbone_config(**overrides) -> dict[str, Any]:
    """A 2-layer, 32-wide Llama (GQA) config dict for the wrapper architectures (``backbone_config``)."""
    from tests.helpers.tiny_models import tiny_config

    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=61)
    fields.update(overrides)
    config = tiny_config("llama_gqa", **fields).to_dict()
    config.pop("_attn_implementation_autoset", None)
    return config


def _generate(model, **kwargs):
    """``model.generate`` without the EOS/length surprises of a random tiny model (fixed number of new tokens)."""
    kwargs.setdefault("pad_token_id", 0)
    kwargs.setdefault("eos_token_id", None)
    kwargs.setdefault("min_new_tokens", kwargs.get("max_new_tokens"))
    with torch.no_grad():
        return model.generate(**kwargs)


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _exact(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def _close(actual, expected, what: str, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _no_cache_greedy(tester, model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy continuation by full forwards over the whole prefix (no cache): ``(sequences, last logits per step)``."""
    logits, prompt = [], ids
    for _ in range(steps):
        last = tester.reference_logits(model, prompt, ids)[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids, logits


class ConformanceSuite:
    """The checks (pytest collects them from a ``Test*`` subclass that sets :attr:`tester`)."""

    tester: ModelTester

    # ---- helpers ---------------------------------------------------------------------------------------------------

    def model(self, **overrides) -> PreTrainedModel:
        return self.tester.create_model(**overrides)

    def supports(self, model, feature: str) -> bool:
        return type(model).supports_feature(feature)

    def expect_refusal(self, model, feature: str, call) -> None:
        """``call()`` must raise the ``ValueError`` naming ``feature`` (and the feature must be declared)."""
        assert feature in type(model)._unsupported_features, f"{feature} refused but not declared"
        with pytest.raises(ValueError, match=feature):
            call()

    # ---- configuration ---------------------------------------------------------------------------------------------

    def test_config_round_trip(self, tmp_path: Path):
        """to_dict/from_dict, the JSON string and save_pretrained/AutoConfig give the same config."""
        config = self.tester.get_config()
        cls = type(config)
        again = cls.from_dict(config.to_dict())
        assert again.to_dict() == config.to_dict()
        from_json = cls.from_dict(json.loads(config.to_json_string()))
        assert from_json.to_diff_dict() == config.to_diff_dict()
        config.save_pretrained(tmp_path)
        loaded = AutoConfig.from_pretrained(tmp_path)
        assert type(loaded) is cls
        where = {"_name_or_path"}  # the folder it was loaded from
        assert {k: v for k, v in loaded.to_dict().items() if k not in where} == {
            k: v for k, v in config.to_dict().items() if k not in where
        }

    def test_text_config_exposes_sizes(self):
        """``get_text_config()`` (what generation and cache code read) has the decoder's layers, width and vocab."""
        model = self.model()
        text = model.config.get_text_config()
        assert text.num_hidden_layers >= 1
        assert text.hidden_size == model.get_input_embeddings().embedding_dim
        assert text.vocab_size == model.get_input_embeddings().num_embeddings
        assert model.config.get_text_config(decoder=True).num_hidden_layers == text.num_hidden_layers

    # ---- model structure -------------------------------------------------------------------------------------------

    def test_base_model_prefix_names_a_submodule(self, tmp_path: Path):
        """``base_model_prefix`` names a submodule of the LM, and a checkpoint of that submodule loads into the LM."""
        model = self.model()
        base = getattr(model, model.base_model_prefix, None)
        assert isinstance(base, nn.Module) and base is not model, f"no submodule {model.base_model_prefix!r}"
        assert model.base_model is base
        assert isinstance(base, self.tester.base_model_class)
        base.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path, config=model.config)
        expected = base.state_dict()
        got = getattr(loaded, loaded.base_model_prefix).state_dict()
        for name, tensor in expected.items():
            _exact(got[name], tensor, f"{model.base_model_prefix}.{name} after loading the base checkpoint")

    def test_embedding_accessors(self):
        """get/set input and output embeddings; the forward uses what was set."""
        model = self.model()
        config = model.config.get_text_config()
        embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert isinstance(embeddings, nn.Embedding) and embeddings.num_embeddings == config.vocab_size
        assert isinstance(head, nn.Linear) and head.out_features == config.vocab_size
        ids = self.tester.input_ids(batch=1)
        before = _logits(model, input_ids=ids)
        replacement = nn.Embedding(embeddings.num_embeddings, embeddings.embedding_dim)
        with torch.no_grad():
            replacement.weight.copy_(embeddings.weight * 2)
        model.set_input_embeddings(replacement)
        assert model.get_input_embeddings() is replacement
        assert not torch.equal(_logits(model, input_ids=ids), before), "set_input_embeddings did not reach forward"
        new_head = nn.Linear(head.in_features, head.out_features, bias=False)
        model.set_output_embeddings(new_head)
        assert model.get_output_embeddings() is new_head

    def test_resize_token_embeddings(self):
        """Growing and shrinking the vocabulary keeps old rows, updates every vocab_size, and the LM runs on it."""
        model = self.model()
        old = model.get_input_embeddings().weight.detach().clone()
        vocab = old.shape[0]
        tied = bool(model.config.get_text_config().tie_word_embeddings)
        model.resize_token_embeddings(vocab + 7)
        assert model.get_input_embeddings().num_embeddings == vocab + 7
        assert model.get_output_embeddings().out_features == vocab + 7
        assert model.config.get_text_config().vocab_size == vocab + 7 == model.config.vocab_size
        _exact(model.get_input_embeddings().weight[:vocab].detach(), old, "kept embedding rows")
        if tied:
            assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        ids = torch.cat([self.tester.input_ids(batch=1), torch.tensor([[vocab + 6]])], dim=1)
        assert _logits(model, input_ids=ids).shape[-1] == vocab + 7
        model.resize_token_embeddings(vocab - 2)
        assert model.config.get_text_config().vocab_size == vocab - 2 == model.config.vocab_size
        assert _logits(model, input_ids=ids.clamp(max=vocab - 3)).shape[-1] == vocab - 2

    @pytest.mark.parametrize("tie", [True, False])
    def test_tie_word_embeddings(self, tie: bool, tmp_path: Path):
        """``tie_word_embeddings`` on the (wrapper) config decides whether the LM head shares the embeddings."""
        model = self.tester.create_model(tie_word_embeddings=tie)
        assert bool(model.config.tie_word_embeddings) is tie
        assert bool(model.config.get_text_config().tie_word_embeddings) is tie
        shared = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert shared is tie
        model.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path)
        assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) is tie
        _exact(loaded.get_output_embeddings().weight, model.get_output_embeddings().weight, "LM head after reload")

    # ---- forward outputs -------------------------------------------------------------------------------------------

    def test_return_dict_false_gives_transformers_tuple(self):
        """``return_dict=False``: a tuple in the output class's field order, without the ``None`` fields."""
        model = self.model()
        ids = self.tester.input_ids()
        with torch.no_grad():
            as_dict = model(input_ids=ids, labels=ids, output_hidden_states=True)
            as_tuple = model(input_ids=ids, labels=ids, output_hidden_states=True, return_dict=False)
        assert isinstance(as_tuple, tuple) and not isinstance(as_tuple, dict)
        expected = as_dict.to_tuple()
        assert len(as_tuple) == len(expected)
        _exact(as_tuple[0], as_dict.loss, "tuple[0] is the loss")
        logits_index = [key for key in as_dict.keys()].index("logits")
        _exact(as_tuple[logits_index], as_dict.logits, "logits in the tuple")
        hidden = as_tuple[[key for key in as_dict.keys()].index("hidden_states")]
        assert len(hidden) == self.tester.num_hidden_states
        model.config.return_dict = False
        with torch.no_grad():
            assert isinstance(model(input_ids=ids), tuple), "config.return_dict=False is not honoured"

    def test_output_hidden_states(self):
        """``num_hidden_states`` states ``[b, T, hidden]``: the first is the input embeddings, the last is what the
        LM head reads (``logits == head(hidden_states[-1])``); also from ``config.output_hidden_states``."""
        model = self.model()
        ids = self.tester.input_ids()
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
            embeddings = model.get_input_embeddings()(ids)
            head_logits = model.get_output_embeddings()(out.hidden_states[-1])
        states = out.hidden_states
        assert states is not None and len(states) == self.tester.num_hidden_states
        for state in states:
            assert state.shape == embeddings.shape
        _exact(states[0], embeddings, "hidden_states[0] vs the input embeddings")
        _exact(out.logits, head_logits, "logits vs LM head of hidden_states[-1]")
        assert not torch.equal(states[1], states[0]), "the first layer changed nothing"
        model.config.output_hidden_states = True
        with torch.no_grad():
            assert len(model(input_ids=ids).hidden_states) == self.tester.num_hidden_states

    def test_output_attentions(self):
        """Softmax attention weights ``[b, heads, T, keys]`` whose rows sum to 1, or a declared refusal."""
        model = self.model()
        ids = self.tester.input_ids()
        if not self.supports(model, "output_attentions"):
            self.expect_refusal(model, "output_attentions", lambda: model(input_ids=ids, output_attentions=True))
            self.expect_refusal(
                model,
                "output_attentions",
                lambda: _generate(
                    model, input_ids=ids, max_new_tokens=2, return_dict_in_generate=True, output_attentions=True
                ),
            )
            if type(model)._supports_sdpa:  # transformers itself refuses the config flag under SDPA
                model.set_attn_implementation("eager")
            model.config.output_attentions = True  # the config default is refused the same way
            self.expect_refusal(model, "output_attentions", lambda: model(input_ids=ids))
            return
        if type(model)._supports_sdpa:  # SDPA computes no weights: a clear error, never None; eager returns them
            model.set_attn_implementation("sdpa")
            with pytest.raises(ValueError, match="output_attentions"):
                model(input_ids=ids, output_attentions=True)
            model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True)
        assert out.attentions is not None and len(out.attentions) >= 1
        for weights in out.attentions:
            assert weights.shape[0] == ids.shape[0] and weights.shape[2] == ids.shape[1]
            assert weights.shape[3] >= ids.shape[1]
            _close(weights.sum(-1), torch.ones_like(weights.sum(-1)), "attention rows sum to 1")

    def test_inputs_embeds_forward(self):
        """``inputs_embeds`` equal to the ids' embeddings give exactly the ids' logits."""
        model = self.model()
        ids = self.tester.input_ids()
        if not self.supports(model, "inputs_embeds"):
            embeds = model.get_input_embeddings()(ids)
            self.expect_refusal(model, "inputs_embeds", lambda: model(inputs_embeds=embeds))
            return
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
            _exact(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits, "logits from inputs_embeds")
        with pytest.raises(ValueError):
            model(input_ids=ids, inputs_embeds=embeds)

    def test_inputs_embeds_generate(self):
        """``generate(inputs_embeds=...)`` returns the new tokens only, the same as from the ids."""
        model = self.model()
        ids = self.tester.input_ids()
        n = self.tester.max_new_tokens
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
        if not self.supports(model, "inputs_embeds"):
            self.expect_refusal(
                model, "inputs_embeds", lambda: _generate(model, inputs_embeds=embeds, max_new_tokens=n)
            )
            return
        from_ids = _generate(model, input_ids=ids, max_new_tokens=n)
        from_embeds = _generate(model, inputs_embeds=embeds, max_new_tokens=n)
        _exact(from_embeds, from_ids[:, ids.shape[1] :], "tokens generated from inputs_embeds")

    def test_bf16_forward_and_generate(self):
        """The model runs in bfloat16: finite bf16 logits, and generate works."""
        model = self.model().to(torch.bfloat16)
        ids = self.tester.input_ids()
        logits = _logits(model, input_ids=ids)
        assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
        out = _generate(model, input_ids=ids, max_new_tokens=2)
        assert out.shape == (ids.shape[0], ids.shape[1] + 2)

    def test_eager_equals_sdpa(self):
        """Where the model offers both attention implementations, they compute the same logits and hidden states;
        elsewhere transformers refuses to switch (``_supports_sdpa`` is False)."""
        model = self.model()
        ids = self.tester.input_ids()
        if not type(model)._supports_sdpa:
            with pytest.raises(ValueError, match="sdpa|SDPA|scaled_dot_product"):
                type(model)._from_config(self.tester.get_config(), attn_implementation="sdpa")
            return
        outputs = {}
        for implementation in ("eager", "sdpa"):
            model.set_attn_implementation(implementation)
            with torch.no_grad():
                outputs[implementation] = model(input_ids=ids, output_hidden_states=True)
        _close(outputs["eager"].logits, outputs["sdpa"].logits, "eager vs sdpa logits")
        for eager, sdpa in zip(outputs["eager"].hidden_states, outputs["sdpa"].hidden_states):
            _close(eager, sdpa, "eager vs sdpa hidden states")

    def test_left_padded_batch_equals_rows_alone(self):
        """Left-padded rows give, at their real tokens, what each row gives alone; greedy generation too."""
        model = self.model()
        ids = self.tester.input_ids()
        short = ids.shape[1] - 3
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        padded = ids.clone()
        padded[1, :3] = 0
        if not self.supports(model, "padded_batches"):
            self.expect_refusal(model, "padded_batches", lambda: model(input_ids=padded, attention_mask=mask))
            return
        batch_logits = _logits(model, input_ids=padded, attention_mask=mask)
        _close(batch_logits[0], _logits(model, input_ids=ids[:1])[0], "row 0 in the batch vs alone")
        _close(batch_logits[1, 3:], _logits(model, input_ids=ids[1:, 3:])[0], "padded row 1 vs alone")
        n = self.tester.max_new_tokens
        together = _generate(model, input_ids=padded, attention_mask=mask, max_new_tokens=n)
        _exact(together[0], _generate(model, input_ids=ids[:1], max_new_tokens=n)[0], "row 0 generation")
        alone = _generate(model, input_ids=ids[1:, 3:], max_new_tokens=n)[0]
        _exact(together[1, 3:], alone, "padded row 1 generation")
        assert alone.shape[0] == short + n

    # ---- save / load -----------------------------------------------------------------------------------------------

    def test_save_and_load_safetensors(self, tmp_path: Path):
        """save_pretrained writes safetensors; from_pretrained(output_loading_info=True) reports nothing missing and
        the reloaded model computes exactly the same logits."""
        model = self.model()
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
        loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
        assert isinstance(loaded, type(model))
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            assert not info[key], f"{key}: {info[key]}"
        ids = self.tester.input_ids()
        _exact(_logits(loaded.eval(), input_ids=ids), _logits(model, input_ids=ids), "logits after reload")

    def test_fresh_process_trust_remote_code(self, tmp_path: Path):
        """A new Python process loads the checkpoint with ``trust_remote_code=True`` through the shims written next
        to the weights, gets the package's own classes and computes the same logits."""
        model = self.model()
        folder = tmp_path / "checkpoint"
        modules = assert_fresh_process_roundtrip(model, folder, self.tester.input_ids(batch=1))
        assert modules["model_module"] == type(model).__module__
        assert modules["config_module"] == type(model.config).__module__
        for shim in folder.glob("*.py"):  # thin shims that import the installed package, never copies of the code
            text = shim.read_text()
            assert "class " not in text and "hf_longmem" in text, f"{shim.name} is not a shim"

    # ---- training --------------------------------------------------------------------------------------------------

    def test_gradient_checkpointing_same_gradients(self):
        """With gradient checkpointing the recomputed forward gives exactly the same loss and gradients (the
        recompute runs the same operations on the same numbers), and checkpointing really happens."""
        model = self.model()
        ids = self.tester.input_ids()
        if not self.supports(model, "gradient_checkpointing"):
            with pytest.raises(ValueError, match="checkpointing"):
                model.activation_checkpointing_enable()
            return

        def step():
            model.zero_grad(set_to_none=True)
            loss = self.tester.training_loss(model, ids)
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        model.train()
        loss, grads = step()
        assert grads, "no parameter received a gradient"
        calls = []
        model.activation_checkpointing_enable({"use_reentrant": False})
        assert model.is_activation_checkpointing
        for module in model.modules():
            function = module.__dict__.get("_gradient_checkpointing_func")
            if function is not None:
                module._gradient_checkpointing_func = lambda *a, _f=function, **k: (calls.append(1), _f(*a, **k))[1]
        checkpointed_loss, checkpointed_grads = step()
        assert calls, "gradient checkpointing is enabled but nothing was checkpointed"
        _exact(checkpointed_loss, loss, "loss with gradient checkpointing")
        assert checkpointed_grads.keys() == grads.keys()
        for name in grads:
            _exact(checkpointed_grads[name], grads[name], f"gradient of {name}")
        model.activation_checkpointing_disable()
        assert not model.is_activation_checkpointing

    # ---- generation ------------------------------------------------------------------------------------------------

    def test_generate_greedy_dict_outputs(self):
        """Greedy ``generate`` with ``return_dict_in_generate``: scores, logits and hidden states per step, tokens the
        argmax of the scores, and the same tokens/logits as full forwards without a cache."""
        model = self.model()
        ids = self.tester.input_ids()
        n = self.tester.max_new_tokens
        out = _generate(
            model,
            input_ids=ids,
            max_new_tokens=n,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            output_hidden_states=True,
        )
        assert out.sequences.shape == (ids.shape[0], ids.shape[1] + n)
        assert len(out.scores) == len(out.logits) == len(out.hidden_states) == n
        for step in range(n):
            _exact(out.scores[step].argmax(-1), out.sequences[:, ids.shape[1] + step], f"token {step} vs its scores")
            states = out.hidden_states[step]
            assert len(states) == self.tester.num_hidden_states
            assert states[-1].shape[1] == (ids.shape[1] if step == 0 else 1)
        reference, reference_logits = _no_cache_greedy(self.tester, model, ids, n)
        _exact(out.sequences, reference, "cached greedy vs full forwards")
        for step in range(n):
            _close(out.logits[step], reference_logits[step], f"step {step} logits: cache vs full forward")

    def test_generate_sampling(self):
        """Sampling is reproducible under a seed and returns one score per step."""
        model = self.model()
        ids = self.tester.input_ids()
        n = self.tester.max_new_tokens
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append(
                _generate(
                    model,
                    input_ids=ids,
                    max_new_tokens=n,
                    do_sample=True,
                    top_k=0,
                    return_dict_in_generate=True,
                    output_scores=True,
                )
            )
        _exact(runs[0].sequences, runs[1].sequences, "same seed, same samples")
        assert len(runs[0].scores) == n
        assert runs[0].sequences.shape == (ids.shape[0], ids.shape[1] + n)
        several = _generate(model, input_ids=ids, max_new_tokens=n, do_sample=True, num_return_sequences=3)
        assert several.shape == (ids.shape[0] * 3, ids.shape[1] + n)
        _exact(several[:, : ids.shape[1]], ids.repeat_interleave(3, dim=0), "prompts of num_return_sequences")

    def test_generate_beam_search(self):
        """Beam search reorders the model's state: each returned beam's ``sequences_scores`` (``length_penalty=0``:
        the sum of its token log-probabilities) equals what full forwards over the finished sequence give."""
        model = self.model()
        ids = self.tester.input_ids()
        n = self.tester.max_new_tokens
        out = _generate(
            model,
            input_ids=ids,
            max_new_tokens=n,
            num_beams=3,
            num_return_sequences=2,
            length_penalty=0.0,
            early_stopping=True,
            return_dict_in_generate=True,
            output_scores=True,
        )
        assert out.sequences.shape == (ids.shape[0] * 2, ids.shape[1] + n)
        assert out.beam_indices is not None and len(out.scores) == n
        prompts = ids.repeat_interleave(2, dim=0)
        logprobs = torch.log_softmax(self.tester.reference_logits(model, prompts, out.sequences).float(), -1)
        new = out.sequences[:, ids.shape[1] :]
        expected = logprobs[:, ids.shape[1] - 1 : -1].gather(-1, new[..., None]).squeeze(-1).sum(-1)
        _close(out.sequences_scores, expected, "beam scores vs full-forward log-probabilities", atol=1e-4)

    def test_generate_continues_from_returned_cache(self):
        """``generate`` continued from the cache it returned equals one longer ``generate``."""
        model = self.model()
        ids = self.tester.input_ids()
        n = self.tester.max_new_tokens
        first = _generate(model, input_ids=ids, max_new_tokens=n, return_dict_in_generate=True)
        assert first.cache is not None
        continued = _generate(model, input_ids=first.sequences, cache=first.cache, max_new_tokens=n)
        _exact(continued, _generate(model, input_ids=ids, max_new_tokens=2 * n), "continued generation")

    def test_declared_refusals_are_documented(self):
        """Every declared-unsupported feature is a known one, has a reason, and is named in the architecture's doc
        (as are the transformers flags it leaves off)."""
        from hf_longmem.modeling.causal_lm import KNOWN_FEATURES

        cls = self.tester.model_class
        text = (Path(__file__).resolve().parents[2] / self.tester.doc).read_text()
        assert "## transformers conformance" in text
        for feature, reason in cls._unsupported_features.items():
            assert feature in KNOWN_FEATURES and len(reason) > 20, f"{feature}: {reason!r}"
            assert f"`{feature}`" in text, f"{self.tester.doc} does not name the unsupported {feature}"
        if not cls._supports_sdpa:
            assert "_supports_sdpa = False" in text
        if self.tester.stateful:
            assert "_is_stateful = True" in text

    def test_assisted_decoding_matches_greedy_or_is_refused(self):
        """``_is_stateful`` is declared as the tester says; a stateful model refuses assisted decoding clearly, any
        other gives with prompt-lookup drafts (accepted and rejected ones) exactly the greedy tokens."""
        model = self.model()
        assert bool(getattr(model, "_is_stateful", False)) is self.tester.stateful
        ids = self.tester.input_ids(batch=1)
        ids = torch.cat([ids, ids[:, :6]], dim=1)  # a repeated span, so that prompt lookup drafts tokens
        if self.tester.stateful:
            with pytest.raises(ValueError, match="assisted decoding"):
                _generate(model, input_ids=ids, max_new_tokens=3, prompt_lookup_num_tokens=2)
            return
        n = 2 * self.tester.max_new_tokens
        greedy = _generate(model, input_ids=ids, max_new_tokens=n)
        _exact(
            _generate(model, input_ids=ids, max_new_tokens=n, prompt_lookup_num_tokens=3),
            greedy,
            "assisted decoding vs greedy",
        )


__all__ = ["ATOL", "RTOL", "ConformanceSuite", "ModelTester", "randomize_", "tiny_backbone_config"]
