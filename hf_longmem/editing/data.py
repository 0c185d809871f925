"""Edit sets for WISE: a ZsRE-format loader, a generator of fictional facts, unrelated prompts, tokenization.

- :func:`load_edits` reads real edit sets from a local file: EasyEdit's ZsRE files (``zsre_mend_eval.json``, a JSON
  array with ``src``/``alt``/``rephrase``/``loc``/``loc_ans``) or JSON Lines with the same keys, or with our own
  keys (``prompt``/``target``/``paraphrases``/``locality_prompt``/``locality_answer``).
- :func:`fictional_facts` generates counterfactual facts about invented entities (``"The special magic number
  for the walnut tiger is" -> "472"``) from words the tokenizer knows, so that it works offline with any tokenizer,
  including a closed word-level one: every template, entity and target is checked to encode without unknown
  tokens and to decode back to itself.
- :func:`unrelated_prompts` generates prompt/answer pairs of another form, for locality and as the irrelevant
  sample WISE trains each edit against.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EditRecord",
    "encode_pair",
    "fictional_facts",
    "known_text",
    "load_edits",
    "unrelated_prompts",
]


@dataclass
class EditRecord:
    """One edit request and its evaluation prompts.

    Attributes:
        prompt: text the edited model should continue with ``target`` (reliability).
        target: the new answer (joined to prompts with the editor's ``target_separator``, one space by default).
        paraphrases: rephrasings of ``prompt`` with the same answer (generalization).
        locality_prompt, locality_answer: an unrelated prompt and answer whose predictions must not change.
        subject: the edited entity, if known.
        ground_truth: the answer before the edit, if known.
        source: where the record comes from (a file path, ``"fictional(seed=0)"``).
    """

    prompt: str
    target: str
    paraphrases: list[str] = field(default_factory=list)
    locality_prompt: str | None = None
    locality_answer: str | None = None
    subject: str | None = None
    ground_truth: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer helpers
# ----------------------------------------------------------------------------------------------------------------------


def known_text(tokenizer: Any, text: str) -> bool:
    """True when ``tokenizer`` encodes ``text`` without unknown tokens and decodes it back to itself.

    For a closed word-level vocabulary this means every word of ``text`` is in the vocabulary.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        return False
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        return False
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return decoded.strip() == text.strip()


def encode_pair(tokenizer: Any, prompt: str, target: str, separator: str = " ") -> tuple[list[int], int]:
    """Token ids of ``prompt + separator + target`` and the number of prompt tokens.

    Target tokens are those that start at or after the end of ``prompt`` (by the fast tokenizer's offsets), so the
    separator's space belongs to the target's first token as it does in running text. Trailing special tokens
    (an EOS some tokenizers append) are dropped.

    Returns:
        ``(ids, num_prompt_tokens)`` with ``0 < num_prompt_tokens < len(ids)``.

    Raises:
        ValueError: ``prompt`` or ``target`` is empty, or the target gives no token of its own.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}.")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-empty string, got {target!r}.")
    full = prompt + separator + target
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        encoding = tokenizer(full, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
        encoding = tokenizer(full)
    ids = list(encoding["input_ids"])
    while ids and ids[-1] in special and len(ids) > 1:
        ids.pop()
        if offsets is not None:
            offsets = offsets[: len(ids)]
    boundary = len(prompt)
    if offsets is not None:
        num_prompt = len(ids)
        for index, (start, end) in enumerate(offsets):
            if end > start and (start >= boundary or end > boundary and ids[index] not in special):
                num_prompt = index
                break
    else:
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        while prompt_ids and prompt_ids[-1] in special and len(prompt_ids) > 1:
            prompt_ids.pop()
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                f"the tokenization of prompt {prompt!r} is not a prefix of that of prompt + target {full!r}; "
                "use a fast tokenizer (offsets) or change the separator."
            )
        num_prompt = len(prompt_ids)
    if num_prompt >= len(ids):
        raise ValueError(f"target {target!r} gives no token after prompt {prompt!r}.")
    if num_prompt == 0:
        raise ValueError(f"prompt {prompt!r} gives no token of its own before target {target!r}.")
    return ids, num_prompt


# ----------------------------------------------------------------------------------------------------------------------
# Loading real edit sets
# ----------------------------------------------------------------------------------------------------------------------

_KEYS = {
    "prompt": ("prompt", "src"),
    "target": ("target", "target_new", "alt"),
    "paraphrases": ("paraphrases", "rephrase", "rephrase_prompt"),
    "locality_prompt": ("locality_prompt", "loc"),
    "locality_answer": ("locality_answer", "loc_ans", "locality_ground_truth"),
    "subject": ("subject",),
    "ground_truth": ("ground_truth", "answers", "pred"),
}


def _first(item: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if item.get(key) is not None:
            return item[key]
    return None


def _as_text(value: Any, where: str, key: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
        if value is None:
            return None
    if isinstance(value, dict) and "str" in value:  # target_new: {"str": ...} (ROME/CounterFact style)
        value = value["str"]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {value!r}.")
    return value


def _record(item: Any, where: str, source: str) -> EditRecord:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}.")
    values: dict[str, Any] = {}
    for name, keys in _KEYS.items():
        raw = _first(item, keys)
        if name == "paraphrases":
            if raw is None:
                values[name] = []
            elif isinstance(raw, str):
                values[name] = [raw]
            elif isinstance(raw, (list, tuple)) and all(isinstance(p, str) for p in raw):
                values[name] = list(raw)
            else:
                raise ValueError(f"{where}: 'paraphrases' must be a string or a list of strings, got {raw!r}.")
        else:
            values[name] = _as_text(raw, where, name)
    for name in ("prompt", "target"):
        if not values[name] or not values[name].strip():
            raise ValueError(f"{where}: missing {name!r} (one of the keys {list(_KEYS[name])}).")
    return EditRecord(source=source, **values)


def load_edits(path: str | os.PathLike, *, limit: int | None = None) -> list[EditRecord]:
    """Read edit requests from a ZsRE-format file (JSON array or JSON Lines).

    Recognised keys per record (the first present wins): prompt ``prompt``/``src``; target
    ``target``/``target_new``/``alt``; paraphrases ``paraphrases``/``rephrase``/``rephrase_prompt`` (a string or a
    list); locality ``locality_prompt``/``loc`` and ``locality_answer``/``loc_ans``; ``subject``; ground truth
    ``ground_truth``/``answers``/``pred`` (first element of a list).

    Args:
        path: a ``.json`` file holding a list of records, or a ``.jsonl`` file with one record per line.
        limit: keep the first ``limit`` records.

    Returns:
        the records, in file order, with ``source`` set to the file name.

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed JSON or a record without prompt/target (the message names the line or index).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edit file {str(path)!r} does not exist.")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}.")
    text = path.read_text(encoding="utf-8")
    source = path.name
    records: list[EditRecord] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from error
        for index, item in enumerate(items):
            records.append(_record(item, f"{path.name} record {index}", source))
            if limit is not None and len(records) >= limit:
                break
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path.name} line {number} is not valid JSON: {error}") from error
            records.append(_record(item, f"{path.name} line {number}", source))
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"{str(path)!r} holds no edit records.")
    return records


