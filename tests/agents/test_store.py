"""MemoryStore: versions, bi-temporal queries, deletion, persistence, crash safety, two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone

import pytest

from hf_longmem.agents import HashingEmbedder, MemoryStore


@pytest.fixture
def store():
    with MemoryStore() as s:
        yield s


def test_add_get_search(store):
    a = store.add("I live in Lisbon near the river", session_id="s1", timestamp=10, user_id="u1", metadata={"x": 1})
    b = store.add([{"role": "user", "content": "My cat is called Tom"}], session_id="s2", timestamp=20)
    assert store.get(a).text == "I live in Lisbon near the river"
    assert store.get(a).metadata == {"x": 1} and store.get(a).user_id == "u1"
    assert store.get(b).text == "user: My cat is called Tom"
    assert store.get(b).metadata["messages"] == [{"role": "user", "content": "My cat is called Tom"}]
    hits = store.search("what is my cat called", k=2)
    assert [h.id for h in hits] == [b, a] and hits[0].score > hits[1].score
    assert [r.id for r in store.get_all(filter={"session_id": "s1"})] == [a]
    assert [r.id for r in store.get_all(filter={"x": 1})] == [a]
    assert [r.id for r in store.get_all(filter={"session_id": ["s1", "s2"]})] == [a, b]
    assert len(store) == 2


def test_update_supersedes_and_as_of_sees_the_past(store):
    mid = store.add("I live in Lisbon", session_id="s1", timestamp=datetime(2024, 5, 1, tzinfo=timezone.utc))
    store.update(mid, "I live in Porto", timestamp=datetime(2024, 9, 1))  # naive: read as UTC
    assert store.search("where do I live", k=1)[0].text == "I live in Porto"
    assert store.search("where do I live", k=1, as_of=datetime(2024, 6, 1))[0].text == "I live in Lisbon"
    assert store.get(mid, as_of=datetime(2024, 4, 1)) is None  # not yet written
    assert len(store.get_all()) == 1  # one memory, not two
    old, new = store.history(mid)
    assert (old.op, old.version, new.op, new.version) == ("add", 1, "update", 2)
    assert old.valid_to == new.valid_from == datetime(2024, 9, 1, tzinfo=timezone.utc).timestamp()
    # Transaction time is the wall clock of the write, apart from the valid time of the facts.
    assert time.time() - 60 < old.recorded_at <= new.recorded_at <= time.time() + 1
    with pytest.raises(ValueError, match="timestamp"):
        store.update(mid, "I live in Faro", timestamp=datetime(2024, 1, 1))  # before the current version


def test_delete_is_recorded_and_reversible(store):
    mid = store.add("the code is 1234", session_id="s", timestamp=1)
    store.delete(mid, timestamp=5)
    assert store.get(mid) is None and store.search("code", k=3) == [] and len(store) == 0
    assert store.get(mid, as_of=3).text == "the code is 1234"
    assert [r.op for r in store.history(mid)] == ["add", "delete"]
    with pytest.raises(KeyError):
        store.update(mid, "x", timestamp=6)
    store.restore(mid, timestamp=7)
    assert store.get(mid).text == "the code is 1234" and store.get(mid, as_of=6) is None
    assert [op for op, _ in store.events(mid)] == ["add", "delete", "restore"]


def test_archive_hides_from_search_but_keeps(store):
    mid = store.add("a fact about tigers", session_id="s", timestamp=1)
    store.set_status(mid, "archived", timestamp=2)
    assert store.search("tigers", k=1) == []
    assert store.search("tigers", k=1, include_archived=True)[0].id == mid
    assert store.get(mid).status == "archived"
    store.set_state(mid, {"strength": 3})
    assert store.get_state(mid) == {"strength": 3}


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda s: s.add("", session_id="s", timestamp=1), "text_or_messages"),
        (lambda s: s.add([{"role": "user"}], session_id="s", timestamp=1), "text_or_messages"),
        (lambda s: s.add("x", session_id="s", timestamp="yesterday"), "timestamp"),
        (lambda s: s.add("x", session_id="s", timestamp=float("nan")), "timestamp"),
        (lambda s: s.add("x", session_id=3, timestamp=1), "session_id"),
        (lambda s: s.add("x", session_id="s", timestamp=1, metadata={"a": object()}), "metadata"),
        (lambda s: s.search("x", k=0), "k"),
        (lambda s: s.search("x", as_of="now"), "as_of"),
        (lambda s: s.get_all(filter=["s"]), "filter"),
        (lambda s: s.set_status("nope", "gone", timestamp=1), "status"),
    ],
)
def test_bad_arguments_name_the_argument(store, call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call(store)


def test_save_and_from_pretrained_round_trip(tmp_path, store):
    mid = store.add("I live in Lisbon", session_id="s1", timestamp=1)
    store.update(mid, "I live in Porto", timestamp=2)
    store.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "memory_store.json").read_text())
    assert config["embedder"] == store.embedder.config()
    loaded = MemoryStore.from_pretrained(tmp_path / "saved")
    assert [r.text for r in loaded.history(mid)] == ["I live in Lisbon", "I live in Porto"]
    assert loaded.search("live", k=1, as_of=1.5)[0].text == "I live in Lisbon"
    on_disk = MemoryStore.from_pretrained(tmp_path / "saved", path=tmp_path / "copy.sqlite")
    on_disk.add("more", session_id="s", timestamp=3)
    assert len(MemoryStore.from_pretrained(tmp_path / "saved")) == 1  # the saved copy is untouched
    with pytest.raises(ValueError, match="embedder"):
        MemoryStore.from_pretrained(tmp_path / "saved", embedder=HashingEmbedder(dim=64))
    with pytest.raises(ValueError, match="directory"):
        MemoryStore.from_pretrained(tmp_path / "nothing")


def _python(code: str) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-c", textwrap.dedent(code)], env


def test_sigkill_during_writes_keeps_every_committed_record(tmp_path):
    path = tmp_path / "m.sqlite"
    argv, env = _python(
        f"""
        import sys
        from hf_longmem.agents import MemoryStore
        store = MemoryStore({str(path)!r})
        i = 0
        while True:
            store.add(f"record number {{i}}", session_id="s", timestamp=i, metadata={{"i": i}})
            print(i, flush=True)  # printed only after the commit returned
            i += 1
        """
    )
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    committed = []
    for line in child.stdout:
        committed.append(int(line))
        if len(committed) >= 40:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    with MemoryStore(path) as store:
        seen = {r.metadata["i"] for r in store.get_all()}
        assert set(committed) <= seen
        assert seen == set(range(len(seen)))  # no gap, no half-written record
        assert store.search("record number 7", k=1)[0].metadata["i"] == 7


def test_two_processes_share_a_store(tmp_path):
    path = tmp_path / "shared.sqlite"
    first = MemoryStore(path)
    first.add("written by the parent first", session_id="p", timestamp=0)
    argv, env = _python(
        f"""
        from hf_longmem.agents import MemoryStore
        store = MemoryStore({str(path)!r})
        assert len(store) >= 1
        for i in range(20):
            store.add(f"child note {{i}}", session_id="child", timestamp=i)
        """
    )
    child = subprocess.Popen(argv, env=env)
    for i in range(20):
        first.add(f"parent note {i}", session_id="parent", timestamp=i)
    assert child.wait(timeout=120) == 0
    assert len(first.get_all(filter={"session_id": "child"})) == 20
    assert len(first) == 41
    assert first.search("child note 13", k=1)[0].text == "child note 13"
