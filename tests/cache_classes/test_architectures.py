"""Issue 15's rule in CI: every registered cache on a tiny model of every decoder architecture transformers ships.

Each (architecture, cache) cell must pass or be refused up front (``tests/helpers/architecture_rule.py``); a FAIL fails
the architecture's test with every failing cell's message. The architectures come from transformers' own mappings
(``tests/helpers/architectures.py``): a new release adds its models here without an edit; what cannot be built from a
config is skipped with the reason.

CI share (2 cores): the prompts are short (:data:`CI_SIZES`), checks (a) full budget == DynamicCache and (c) padded
rows == rows alone run on every cell, and two of (b), (d), (e), (f), (g) per cell, rotating over architectures and
caches so that every check runs on every cache across the matrix (on 2/5 of the architectures). The complete matrix (every check on every cell,
longer prompts) is ``python benchmarks/architecture_matrix.py``, which writes ``docs/support.md``.
"""

from __future__ import annotations

import gc

import pytest
import torch

from hf_longmem import available_caches
from tests.helpers.architecture_rule import Case, Sizes, run_check
from tests.helpers.architectures import HARD_FEATURES, architecture_names, build_skip_reason, static_skip_reason

#: Short sequences: a 14-token prompt (longer than the 8-token budget, so caches evict, and than the tiny models'
#: sliding window of 12), a 10-token left-padded row (compressed too: more than the budget), 2 new tokens.
CI_SIZES = Sizes(prompt=14, short=10, new=2, turn=2, small_budget=8, full_budget=64)
ROTATING = "bdefg"
EVERYWHERE = "ac"

ROWS = [name for name in architecture_names() if static_skip_reason(name) is None] + list(HARD_FEATURES)
STATIC_SKIPS = {name: static_skip_reason(name) for name in architecture_names() if static_skip_reason(name)}


def checks_for(row_index: int, cache_index: int) -> str:
    """(a), (c) and two rotating checks: over 5 consecutive architectures each cache meets every rotating check twice."""
    turn = row_index + cache_index
    return EVERYWHERE + ROTATING[turn % len(ROTATING)] + ROTATING[(turn + 2) % len(ROTATING)]


@pytest.mark.parametrize("name", ROWS)
def test_every_cache_passes_or_is_refused(name):
    if name not in HARD_FEATURES:
        reason = build_skip_reason(name)
        if reason is not None:
            pytest.skip(reason)
    torch.set_num_threads(1)
    row_index = ROWS.index(name)
    case = Case(name, sizes=CI_SIZES)
    caches = available_caches()
    checks = {cache: checks_for(row_index, index) for index, cache in enumerate(caches)}
    case.prepare("".join(sorted(set("".join(checks.values())))))
    failures = []
    for cache in caches:
        for check in checks[cache]:
            verdict = run_check(case, cache, check)
            if verdict.startswith("FAIL"):
                failures.append(f"{cache} ({check}): {verdict}")
    del case
    gc.collect()
    assert not failures, f"{name}: " + "\n".join(failures)


def test_the_matrix_covers_the_decoder_architectures():
    """The enumeration finds transformers' decoder-only LMs and skips only the kinds that cannot be built."""
    rows = set(ROWS)
    for expected in ("llama", "mistral", "qwen2", "gemma2", "gpt_neox", "gpt_oss", "deepseek_v3", "exaone4"):
        assert expected in rows
    for skipped, kind in (("bart", "encoder-decoder"), ("bert", "encoder architecture"), ("gemma3", "multimodal")):
        assert STATIC_SKIPS[skipped].startswith(kind)
    assert build_skip_reason("rwkv").startswith("uses its own cache class")


def test_a_wrong_cache_is_a_fail_and_a_value_error_up_front_is_a_refusal():
    """The harness itself: a cache that drops a token at full budget fails (a); one whose constructor raises is refused."""
    from hf_longmem import registry
    from hf_longmem.cache_classes.streaming import StreamingCache

    class DropsOneToken(StreamingCache):  # keeps budget - 1 tokens whatever it is told
        def __init__(self, budget: int = 256, config=None):
            super().__init__(budget=4, sink_size=1, config=config)

    class RefusesEverything(StreamingCache):
        def __init__(self, budget: int = 256, config=None):
            raise ValueError("unsupported model: test")

    case = Case("llama", sizes=CI_SIZES)
    case.prepare("a")
    try:
        registry.register_cache("test_drops", DropsOneToken)
        registry.register_cache("test_refuses", RefusesEverything)
        assert run_check(case, "test_drops", "a").startswith("FAIL: full budget vs DynamicCache")
        assert run_check(case, "test_refuses", "a") == "refused: unsupported model: test"
        assert run_check(case, "streaming", "a") == "pass"
    finally:
        registry._REGISTRY.pop("test_drops", None)
        registry._REGISTRY.pop("test_refuses", None)