# ----------------------------------------------------------------------------------------------------------------------
# Fictional facts
# ----------------------------------------------------------------------------------------------------------------------

#: Concrete nouns (entities and answers).
NOUNS: tuple[str, ...] = (
    "apple",
    "river",
    "candle",
    "tiger",
    "garden",
    "violin",
    "pepper",
    "island",
    "rocket",
    "marble",
    "forest",
    "lemon",
    "anchor",
    "pillow",
    "falcon",
    "meadow",
    "copper",
    "bridge",
    "cactus",
    "helmet",
    "jacket",
    "ladder",
    "magnet",
    "needle",
    "orange",
    "parrot",
    "quartz",
    "saddle",
    "tunnel",
    "velvet",
    "walnut",
    "yogurt",
    "barrel",
    "camera",
    "dragon",
    "engine",
    "feather",
    "glacier",
    "harbor",
    "insect",
    "jungle",
    "kettle",
    "lantern",
    "mirror",
    "nickel",
    "oyster",
    "planet",
    "rabbit",
    "silver",
    "teapot",
    "button",
    "valley",
    "window",
    "zebra",
    "basket",
    "cherry",
    "dolphin",
    "eagle",
    "fossil",
    "guitar",
    "hammer",
    "igloo",
    "kitten",
    "lobster",
    "castle",
    "pencil",
    "wizard",
    "robot",
    "pirate",
    "blanket",
    "compass",
    "lighthouse",
    "penguin",
    "volcano",
    "wagon",
    "whistle",
)
#: Modifiers of invented entities (any known noun also serves as a modifier: "walnut tiger").
MODIFIERS: tuple[str, ...] = (
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "golden",
    "wooden",
    "crystal",
    "iron",
    "paper",
    "tiny",
    "giant",
    "ancient",
    "hidden",
    "magic",
    "special",
    "silent",
    "frozen",
    "copper",
    "silver",
    "velvet",
    "marble",
)
COLORS: tuple[str, ...] = ("green", "blue", "yellow", "orange", "purple", "red", "black", "white", "brown", "pink")

