"""`jaxllama chat` driven through a pseudo-terminal, as a person types at it: readline
line editing and history, /save and /load, and Ctrl-C (SIGINT) stopping a reply without
losing the conversation. Each test starts its own chat process (SmolLM2); the compiled
programs are shared through one compilation cache directory for the module."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

pytestmark = [
    pytest.mark.slow,
    # pexpect forks this (JAX-threaded) pytest process, and the child execs the chat at
    # once: nothing of the parent's threads runs in it, so JAX's fork warning is moot.
    pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning"),
]

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ">>> "
LOAD_TIMEOUT = 180  # model load on a busy 2-core machine
REPLY_TIMEOUT = 240  # the first reply compiles prefill and decode (cold cache)
STEP_TIMEOUT = 20  # anything that needs no model work
LEFT, UP = "\x1b[D", "\x1b[A"


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("chat_xla_cache")


def _spawn_chat(xla_cache, *extra):
    env = dict(os.environ, JAXLLAMA_COMPILATION_CACHE=str(xla_cache), JAX_PLATFORMS="cpu",
               TERM="xterm", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    child = pexpect.spawn(sys.executable, ["-m", "jaxllama", "chat", "-n", "400", *extra],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=STEP_TIMEOUT,
                          dimensions=(40, 200))
    child.expect_exact(PROMPT, timeout=LOAD_TIMEOUT)
    return child


@pytest.fixture
def chat(xla_cache):
    child = _spawn_chat(xla_cache)
    yield child
    if child.isalive():
        child.terminate(force=True)


@pytest.fixture
def greedy_chat(xla_cache):
    child = _spawn_chat(xla_cache, "--temperature", "0", "--repetition-penalty", "1")
    yield child
    if child.isalive():
        child.terminate(force=True)


def _saved(chat, path: Path) -> list[dict]:
    chat.sendline(f"/save {path}")
    chat.expect_exact(f"to {path})")
    chat.expect_exact(PROMPT)
    return json.loads(path.read_text(encoding="utf-8"))["messages"]


def test_line_editing_and_history(chat):
    # "/hlp", two steps left, "e": only readline's editing turns this into /help.
    chat.send("/hlp" + LEFT + LEFT + "e\r")
    chat.expect_exact("Commands (not sent to the model)")
    chat.expect_exact(PROMPT)
    chat.send(UP + "\r")  # the previous line again, from the input history
    chat.expect_exact("Commands (not sent to the model)")
    chat.expect_exact(PROMPT)
    chat.sendline("/nonsense")
    chat.expect_exact("unknown command /nonsense")
    chat.expect_exact(PROMPT)
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_save_then_load_restores_the_conversation(chat, tmp_path):
    chat.sendline("/system You answer in one short sentence.")
    chat.expect_exact("(system message set)")
    chat.expect_exact(PROMPT)
    chat.sendline("What colour is the sky?")
    chat.expect_exact(PROMPT, timeout=REPLY_TIMEOUT)
    saved = _saved(chat, tmp_path / "a.json")
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert saved[1]["content"] == "What colour is the sky?" and saved[2]["content"].strip()
    chat.sendline("/reset")
    chat.expect_exact("(history cleared)")
    chat.expect_exact(PROMPT)
    assert [m["role"] for m in _saved(chat, tmp_path / "empty.json")] == ["system"]
    chat.sendline(f"/load {tmp_path / 'a.json'}")
    chat.expect_exact("(loaded 3 messages")
    chat.expect_exact(PROMPT)
    assert _saved(chat, tmp_path / "b.json") == saved
    chat.sendeof()
    chat.expect(pexpect.EOF)


def test_ctrl_c_stops_the_reply_and_keeps_the_history(greedy_chat, tmp_path):
    chat = greedy_chat
    earlier = [{"role": "user", "content": "My name is Ada."},
               {"role": "assistant", "content": "Nice to meet you, Ada!"}]
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    chat.sendline(f"/load {tmp_path / 'earlier.json'}")
    chat.expect_exact("(loaded 2 messages")
    chat.expect_exact(PROMPT)
    # SmolLM2's greedy reply to this runs past 400 tokens (checked with generate).
    question = "Write a long story about a dragon who learns to fly."
    chat.sendline(question)
    chat.expect_exact("upon a time", timeout=REPLY_TIMEOUT)  # the reply is under way
    chat.kill(signal.SIGINT)
    chat.expect_exact("(interrupted; the reply so far is kept)")
    chat.expect_exact(PROMPT)
    assert chat.isalive()
    saved = _saved(chat, tmp_path / "after.json")
    assert saved[:2] == earlier
    assert saved[2] == {"role": "user", "content": question}
    assert saved[3]["role"] == "assistant" and saved[3]["content"].strip()
    assert len(saved) == 4
    # The conversation goes on from there: a /help is not sent to the model.
    chat.sendline("/help")
    chat.expect_exact("/save FILE")
    chat.expect_exact(PROMPT)
    assert len(_saved(chat, tmp_path / "after2.json")) == 4
    # Ctrl-C at the prompt warns once; a second one leaves.
    chat.kill(signal.SIGINT)
    chat.expect_exact("Ctrl-C again")
    chat.kill(signal.SIGINT)
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_load_replaces_the_system_message_too(xla_cache, tmp_path):
    """/load replaces the conversation: a file without a system message leaves none."""
    child = _spawn_chat(xla_cache, "--system", "You are a pirate.")
    try:
        (tmp_path / "plain.json").write_text(json.dumps([{"role": "user", "content": "Hi"},
                                                         {"role": "assistant", "content": "Hello!"}]))
        child.sendline(f"/load {tmp_path / 'plain.json'}")
        child.expect_exact("(loaded 2 messages")
        child.expect_exact(PROMPT)
        child.sendline("/system")
        child.expect_exact("(no system message)")
        child.expect_exact(PROMPT)
        assert [m["role"] for m in _saved(child, tmp_path / "after.json")] == ["user", "assistant"]
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        if child.isalive():
            child.terminate(force=True)
