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

        import json

        from hf_longmem.agents import MemoryStore
        from hf_longmem.cli import main

        store = MemoryStore({str(tmp_path / "m.sqlite")!r})
        store.add("tiger : The pass key is 48213.", session_id="s1", timestamp=1)
        store.save_pretrained({str(tmp_path / "saved")!r})
        out = {str(tmp_path / "r.json")!r}
        # One run covers the embedded model, the store, RMM's reranker and KV memories.
        args = ["--synthetic", "--num-sessions", "3", "--num-questions", "4", "--policy", "rmm", "--kv-context"]
        assert main(["agent-eval", *args, "--output", out]) == 0
        summary = json.load(open(out))["summary"]
        assert summary["memory_encode_tokens"] > 0 and summary["mean_reprefill_tokens"] > summary["mean_prompt_tokens"]
        print("OFFLINE-OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "OFFLINE-OK" in result.stdout, result.stderr[-3000:]
