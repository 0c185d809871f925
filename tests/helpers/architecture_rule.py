"""The rule of issue 15, as checks that give a verdict per (architecture, cache) cell.

A cell either passes every check or is refused: a ``ValueError`` from ``make_cache`` (the constructor) or from the
first forward that uses the cache (its first ``update``), before any token is produced. Anything else is a failure:
wrong output, or any other exception (``AttributeError``, a shape error, ...), or a ``ValueError`` raised later.

Verdicts are strings: ``"pass"``, ``"refused: <message>"``, ``"FAIL: <what>"``, and ``"n/a: <why>"`` for a check that
does not apply to the pair (e.g. (g) for a cache that does not re-rotate keys, or (c) on a model whose own
``DynamicCache`` output already differs when left-padded). The checks:

* ``a`` full budget == ``DynamicCache``: same greedy tokens, logits within float tolerance;
* ``b`` a compressing budget stores fewer bytes (``memory_bytes()``) than the full cache;
* ``c`` a left-padded batch at a compressing budget gives, row by row, what each row gives alone;
* ``d`` beam search runs and matches ``DynamicCache`` at full budget;
* ``e`` sampling runs;
* ``f`` ``pipeline("text-generation")`` with the cache in the generate kwargs runs;
* ``g`` for caches that re-rotate keys: after eviction, the logits equal the model run on the kept tokens at the
  shifted positions.

Tolerance (float32). A cache at full budget, or a padded row, computes the same attention as the reference but in
another order (our attention function vs the model's, an extra masked column, concatenated vs appended K/V). Each
sum of ``K`` products then differs by at most about ``K * eps`` relative to the sum of magnitudes (``eps = 2^-23``,
``K <= 128`` here: ``1.5e-5``); a few layers with per-layer gains of order 1 to 10 (the weights are N(0, 0.2^2))
bring the logits to about ``1e-4`` of their own scale. So logits are compared with
``atol = rtol = 1e-4 * max(1, max|logit|)``. Greedy tokens must be equal, except where the reference's top two
logits are closer than that bound (a tie that float rounding may break either way): from such a step on, the two
generations are different but equally valid, and only the steps before it are compared.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from hf_longmem import make_cache
from hf_longmem.cache_classes.base import cache_memory_bytes
from hf_longmem.cache_classes.rotation import ShiftedLayer
from hf_longmem.registry import get_cache_spec
from tests.helpers.architectures import build_model
from tests.helpers.cache_cases import matrix_case, resolve
from tests.helpers.reference import greedy
from tests.helpers.tiny_models import random_ids

CHECKS = ("a", "b", "c", "d", "e", "f", "g")
CHECK_NAMES = {
    "a": "full budget == DynamicCache",
    "b": "compressing budget stores fewer bytes",
    "c": "left-padded batch == rows alone",
    "d": "beam search == DynamicCache at full budget",
    "e": "sampling runs",
    "f": "pipeline('text-generation') runs",
    "g": "re-rotated keys == model on kept tokens at shifted positions",
}

#: Float32 tolerance relative to the logits' scale (see the module docstring for the derivation).
REL_TOL = 1e-4

# Options: the registry's ``options_for_budget``, with what a method needs on these tiny random models (a head pattern,
# an observation window shorter than the prompt, a channel ratio that prunes nothing at full budget, re-rotation for
# (g)) declared in the method's own test module (``matrix_full`` / ``matrix_small`` / ``matrix_shift`` of its
# :class:`tests.helpers.cache_cases.CacheCase`).


@dataclass(frozen=True)
class Sizes:
    """Lengths of the checks (tokens). ``full_budget`` must exceed every sequence; ``small_budget`` must not.

    Attributes:
        prompt: prompt length of (a), (b), (d), (e), and of the long row of (c).
        short: real tokens of the short (left-padded) row of (c).
        new: tokens generated per check.
        turn: tokens of the second forward of (g).
        small_budget: the compressing budget (b), (c), (e), (f), (g).
        full_budget: the budget that holds everything (a), (d).
    """

    prompt: int = 20
    short: int = 9
    new: int = 4
    turn: int = 3
    small_budget: int = 8
    full_budget: int = 256


FULL_SIZES = Sizes()


class Refused(Exception):
    """A ``ValueError`` raised by the cache before any token was produced."""


class Failed(Exception):
    """A check saw wrong output (the message says what)."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"


