"""SORT: generated samples, the Book-SORT CSV loader, and scoring by choice through the cache under test."""

from __future__ import annotations

import csv
import random

import pytest

import hf_longmem
from hf_longmem.evals import run_benchmark, sort
from hf_longmem.evals.runner import evaluate
from hf_longmem.evals.vocab import build_tokenizer


@pytest.fixture(scope="module")
def word_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def embedded():
    return hf_longmem.load_default_model()


def _segments(sample):
    query = sample.turns[0].query
    a = query.split("Segment A: ")[1].split(" Segment B: ")[0]
    b = query.split(" Segment B: ")[1].split("\n")[0]
    return a, b


def test_answer_names_the_earlier_segment(word_tok):
    samples = sort.sort(word_tok, 500, 6, seed=2)
    assert {s.turns[0].answers[0] for s in samples} == {"A", "B"}
    for s in samples:
        a, b = _segments(s)
        first = "A" if s.context.index(a) < s.context.index(b) else "B"
        assert s.turns[0].answers == [first] and s.meta["choices"] == [" A", " B"]
        assert len(a.split()) >= 20 and len(b.split()) >= 20
        assert s.context.index(b if first == "A" else a) >= s.context.index(a if first == "A" else b) + len(a)
        assert s.turns[0].query.endswith("\nAnswer: Segment")


def test_user_text_file(tmp_path, word_tok):
    path = tmp_path / "my_book.txt"
    path.write_text(" ".join(f"The {w} is in the river." for w in ["apple", "tiger", "lemon", "violin"] * 60))
    (s,) = sort.sort(word_tok, 700, 1, path=path, segment_words=10)
    assert s.meta["title"] == "my_book" and "the book my_book" in s.context
    with pytest.raises(ValueError, match="fewer than two sentences"):
        sort.sort(word_tok, 700, 1, text="no sentence end")
    with pytest.raises(ValueError, match="either `text` or `path`"):
        sort.sort(word_tok, 700, 1, text="a.", path=path)
    with pytest.raises(ValueError, match="too short"):
        sort.sort(word_tok, 700, 1, text="The apple is in the river. The lemon is in the tiger.")


def test_place_segments_invariants():
    rng = random.Random(0)
    sentences = [" ".join(["w"] * rng.randint(3, 12)) + "." for _ in range(80)]
    for _ in range(200):
        placed = sort._place_segments(sentences, rng.random(), rng.random(), 20, 35)
        (i1, e1), (i2, e2) = placed
        words = [len(s.split()) for s in sentences]
        assert sum(words[i1:e1]) >= 20 and sum(words[i2:e2]) >= 20
        assert e1 <= i2 and sum(words[i1:i2]) >= 35 and e2 <= len(sentences)
    assert sort._place_segments(sentences[:3], 0.5, 0.5, 20, 20) is None


def _write_booksort(folder, *, drop_column=None, bad_index=False):
    suffix = "250-s20-n2.csv"
    tables = {
        "books": (["book_idx", "book_title", "num_words"], [[69087, "A Tale", 5000]]),
        "excerpts": (
            ["book_idx", "excerpt_idx", "excerpt_pos", "excerpt_text"],
            [[69087, 0, 0.1, "One two three. Four five six."], [69087, 1, 0.5, "Seven eight. Nine ten."]],
        ),
        "segments": (
            [
                "book_idx",
                "excerpt_idx",
                "segment_idx",
                "segment_1",
                "segment_2",
                "seg1_pos",
                "seg2_pos",
                "distance_bin",
                "present_seg1_first",
            ],
            [
                [69087, 0, 0, "One two three.", "Four five six.", 0, 3, 62, 1],
                [69087, 1, 0, "Seven eight.", "Nine ten.", 0, 2, 62, 0],
            ],
        ),
    }
    for kind, (columns, rows) in tables.items():
        with (folder / f"{kind}_{suffix}").open("w", newline="") as handle:
            writer = csv.writer(handle)
            keep = [c for c in columns if c != drop_column]
            writer.writerow([""] + keep)  # pandas' to_csv writes the index as an unnamed first column
            for i, row in enumerate(rows):
                values = dict(zip(columns, row))
                if bad_index and kind == "segments":
                    values["excerpt_idx"] = "x"
                writer.writerow([i] + [values[c] for c in keep])
    return folder / f"segments_{suffix}"


def test_load_booksort_round_trip(tmp_path):
    samples = sort.load_booksort(_write_booksort(tmp_path))
    assert [s.turns[0].answers for s in samples] == [["A"], ["B"]]
    first, second = samples
    assert first.context.endswith("The passage is as follows: One two three. Four five six.")
    assert "book A Tale" in first.context and _segments(first) == ("One two three.", "Four five six.")
    assert _segments(second) == ("Nine ten.", "Seven eight.")
    assert first.meta["book_idx"] == 69087 and first.meta["distance_bin"] == "62"
    assert sort.load_booksort(_write_booksort(tmp_path), max_excerpt_index=1) == samples[:1]


def test_load_booksort_rejects_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="lacks the Book-SORT column"):
        sort.load_booksort(_write_booksort(tmp_path, drop_column="present_seg1_first"))
    with pytest.raises(ValueError, match="must be an integer"):
        sort.load_booksort(_write_booksort(tmp_path, bad_index=True))
    with pytest.raises(ValueError, match="not found"):
        sort.load_booksort(tmp_path / "segments_x.csv")
    with pytest.raises(ValueError, match="segments_"):
        sort.load_booksort(tmp_path / "books_250-s20-n2.csv")


def test_scored_by_choice_through_the_cache(embedded):
    model, tok = embedded
    samples = sort.sort(tok, 400, 4, seed=1)
    full = evaluate(model, tok, samples, "full", mode="rollback", fidelity=True, progress=False)
    assert all(r["mode"] == "rollback" and r["scored_by"] == "choices" for r in full)
    assert all(r["kl"] < 1e-9 and r["top1_agreement"] == 1.0 for r in full)
    assert all(r["prediction"] in ("A", "B") and r["score"] == float(r["prediction"] == r["answers"][0]) for r in full)
    assert all(r["num_cached_tokens"] > r["num_prompt_tokens"] > 0 for r in full)  # context cached, query fed
    small = evaluate(model, tok, samples, "streaming", {"budget": 16}, mode="rollback", fidelity=True, progress=False)
    assert sum(r["kl"] for r in small) / len(small) > 0.01
    assert all(s["kv_bytes"] < f["kv_bytes"] for s, f in zip(small, full))
    # Single mode: context and question in one prefill; with the full cache the scores are the same.
    single = evaluate(model, tok, samples, "full", mode="single", progress=False)
    assert all(r["mode"] == "single" and r["num_cached_tokens"] == 0 for r in single)
    for a, b in zip(single, full):
        assert a["choice_logprobs"] == pytest.approx(b["choice_logprobs"], abs=1e-5)
    with pytest.raises(ValueError, match="'single' or 'rollback'"):
        evaluate(model, tok, samples, "full", mode="append", progress=False)


def test_run_benchmark_takes_sort(embedded):
    model, tok = embedded
    caches = {"full": ("full", {}), "streaming": ("streaming", {"budget": 32})}
    rows = run_benchmark(model, tok, ["sort"], [300], caches, num_samples=2, fidelity=True, progress=False)
    assert [r["cache"] for r in rows] == ["full", "streaming"] and all(r["mode"] == "rollback" for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-9) and rows[1]["kv_bytes"] < rows[0]["kv_bytes"]
