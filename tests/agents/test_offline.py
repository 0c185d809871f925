"""Everything of hf_longmem.agents runs with HF_HUB_OFFLINE=1 and no sockets (a subprocess where opening one fails)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_agents_run_offline_without_sockets(tmp_path):
    code = textwrap.dedent(
        f"""
        import socket

        def refuse(*args, **kwargs):
            raise RuntimeError("network access attempted")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        import hf_longmem
        from hf_longmem.agents import MemoryAgent, MemoryStore, RMMPolicy
        from hf_longmem.agents.evaluate import PASSKEY_READER
        from hf_longmem.agents.kv import KVMemory
        from hf_longmem.cli import main

        model, tokenizer = hf_longmem.load_default_model()
        store = MemoryStore({str(tmp_path / "m.sqlite")!r})
        agent = MemoryAgent(
            model, tokenizer, store, RMMPolicy(), k=1, kv=KVMemory(model, tokenizer), max_new_tokens=8,
            write_back=False, **PASSKEY_READER
        )
        agent.remember("tiger : The pass key is 48213. Remember it.", session_id="s1", timestamp=1)
        assert "48213" in agent.answer("What was the pass key of tiger?", now=2).text
        store.save_pretrained({str(tmp_path / "saved")!r})
        out = {str(tmp_path / "r.json")!r}
        assert main(["agent-eval", "--synthetic", "--num-sessions", "3", "--num-questions", "4", "--output", out]) == 0
        print("OFFLINE-OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "OFFLINE-OK" in result.stdout, result.stderr[-3000:]