class ForwardCounter:
    """Whether a token was produced before a ``ValueError`` (none: a refusal).

    A token is produced by the forward before the first decoding step: the error counts as a refusal while no
    forward of one token per row has started (a prompt fed in chunks is several forwards before the first token).
    Forwards are counted when they start: a forward hook could run before a cache hook that raises in the same
    forward (hooks run in registration order).
    """

    def __init__(self, model):
        self.started = 0
        self.decoding = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    @property
    def count(self) -> int:
        """Forwards completed before the error, when a token had been produced by then; else 0."""
        return max(0, self.started - 1) if self.decoding else 0

    def _hook(self, module, args, kwargs):
        self.started += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.shape[-1] == 1:
            self.decoding += 1

    def close(self):
        self._handle.remove()


@contextlib.contextmanager
def cache_run(model):
    """Runs a generation with one of our caches: ValueError before the first forward -> :class:`Refused`."""
    counter = ForwardCounter(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except ValueError as error:
        if counter.count == 0:
            raise Refused(_first_line(error)) from error
        raise Failed(f"ValueError after {counter.count} forward(s): {_first_line(error)}") from error
    finally:
        counter.close()


def build_cache(cache_name: str, model, options: dict):
    """``make_cache``; a ``ValueError`` there is a refusal."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make_cache(cache_name, model, **options)
    except ValueError as error:
        raise Refused(_first_line(error)) from error


def close_cache(cache) -> None:
    if hasattr(cache, "close"):
        cache.close()


def full_options(cache_name: str, sizes: Sizes, model) -> dict:
    """Options that hold every token of the checks (``sizes.full_budget`` > prompt + new)."""
    options = dict(get_cache_spec(cache_name).options_for_budget(sizes.full_budget))
    options.update(matrix_case(cache_name).matrix_full)
    return resolve(options, model)


def small_options(cache_name: str, sizes: Sizes, model) -> dict:
    """Options of the compressing budget ``sizes.small_budget``."""
    options = dict(get_cache_spec(cache_name).options_for_budget(sizes.small_budget))
    options.update(matrix_case(cache_name).matrix_small)
    return resolve(options, model)


def logits_tolerance(reference: torch.Tensor) -> float:
    return REL_TOL * max(1.0, float(reference.abs().max()))


def compare_generations(seq, logits, ref_seq, ref_logits, prompt_len: int, what: str) -> None:
    """Greedy outputs vs a reference, tie-aware (module docstring).

    Args:
        seq, ref_seq: ``[prompt_len + steps]`` token ids of one row.
        logits, ref_logits: ``[steps, vocab]`` logits of each generation step of that row.
    """
    tol = logits_tolerance(ref_logits)
    steps = ref_logits.shape[0]
    new, ref_new = seq[prompt_len:], ref_seq[prompt_len:]
    differ = (new != ref_new).nonzero()
    last = int(differ[0]) if differ.numel() else steps - 1  # compare logits up to and including this step
    error = (logits[: last + 1] - ref_logits[: last + 1]).abs()
    bound = tol + tol * ref_logits[: last + 1].abs()
    if bool((error > bound).any()):
        step = int((error > bound).any(-1).nonzero()[0])
        raise Failed(
            f"{what}: logits differ at step {step} by {float(error[step].max()):.3g} (tolerance {tol:.3g})"
            + (f"; tokens differ from step {last}" if differ.numel() else "")
        )
    if differ.numel():
        top2 = ref_logits[last].topk(2).values
        if float(top2[0] - top2[1]) > 2 * tol:
            raise Failed(f"{what}: token {last} differs ({int(new[last])} vs {int(ref_new[last])}) without a tie")


def run_greedy(model, ids, cache, new: int, **kwargs):
    """``greedy`` returning ``(sequences [b, T], logits [steps, b, vocab])`` with a no-grad forward."""
    with torch.no_grad():
        return greedy(model, ids, cache, max_new_tokens=new, **kwargs)


# --------------------------------------------------------------------------------------------------- references
@dataclass
class Case:
    """One architecture of the matrix: its tiny model and lazily computed ``DynamicCache`` references."""

    name: str
    sizes: Sizes = FULL_SIZES
    attn_impl: str = "eager"
    _refs: dict = field(default_factory=dict)

    @functools.cached_property
    def model(self):
        return build_model(self.name, self.attn_impl)

    @functools.cached_property
    def prompt(self) -> torch.Tensor:
        return random_ids(1, self.sizes.prompt, seed=11)

    @functools.cached_property
    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(batch [2, P], mask [2, P], long_row [1, P], short_row [1, S])``: the short row left-padded with 0s."""
        p, s = self.sizes.prompt, self.sizes.short
        long_row, short_row = random_ids(1, p, seed=12), random_ids(1, s, seed=13)
        batch = torch.cat((long_row, torch.cat((torch.zeros(1, p - s, dtype=torch.long), short_row), 1)))
        mask = (torch.arange(p)[None] >= torch.tensor([[0], [p - s]])).long()
        return batch, mask, long_row, short_row

    def reference(self, key: str):
        """``DynamicCache`` runs, computed once per architecture (before any of our caches touches the model)."""
        if key not in self._refs:
            self._refs[key] = self._compute_reference(key)
        return self._refs[key]

    def _compute_reference(self, key: str):
        model, sizes = self.model, self.sizes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if key == "greedy":
                return run_greedy(model, self.prompt, DynamicCache(config=model.config), sizes.new)
            if key == "bytes":
                cache = DynamicCache(config=model.config)
                run_greedy(model, self.prompt, cache, sizes.new)
                return cache_memory_bytes(cache)
            if key == "beam":
                with torch.no_grad():
                    return model.generate(
                        self.prompt,
                        cache=DynamicCache(config=model.config),
                        max_new_tokens=sizes.new,
                        num_beams=2,
                        do_sample=False,
                    )
            if key == "padding":  # does the model itself give padded rows == rows alone?
                batch, mask, long_row, short_row = self.padded
                try:
                    check_padded_rows(
                        model, lambda: DynamicCache(config=model.config), batch, mask, (long_row, short_row), sizes.new
                    )
                except Failed as error:
                    return str(error)
                return None
        raise KeyError(key)

    def prepare(self, checks) -> None:
        """Computes every reference the ``checks`` need while the model still has its own attention."""
        needs = {"a": "greedy", "b": "bytes", "c": "padding", "d": "beam"}
        for check in checks:
            if check in needs:
                self.reference(needs[check])


def check_padded_rows(model, new_cache, batch, mask, rows, new: int) -> None:
    """Raises :class:`Failed` unless each row of the left-padded ``batch`` gives what it gives alone."""
    seq, logits = run_greedy(model, batch, new_cache(), new, attention_mask=mask, pad_token_id=0)
    width = batch.shape[1]
    for row, ids in enumerate(rows):
        row_seq, row_logits = run_greedy(model, ids, new_cache(), new)
        compare_generations(
            torch.cat((ids[0], seq[row, width:])),
            logits[:, row],
            row_seq[0],
            row_logits[:, 0],
            ids.shape[1],
            f"padded row {row} (of {ids.shape[1]} real tokens)",
        )


# ------------------------------------------------------------------------------------------------------- checks
def check_a(case: Case, cache_name: str) -> str:
    model, sizes = case.model, case.sizes
    ref_seq, ref_logits = case.reference("greedy")
    cache = build_cache(cache_name, model, full_options(cache_name, sizes, model))
    with cache_run(model):
        seq, logits = run_greedy(model, case.prompt, cache, sizes.new)
    close_cache(cache)
    compare_generations(seq[0], logits[:, 0], ref_seq[0], ref_logits[:, 0], sizes.prompt, "full budget vs DynamicCache")
    return "pass"


def memory_saving(cache_name: str) -> str:
    """What a method's budget bounds (the cache class's ``memory_saving``; default ``"stored"``).

    * ``"stored"``: every byte held (``memory_bytes()``) after the prompt and the answer;
    * ``"between_turns"``: the bytes held once a second turn arrives (SirLLM evicts only between turns);
    * ``"resident"``: the bytes on the compute device with offloading on (InfLLM, EM-LLM keep every block, in CPU
      memory, and bound what attention reads and what stays on the device);
    * ``"prompt"``: the bytes after the prompt (SnapKV, PyramidKV compress the prompt once and append what they
      generate: on an all-sliding model, a long answer fills the window as the full cache does).
    """
    return getattr(get_cache_spec(cache_name).cls, "memory_saving", "stored")


def check_b(case: Case, cache_name: str) -> str:
    model, sizes = case.model, case.sizes
    if not get_cache_spec(cache_name).options_for_budget(sizes.small_budget):
        return "n/a: the method has no budget"
    saving = memory_saving(cache_name)
    options = small_options(cache_name, sizes, model)
    if saving == "resident":  # the deployment these methods are for: blocks and representatives in CPU memory, a
        # device LRU of the blocks one step reads (at tiny block sizes the representatives alone outweigh the keys)
        options.update(offload=True, offload_representatives=True, max_cached_blocks=options.get("topk", 2))
    cache = build_cache(cache_name, model, options)
    with cache_run(model):
        seq, _ = run_greedy(model, case.prompt, cache, 1 if saving == "prompt" else sizes.new)
        if saving == "between_turns":  # the next turn: the tokens not yet cached, at their positions
            seen = cache.get_seq_length()
            turn = torch.cat((seq, random_ids(1, sizes.turn, seed=12)), dim=1)
            with torch.no_grad():
                model(turn[:, seen:], cache=cache, position_ids=torch.arange(seen, turn.shape[1])[None])
    if saving == "resident":
        held, what = cache.memory_breakdown()["resident"], "keeps on the compute device"
    else:
        held, what = cache.memory_bytes(), "stores"
    close_cache(cache)
    if saving == "between_turns":
        reference = DynamicCache(config=model.config)
        with torch.no_grad():
            model(turn, cache=reference)
        full_bytes, when = cache_memory_bytes(reference), " after a second turn"
    elif saving == "prompt":
        reference = DynamicCache(config=model.config)
        run_greedy(model, case.prompt, reference, 1)
        full_bytes, when = cache_memory_bytes(reference), " after the prompt"
    else:
        full_bytes, when = case.reference("bytes"), ""
    if held >= full_bytes:
        raise Failed(
            f"budget {sizes.small_budget} of {sizes.prompt + sizes.new} tokens {what} {held} bytes{when}, "
            f"the full cache {full_bytes}" + (": nothing compressed" if held == full_bytes else "")
        )
    return "pass"


def check_c(case: Case, cache_name: str) -> str:
    model, sizes = case.model, case.sizes
    baseline = case.reference("padding")
    if baseline is not None:
        return f"n/a: the model's own DynamicCache output differs when left-padded ({baseline})"
    batch, mask, long_row, short_row = case.padded
    options = small_options(cache_name, sizes, model)
    multiple_of = getattr(get_cache_spec(cache_name).cls, "padding_multiple_option", None)
    if multiple_of is not None:  # a method exact on paddings of whole chunks only (EM-LLM): pad like that
        p, m = long_row.shape[1], int(options[multiple_of])
        short_row = short_row[:, -(p - short_row.shape[1]) % m :]  # drop tokens until the padding is whole chunks
        s = short_row.shape[1]
        batch = torch.cat((long_row, torch.cat((torch.zeros(1, p - s, dtype=torch.long), short_row), 1)))
        mask = (torch.arange(p)[None] >= torch.tensor([[0], [p - s]])).long()
    caches = []

    def new_cache():
        caches.append(build_cache(cache_name, model, options))
        return caches[-1]

    try:
        with cache_run(model):
            check_padded_rows(model, new_cache, batch, mask, (long_row, short_row), sizes.new)
    finally:
        for cache in caches:
            close_cache(cache)
    return "pass"


def check_d(case: Case, cache_name: str) -> str:
    model, sizes = case.model, case.sizes
    ref = case.reference("beam")
    cache = build_cache(cache_name, model, full_options(cache_name, sizes, model))
    with cache_run(model), torch.no_grad():
        out = model.generate(case.prompt, cache=cache, max_new_tokens=sizes.new, num_beams=2, do_sample=False)
    close_cache(cache)
    if not torch.equal(out, ref):
        raise Failed(
            f"beam search at full budget gives {out[0, sizes.prompt :].tolist()}, DynamicCache {ref[0, sizes.prompt :].tolist()}"
        )
    return "pass"


def check_e(case: Case, cache_name: str) -> str:
    model, sizes = case.model, case.sizes
    cache = build_cache(cache_name, model, small_options(cache_name, sizes, model))
    torch.manual_seed(0)
    with cache_run(model), torch.no_grad():
        out = model.generate(
            case.prompt,
            cache=cache,
            max_new_tokens=sizes.new,
            do_sample=True,
            top_k=20,
            temperature=1.0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    close_cache(cache)
    if out.sequences.shape != (1, sizes.prompt + sizes.new):
        raise Failed(f"sampling returned shape {tuple(out.sequences.shape)}")
    if not all(bool(torch.isfinite(step).all()) for step in out.logits):
        raise Failed("sampling produced non-finite logits")
    return "pass"


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from tests.helpers.tiny_tokenizer import tiny_tokenizer

    return tiny_tokenizer()


def check_f(case: Case, cache_name: str) -> str:
    from transformers import pipeline

    model, sizes = case.model, case.sizes
    cache = build_cache(cache_name, model, small_options(cache_name, sizes, model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generator = pipeline("text-generation", model=model, tokenizer=_tokenizer(), device="cpu")
    prompt = "The cache keeps what matters."
    with cache_run(model), torch.no_grad():
        out = generator(prompt, cache=cache, max_new_tokens=sizes.new, do_sample=False, return_full_text=True)
    close_cache(cache)
    text = out[0]["generated_text"]
    if not (isinstance(text, str) and text.startswith(prompt)):
        raise Failed(f"pipeline returned {out!r}")
    return "pass"


def _wrap_attention_positions(cache) -> list:
    """Records, per layer, the stored positions ``[b, heads, n]`` each re-rotating layer attends to."""
    seen: list = [None] * len(cache.layers)
    for index, layer in enumerate(cache.layers):
        original = getattr(layer, "keys_for_attention", None)
        if original is None:
            continue

        def recording(keys, positions, real_before, _original=original, _index=index):
            seen[_index] = positions.clone()
            return _original(keys, positions, real_before)

        layer.keys_for_attention = recording
    return seen


@functools.cache
def rerotates_keys(cache_name: str) -> bool:
    """Whether the cache re-rotates kept keys (its layers on a full-attention Llama are :class:`ShiftedLayer` s with a
    rotation) once built with the (g) options."""
    from tests.helpers.tiny_models import tiny_model

    model = tiny_model("llama_gqa", "eager", num_hidden_layers=1)
    options = {**small_options(cache_name, FULL_SIZES, model), **resolve(matrix_case(cache_name).matrix_shift, model)}
    try:
        cache = build_cache(cache_name, model, options)
    except Refused:
        return False
    shifted = any(isinstance(layer, ShiftedLayer) and layer.rotary is not None for layer in cache.layers)
    close_cache(cache)
    return shifted


def check_g(case: Case, cache_name: str) -> str:
    """Re-rotation, on one-layer models (one per distinct layer of the case: with more layers the kept tokens' deeper
    K/V carry the evicted context, so no forward over the kept tokens alone is a reference).

    Prefill ``prompt`` tokens (evicting to the small budget), then one turn of ``turn`` tokens at its true positions;
    the turn's logits ``[turn, vocab]`` must equal one forward over ``kept + turn`` placed at the shifted positions
    ``prompt - kept .. prompt + turn - 1``. Sliding windows are set beyond every sequence, so that the forward is
    the reference for sliding layers too (a budget below the window must compress them).
    """
    if not rerotates_keys(cache_name):
        return "n/a: the cache does not re-rotate keys"
    failures = []
    for label, model in g_models(case):  # every layer kind, so that one failing kind does not hide another
        if isinstance(model, Exception):
            return f"n/a: a one-layer model ({label}) cannot be built: {describe(model)}"
        try:
            result = _check_g_one(case, cache_name, model)
        except Failed as failure:
            result = str(failure)
        except Refused:
            raise
        except Exception as error:  # noqa: BLE001 - reported with the layer kind
            result = describe(error)
        if result != "pass":
            failures.append(f"{label}: {result}")
    if failures:
        raise Failed("; ".join(failures))
    return "pass"


def _check_g_one(case: Case, cache_name: str, model) -> str:
    sizes = case.sizes
    options = {**small_options(cache_name, sizes, model), **resolve(matrix_case(cache_name).matrix_shift, model)}
    cache = build_cache(cache_name, model, options)
    seen = _wrap_attention_positions(cache)
    ids, turn = case.prompt, random_ids(1, sizes.turn, seed=14)
    p = sizes.prompt
    with cache_run(model), torch.no_grad():
        model(ids, cache=cache)
        logits = model(turn, cache=cache, position_ids=torch.arange(p, p + sizes.turn)[None]).logits[0]
    close_cache(cache)
    layer, positions = cache.layers[0], seen[0]
    # a ShiftedLayer without a rotation is a NoPE layer (shift mode refuses a RoPE layer it cannot rotate): positions
    # do not enter its keys, and the reference below (kept tokens at the shifted positions) still applies
    if positions is None or not isinstance(layer, ShiftedLayer):
        return (
            f"{type(layer).__name__} (window {getattr(layer, 'sliding_window', '-')}) is neither compressed nor "
            f"re-rotated at budget {sizes.small_budget}"
        )
    if not bool((positions == positions[:, :1]).all()):
        return "heads attend to different kept tokens"
    kept = positions[0, 0]
    kept = kept[kept >= 0].long()
    if kept.numel() >= p:
        return f"nothing was evicted from the {p}-token prompt at budget {sizes.small_budget}"
    sequence = torch.cat((ids[:, kept], turn), dim=1)
    start = p - kept.numel()
    with torch.no_grad():
        fresh = model(sequence, position_ids=torch.arange(start, start + sequence.shape[1])[None]).logits[
            0, -sizes.turn :
        ]
    tol = logits_tolerance(fresh)
    error = float((logits - fresh).abs().max())
    if error > tol + tol * float(fresh.abs().max()):
        return f"after eviction the re-rotated keys give logits {error:.3g} away from the model on the kept tokens"
    return "pass"


def g_models(case: Case) -> list:
    """``[(label, one-layer model)]``: one per distinct decoder layer of the case's model (per-layer config lists
    such as ``layer_types`` / ``no_rope_layers`` sliced to that layer), sliding windows beyond every sequence."""
    if "g_models" not in case._refs:
        config = case.model.config
        layers = config.num_hidden_layers
        per_layer = {
            key: value
            for key, value in config.to_dict().items()
            if isinstance(value, list) and len(value) == layers and key not in ("architectures",)
        }
        overrides = {"num_hidden_layers": 1}
        if getattr(config, "sliding_window", None) is not None:
            overrides["sliding_window"] = case.sizes.full_budget
        models, signatures = [], []
        for index in range(layers):
            layer_overrides = {key: [value[index]] for key, value in per_layer.items()}
            signature = repr(sorted(layer_overrides.items()))
            if signature in signatures:
                continue
            signatures.append(signature)
            label = f"layer {index} alone" + (
                f" ({layer_overrides['layer_types'][0]})" if "layer_types" in layer_overrides else ""
            )
            try:
                models.append((label, build_model(case.name, case.attn_impl, **overrides, **layer_overrides)))
            except Exception as error:  # noqa: BLE001 - reported as "n/a" by check_g
                models.append((label, error))
        case._refs["g_models"] = models
    return case._refs["g_models"]


CHECK_FUNCTIONS = {"a": check_a, "b": check_b, "c": check_c, "d": check_d, "e": check_e, "f": check_f, "g": check_g}


def run_check(case: Case, cache_name: str, check: str) -> str:
    """The verdict of one check on one (architecture, cache) cell."""
    try:
        return CHECK_FUNCTIONS[check](case, cache_name)
    except Refused as refusal:
        return f"refused: {refusal}"
    except Failed as failure:
        return f"FAIL: {failure}"
    except Exception as error:  # noqa: BLE001 - any other exception is a failure of the cell
        return f"FAIL: {describe(error)}"


#: Checks that run the cache with options of their own (not the method's defaults): their refusal alone (e.g.
#: StreamingLLM's ``position_mode="shift"`` on a model without RoPE) does not make the cell refused.
OPTION_CHECKS = ("g",)


def cell_verdict(verdicts: dict[str, str]) -> str:
    """One verdict for a cell from its checks ``{check: verdict}``: the first failure (``"FAIL (c): ..."``), else the
    first refusal of a check that runs the method's own options (``"refused (a): ..."``), else ``"pass"`` (checks
    that are "n/a", and refusals of :data:`OPTION_CHECKS`, count as passed)."""
    for check, verdict in verdicts.items():
        if verdict.startswith("FAIL"):
            return f"FAIL ({check}){verdict[4:]}"
    for check, verdict in verdicts.items():
        if verdict.startswith("refused") and check not in OPTION_CHECKS:
            return f"refused ({check}){verdict[7:]}"
    return "pass"


__all__ = ["CHECKS", "CHECK_NAMES", "Case", "Sizes", "cell_verdict", "run_check"]
