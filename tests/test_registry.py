"""make_cache / available_caches / register_cache."""

from __future__ import annotations

import pytest
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

import hf_longmem
from hf_longmem import StreamingCache, available_caches, make_cache, register_cache
from hf_longmem.cache_classes.streaming import StreamingLayer
from tests.helpers.tiny_models import tiny_config, tiny_model


def test_available_caches_lists_the_finished_methods():
    names = available_caches()
    assert names[0] == "full" and {"streaming", "snapkv", "infllm", "emllm"} <= set(names)
    for name in names:
        assert hf_longmem.get_cache_spec(name).summary


def test_every_method_module_registers_itself():
    """A cache method is one module of hf_longmem.cache_classes that registers itself: every module (but the shared
    machinery) has a registered method, and the order does not depend on what was imported first."""
    import pkgutil

    from hf_longmem import cache_classes
    from hf_longmem.registry import SHARED_CACHE_MODULES

    modules = {info.name for info in pkgutil.iter_modules(cache_classes.__path__)} - set(SHARED_CACHE_MODULES)
    registered = {hf_longmem.get_cache_spec(name).cls.__module__.rsplit(".", 1)[-1] for name in available_caches()}
    assert modules == registered
    builtin = [n for n in available_caches() if hf_longmem.get_cache_spec(n).cls.__module__.startswith("hf_longmem.")]
    modules_in_order = [hf_longmem.get_cache_spec(n).cls.__module__ for n in builtin[1:]]
    assert modules_in_order == sorted(modules_in_order)


def test_make_cache_from_model_config_or_nothing():
    model = tiny_model("llama_gqa")
    for source in (model, model.config, None):
        cache = make_cache("streaming", source, budget=32)
        assert isinstance(cache, StreamingCache)
    assert len(make_cache("streaming", model, budget=32).layers) == model.config.num_hidden_layers
    assert isinstance(make_cache("full", model), DynamicCache)


def test_hybrid_models_keep_their_sliding_layers():
    config = tiny_config(
        "qwen2", layer_types=["sliding_attention", "full_attention"], sliding_window=8, use_sliding_window=True
    )
    cache = make_cache("streaming", config, budget=32)
    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer)
    assert isinstance(cache.layers[1], StreamingLayer)


def test_unsupported_layer_types_are_refused():
    config = tiny_config("llama_gqa")
    config.layer_types = ["full_attention", "chunked_attention"]
    config.attention_chunk_size = 8
    with pytest.raises(ValueError, match="unsupported model"):
        make_cache("streaming", config, budget=32)


def test_bad_names_and_options_are_clear():
    with pytest.raises(ValueError, match="unknown cache 'snapkvv'.*streaming"):
        make_cache("snapkvv")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['budgte'\]"):
        make_cache("streaming", None, budgte=3)
    with pytest.raises(ValueError, match="model_or_config"):
        make_cache("streaming", "llama", budget=16)
    with pytest.raises(ValueError, match="cls"):
        register_cache("mine", dict)
    with pytest.raises(ValueError, match="name"):
        register_cache("bad name", StreamingCache)


def test_budgets_map_onto_each_method_s_own_options():
    from hf_longmem import get_cache_spec

    assert get_cache_spec("full").options_for_budget(128) == {}
    assert get_cache_spec("snapkv").options_for_budget(128) == {"budget": 128}
    assert get_cache_spec("sirllm").options_for_budget(128) == {"start_size": 4, "entropy_size": 124}
    assert get_cache_spec("duo_attention").options_for_budget(128) == {"sink_size": 16, "recent_size": 112}
    for name in available_caches():
        options = get_cache_spec(name).options_for_budget(64)
        hf_longmem.cache_classes.base.check_options(get_cache_spec(name).cls, options)


@pytest.mark.parametrize(
    "name, options",
    [
        ("h2o", dict(budget=16, recent_ratio="x")),
        ("h2o", dict(budget=16, recent_ratio=None)),
        ("snapkv", dict(budget="abc")),
        ("sirllm", dict(decay_ratio="x")),
        ("think", dict(key_channel_ratio=2.0)),
    ],
)
def test_a_refused_option_is_a_value_error_and_leaves_the_model_unchanged(name, options):
    from tests.helpers.tiny_models import tiny_model

    model = tiny_model("llama_gqa", "sdpa")
    hooks = len(model.model._forward_pre_hooks)
    with pytest.raises(
        ValueError, match=next(iter(k for k, v in options.items() if not isinstance(v, int) or k != "budget"))
    ):
        make_cache(name, model, **options)
    assert model.config._attn_implementation == "sdpa"
    assert len(model.model._forward_pre_hooks) == hooks


def test_import_submodules_imports_methods_and_skips_shared_private_and_plain_modules(tmp_path, monkeypatch):
    import sys

    from hf_longmem.registration import import_submodules

    package = tmp_path / "toy_methods"
    (package / "arch").mkdir(parents=True)
    for name in ("__init__.py", "b_method.py", "a_method.py", "shared.py", "_private.py", "arch/__init__.py"):
        (package / name).write_text(f"LOADED = {name!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_methods

    try:
        assert import_submodules("toy_methods", toy_methods.__path__, skip=("shared",)) == [
            "a_method",
            "arch",
            "b_method",
        ]
        assert "toy_methods.shared" not in sys.modules and "toy_methods._private" not in sys.modules
        assert sys.modules["toy_methods.b_method"].LOADED == "b_method.py"
        assert import_submodules("toy_methods", toy_methods.__path__, packages_only=True) == ["arch"]
    finally:
        for name in [m for m in sys.modules if m == "toy_methods" or m.startswith("toy_methods.")]:
            del sys.modules[name]
