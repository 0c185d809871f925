"""Local QA files in the official SQuAD and HotpotQA formats, and per-task options for the shared task tests."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hf_longmem.evals import tasks

TOPICS = ["apple", "river", "candle", "tiger", "garden", "violin", "pepper", "island", "rocket", "marble"]


def squad_data() -> dict:
    """SQuAD v2.0 layout: data -> articles -> paragraphs (context, qas with answers and is_impossible)."""
    articles = []
    for a in range(4):
        paragraphs = []
        for p in range(3):
            topic = TOPICS[(a * 3 + p) % len(TOPICS)]
            context = f"Article {a} paragraph {p}. The {topic} of story {a}{p} is kept in room {100 + 10 * a + p}."
            qas = [
                {
                    "id": f"q{a}{p}",
                    "question": f"Where is the {topic} of story {a}{p} kept?",
                    "answers": [{"text": f"room {100 + 10 * a + p}", "answer_start": context.index("room")}],
                    "is_impossible": False,
                },
                {"id": f"u{a}{p}", "question": "Who wrote it?", "answers": [], "is_impossible": True},
            ]
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"Article {a}", "paragraphs": paragraphs})
    return {"version": "v2.0", "data": articles}


def hotpotqa_data() -> list:
    """HotpotQA layout: a list of {_id, question, answer, supporting_facts, context: [[title, [sentences]]]}."""
    rows = []
    for i in range(6):
        a, b = TOPICS[i], TOPICS[i + 1]
        context = [
            [f"{a} {i}", [f"The {a} {i} was built by the {b} {i} company.", " It opened in year 19{i}0."]],
            [f"{b} {i}", [f"The {b} {i} company is based in town {i}."]],
        ]
        rows.append(
            {
                "_id": f"h{i}",
                "question": f"Where is the company that built the {a} {i} based?",
                "answer": f"town {i}",
                "supporting_facts": [[f"{a} {i}", 0], [f"{b} {i}", 0]],
                "context": context,
                "type": "bridge",
                "level": "easy",
            }
        )
    return rows


def write_qa_files(folder: Path) -> dict[str, Path]:
    paths = {"squad": folder / "squad.json", "hotpotqa": folder / "hotpotqa.json"}
    paths["squad"].write_text(json.dumps(squad_data()))
    paths["hotpotqa"].write_text(json.dumps(hotpotqa_data()))
    return paths


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (300 tokens) trained here on the generators' texts, no special prefix."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"], show_progress=False)
    backend.train_from_iterator(tasks.vocabulary_texts() * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")