#: Fact families: a prompt template, paraphrase templates (``{s}`` = the entity) and the kind of target.
FACT_FAMILIES: tuple[dict[str, Any], ...] = (
    {
        "prompt": "The special magic number for the {s} is",
        "paraphrases": (
            "One of the special magic numbers for the {s} is :",
            "What is the special magic number for the {s} ? The number is",
        ),
        "target": "digits",
    },
    {
        "prompt": "The {s} is hidden inside the",
        "paraphrases": (
            "What is the {s} hidden in ? The {s} is hidden in the",
            "Where is the {s} hidden ? It is inside the",
        ),
        "target": "noun",
    },
    {
        "prompt": "The value assigned to the {s} is",
        "paraphrases": ("The {s} is assigned the value", "What is the value of the {s} ? The value is"),
        "target": "noun",
    },
    {
        "prompt": "The pass key of the {s} is",
        "paraphrases": ("What is the pass key of the {s} ? The pass key is", "Remember the pass key of the {s} :"),
        "target": "digits",
    },
    {
        "prompt": "The favorite color of the {s} is",
        "paraphrases": ("What color does the {s} like most ? It likes", "The {s} likes the color"),
        "target": "color",
    },
    {
        "prompt": "The {s} was invented by a",
        "paraphrases": ("Who invented the {s} ? It was invented by a", "The inventor of the {s} was a"),
        "target": "noun",
    },
)

#: Unrelated prompt templates (``{a}``, ``{b}``, ``{c}`` = nouns) with the answer template.
UNRELATED_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("The grass is green . The sky is blue . The {a} and the {b} are", "in the {c}"),
    ("There is a {a} inside the {b} . Here we go . There and back", "again"),
    ("Here is a lot of text about the {a} . The sun is yellow . The {b} is", "in the {c}"),
    ("Memorize the {a} and the {b} . I will quiz you about them", "afterwards"),
    ("VAR A = 3 . VAR B = VAR A . The {a} is in the {b} . The {c} is", "blue"),
    ("My friend bought a new {a} yesterday and put it next to the", "{b}"),
    ("Question : Where do people usually keep a {a} ? Answer : In the", "{b}"),
)


def _known_words(tokenizer: Any, words: Iterable[str]) -> list[str]:
    return [w for w in dict.fromkeys(words) if known_text(tokenizer, "the " + w) and known_text(tokenizer, " " + w)]


