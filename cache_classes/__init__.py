"""The cache methods (installed as ``hf_longmem.cache_classes``): one module per method, each registering itself
with :func:`hf_longmem.registry.register_cache` where it is defined. ``import hf_longmem`` imports every module of
this package (:func:`hf_longmem.registry.import_cache_modules`), so a method added as a new module is registered, and
so enumerated by ``make_cache``, the CLI, the bench and the shared tests, without touching any list."""