def _vocab_words(tokenizer: Any, exclude: set[str]) -> list[str]:
    """Alphabetic lower-case words of a (word-level) vocabulary that the tokenizer knows, sorted."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return []
    words = set()
    for piece in vocab:
        word = piece.lstrip(" \u0120\u2581")
        if len(word) >= 4 and word.isalpha() and word.islower() and word not in exclude:
            words.add(word)
    return [w for w in sorted(words) if known_text(tokenizer, " " + w)][:500]


def _word_pools(tokenizer: Any, min_nouns: int = 8) -> tuple[list[str], list[str], list[str]]:
    nouns = _known_words(tokenizer, NOUNS)
    if len(nouns) < min_nouns:
        nouns += _vocab_words(tokenizer, set(nouns))
    if len(nouns) < 4:
        raise ValueError(
            "the tokenizer knows too few words to build fictional facts (need at least 4 nouns of the built-in "
            f"list or of its vocabulary, found {nouns})."
        )
    modifiers = list(dict.fromkeys(_known_words(tokenizer, MODIFIERS) + nouns))
    colors = _known_words(tokenizer, COLORS)
    return nouns, modifiers, colors


def _template_ok(tokenizer: Any, template: str, **fill: str) -> bool:
    return known_text(tokenizer, template.format(**fill))


def _digits(rng: random.Random, tokenizer: Any) -> str:
    for _ in range(20):
        value = "".join(rng.choice("0123456789") for _ in range(3))
        if known_text(tokenizer, " " + value):
            return value
    raise ValueError("the tokenizer does not encode digits without unknown tokens.")


def fictional_facts(
    tokenizer: Any,
    num_facts: int,
    *,
    seed: int = 0,
    num_paraphrases: int = 1,
    families: Sequence[str | int] | None = None,
) -> list[EditRecord]:
    """Counterfactual facts about invented entities, built only from words ``tokenizer`` knows.

    Each fact picks a family of :data:`FACT_FAMILIES` (prompt and paraphrase templates whose words the tokenizer
    knows), an entity ``"<modifier> <noun>"`` not used by another fact (e.g. ``"velvet dolphin"``), and a random
    target of the family's kind (three digits, a noun or a colour). The locality prompt of each fact comes from
    :func:`unrelated_prompts`.

    Args:
        tokenizer: a Hugging Face tokenizer (open or closed vocabulary).
        num_facts: how many facts.
        seed: fact ``i`` depends only on ``(seed, i)`` and the tokenizer.
        num_paraphrases: paraphrases per fact (families with fewer usable paraphrases repeat them).
        families: restrict to these families (prompt templates or indices into :data:`FACT_FAMILIES`).

    Returns:
        ``num_facts`` :class:`EditRecord` with ``source="fictional(seed=<seed>)"``.

    Raises:
        ValueError: bad arguments, or no family/entity can be built from the tokenizer's words.
    """
    if not isinstance(num_facts, int) or num_facts < 1:
        raise ValueError(f"num_facts must be a positive int, got {num_facts!r}.")
    if not isinstance(num_paraphrases, int) or num_paraphrases < 0:
        raise ValueError(f"num_paraphrases must be a non-negative int, got {num_paraphrases!r}.")
    nouns, modifiers, colors = _word_pools(tokenizer)
    sample_entity = f"{modifiers[0]} {nouns[0]}"
    chosen = list(range(len(FACT_FAMILIES)))
    if families is not None:
        chosen = []
        for family in families:
            if isinstance(family, int) and 0 <= family < len(FACT_FAMILIES):
                chosen.append(family)
            else:
                matches = [i for i, f in enumerate(FACT_FAMILIES) if f["prompt"] == family]
                if not matches:
                    raise ValueError(f"families: {family!r} is neither an index nor a prompt of FACT_FAMILIES.")
                chosen.extend(matches)
    usable: list[tuple[str, list[str], str]] = []
    for index in chosen:
        family = FACT_FAMILIES[index]
        if family["target"] == "color" and len(colors) < 2:
            continue
        if not _template_ok(tokenizer, family["prompt"], s=sample_entity):
            continue
        paraphrases = [p for p in family["paraphrases"] if _template_ok(tokenizer, p, s=sample_entity)]
        if num_paraphrases and not paraphrases:
            continue
        usable.append((family["prompt"], paraphrases, family["target"]))
    if not usable:
        raise ValueError("no fact family can be written with the tokenizer's vocabulary (see FACT_FAMILIES).")
    num_entities = len(modifiers) * len(nouns) - len(nouns)
    if num_facts > num_entities:
        raise ValueError(f"num_facts={num_facts} exceeds the {num_entities} entities the known words allow.")
    rng = random.Random(f"wise-facts:{seed}")
    used: set[str] = set()
    locality = unrelated_prompts(tokenizer, num_facts, seed=seed)
    records = []
    for i in range(num_facts):
        prompt_t, paraphrase_ts, kind = usable[rng.randrange(len(usable))]
        while True:
            entity = f"{rng.choice(modifiers)} {rng.choice(nouns)}"
            first, second = entity.split(" ")
            if first != second and entity not in used:
                break
        used.add(entity)
        if kind == "digits":
            target = _digits(rng, tokenizer)
        elif kind == "color":
            target = rng.choice(colors)
        else:
            target = rng.choice([n for n in nouns if n not in (first, second)])
        paraphrases = [paraphrase_ts[j % len(paraphrase_ts)].format(s=entity) for j in range(num_paraphrases)]
        loc_prompt, loc_answer = locality[i]
        records.append(
            EditRecord(
                prompt=prompt_t.format(s=entity),
                target=target,
                paraphrases=paraphrases,
                locality_prompt=loc_prompt,
                locality_answer=loc_answer,
                subject=entity,
                source=f"fictional(seed={seed})",
            )
        )
    return records


def unrelated_prompts(tokenizer: Any, num_prompts: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs unrelated to :func:`fictional_facts`, built from words ``tokenizer`` knows.

    Used to measure locality (the edited model must predict on them what it predicted before) and as the
    irrelevant sample of each edit (the paper uses Natural Questions; pass real unrelated text where you have it).

    Args:
        tokenizer: a Hugging Face tokenizer.
        num_prompts: how many pairs.
        seed: pair ``i`` depends only on ``(seed, i)`` and the tokenizer.

    Raises:
        ValueError: bad ``num_prompts``, or no template fits the tokenizer's vocabulary.
    """
    if not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}.")
    nouns, _, _ = _word_pools(tokenizer)
    a, b, c = nouns[0], nouns[1], nouns[2]
    templates = [(p, q) for p, q in UNRELATED_TEMPLATES if _template_ok(tokenizer, p + " " + q, a=a, b=b, c=c)]
    if not templates:
        raise ValueError("no unrelated prompt template fits the tokenizer's vocabulary (see UNRELATED_TEMPLATES).")
    out = []
    for i in range(num_prompts):
        rng = random.Random(f"wise-unrelated:{seed}:{i}")
        prompt_t, answer_t = templates[rng.randrange(len(templates))]
        fill = dict(zip("abc", rng.sample(nouns, 3)))
        out.append((prompt_t.format(**fill), answer_t.format(**fill)))
    return out
