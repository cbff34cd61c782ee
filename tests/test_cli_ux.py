"""The command line as a new user meets it: options refused before anything loads (named
by their flag), generate's --json / --stats / --stop / -f, the compilation cache on by
default and robust to a corrupt entry, a closed pipe, and the small feedback items."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jaxllama import cli, hub
from jaxllama.errors import HubError

ROOT = Path(__file__).resolve().parent.parent
README_PROMPT = "Write a Python function that reverses a string."
SMOL = "smollm2-135m-instruct"

# (argv, the flag the message must name, more text it must hold)
BAD_OPTIONS = [
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature", ">= 0"),
    (["generate", "--prompt", "x", "--top-p", "0"], "--top-p", "(0, 1]"),
    (["generate", "--prompt", "x", "--top-k", "-3"], "--top-k", ">= 0"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "--max-tokens", ">= 1"),
    (["generate", "--prompt", "x", "--min-p", "1"], "--min-p", "[0, 1)"),
    (["generate", "--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty", "> 0"),
    (["generate", "--prompt", "x", "--seed", "-1"], "--seed", "2**32"),
    (["generate", "--prompt", "x", "--system", "be brief"], "--system", "needs --chat"),
    (["generate", "--prompt", "x", "--stop", ""], "--stop", "empty"),
    (["generate", "--prompt", "   "], "--prompt", "empty"),
    (["generate", "-f", "/no/such/prompt.txt"], "--file", "cannot read"),
    (["generate", "--prompt", "x", "--model", "smollm2"], "--model",
     "did you mean smollm2-135m-instruct?"),
    (["generate", "--prompt", "x", "--model", "/no/such/model.gguf"], "--model", "no such file"),
    (["chat", "--temperature", "-1"], "--temperature", ">= 0"),
    (["chat", "--top-p", "1.5"], "--top-p", "(0, 1]"),
    (["chat", "--model", "qwen"], "--model", "did you mean qwen2.5-coder-0.5b-instruct?"),
    (["perplexity", "/no/such/text.txt"], "file", "cannot read /no/such/text.txt"),
    (["perplexity", "--model", "smollm2", __file__], "--model", "packaged models"),
    (["perplexity", __file__, "--context", "1"], "--context", ">= 2"),
    (["perplexity", __file__, "--context", "64", "--stride", "65"], "--stride", "<= --context"),
    (["generate", "--prompt", "x", "--weights", "f32", "--dtype", "bfloat16"], "--weights",
     "--dtype bfloat16 was also given"),
    (["chat", "--weights", "bf16", "--dtype", "float32"], "--weights", "--dtype float32"),
]
# Checked against the model file's context length (8192 for SmolLM2), read from its
# header; MODEL stands for the file's path.
CONTEXT_OPTIONS = [
    (["generate", "--model", "MODEL", "--prompt", "x", "-n", "100000"], "--max-tokens",
     "context length 8192"),
    (["generate", "--model", "MODEL", "--prompt", "x", "-n", "8192"], "--max-tokens",
     "expected at most 8191"),
    (["chat", "--model", "MODEL", "-n", "9000"], "--max-tokens", "context length 8192"),
    (["perplexity", "--model", "MODEL", __file__, "--context", "8193"], "--context",
     "exceeds the model's context length 8192"),
]


def _with_model(cases, path) -> list:
    return [([str(path) if a == "MODEL" else a for a in argv], flag, detail)
            for argv, flag, detail in cases]


@pytest.mark.parametrize("argv,flag,detail", BAD_OPTIONS, ids=[" ".join(c[0]) for c in BAD_OPTIONS])
def test_bad_option_names_its_flag_before_loading(argv, flag, detail, monkeypatch, capsys):
    def no_load(args):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_adapter", no_load)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}" in err and detail in err, err
    if flag == "--model":
        for name in hub.list_models():
            assert name in err  # an unknown name lists the packaged ones


@pytest.mark.parametrize("argv,flag,detail", CONTEXT_OPTIONS,
                         ids=[" ".join(c[0]) for c in CONTEXT_OPTIONS])
def test_lengths_beyond_the_context_name_their_flag_before_loading(argv, flag, detail,
                                                                   smollm2_path, monkeypatch, capsys):
    test_bad_option_names_its_flag_before_loading(
        *_with_model([(argv, flag, detail)], smollm2_path)[0], monkeypatch, capsys)


def test_lengths_within_the_context_pass_the_checks(smollm2_path):
    parser = cli.build_parser()
    for argv in (["generate", "--model", str(smollm2_path), "--prompt", "x", "-n", "8191"],
                 ["perplexity", "--model", str(smollm2_path), __file__, "--context", "8192"]):
        cli.check_args(parser, parser.parse_args(argv))  # no SystemExit


def test_option_checks_import_no_jax(smollm2_path):
    """The checks run in a fresh interpreter without importing JAX (so they come back at
    once, and nothing was loaded), the ones that read the model file's header included."""
    cases = BAD_OPTIONS + _with_model(CONTEXT_OPTIONS, smollm2_path)
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from jaxllama import cli
        results = []
        for argv, flag, detail in {[(a, f, d) for a, f, d in cases]!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    cli.main(argv)
                    code = 0
                except SystemExit as exc:
                    code = exc.code
            results.append((code, flag in err.getvalue() and detail in err.getvalue(),
                            "loading" in err.getvalue()))
        print(json.dumps({{"results": results, "jax": "jax" in sys.modules,
                          "models": "jaxllama.models.weights" in sys.modules or "jaxllama.models.adapter" in sys.modules}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["results"] == [[2, True, False]] * len(cases)
    assert got["jax"] is False and got["models"] is False


def test_unknown_name_in_the_library_lists_packaged_names(tmp_path):
    with pytest.raises(HubError, match=r"did you mean smollm2-135m-instruct\?.*smollm2-135m-instruct \(default\)"):
        hub.resolve("smollm2")
    assert hub.resolve(str(tmp_path / "m.gguf")) == tmp_path / "m.gguf"  # a path stays a path


def test_resolve_expands_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"")
    assert hub.resolve("~/m.gguf") == tmp_path / "m.gguf"  # as the CLI's --model check does


def test_unusable_cache_warning_says_jaxllama_once(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxllama", "--compilation-cache",
                           str(blocker / "cache"), "pull", "--list"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stderr.splitlines() if "not usable" in line)
    assert line.startswith("jaxllama: warning: compilation cache ") and line.count("jaxllama:") == 1, line


def test_load_without_a_system_message_drops_the_current_one(tmp_path, capsys):
    args = cli.build_parser().parse_args(["chat", "--system", "Be terse."])
    session = cli.ChatSession(args)
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]))
    assert session.command(f"/load {path}") is False
    assert session.messages() == json.loads(path.read_text())  # replaced, system included
    path.write_text(json.dumps([{"role": "system", "content": "S"}]))
    session.command(f"/load {path}")
    assert session.messages() == [{"role": "system", "content": "S"}]


# ------------------------------------------------------------------ chat turns, no model
class _Decoder:
    def push(self, token):
        return f"<{token}>"

    def flush(self):
        return ""


class _FakeAdapter:
    """What `chat` uses of an adapter: each prompt is 8 tokens, each reply 1, 2, 3, ...
    up to its limit (no end-of-sequence)."""

    def __init__(self, context_length=4096):
        self.config = type("Config", (), {"context_length": context_length})()
        self.tokenizer = type("Tokenizer", (), {"stream_decoder": lambda self, **kw: _Decoder()})()
        self.limits = []

    def eos_ids(self):
        return (0,)

    def prompt_ids(self, messages):
        return [5] * 8

    def stream(self, ids, max_tokens, config):
        self.limits.append(max_tokens)
        return (token for token in range(1, max_tokens + 1))  # a generator, as the adapter's


def _ctrl_c_on_call(monkeypatch, owner, name, n):
    """`owner.name` raises KeyboardInterrupt on its n-th call (1-based)."""
    real, calls = getattr(owner, name), []

    def wrapped(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, wrapped)


def _chat(monkeypatch, adapter, lines, *argv) -> int:
    """`chat` on `adapter`, typing `lines`, then Ctrl-D."""
    monkeypatch.setattr(cli, "_adapter", lambda args: adapter)
    monkeypatch.setattr(cli, "_setup_line_editing", lambda: None)
    typed = iter(lines)

    def fake_input(prompt):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    try:
        return cli.cmd_chat(cli.build_parser().parse_args(["chat", "-n", "4", *argv]))
    except KeyboardInterrupt:  # would end the test run itself
        pytest.fail("a Ctrl-C escaped the chat (the session would end, exit 130)")


@pytest.mark.parametrize("step", ["prompt_ids", "forward_config", "stream", "end_line"])
def test_ctrl_c_anywhere_in_a_turn_returns_to_the_prompt(step, tmp_path, monkeypatch, capsys):
    """A Ctrl-C outside the reply's token loop, on the second of three turns: building the
    prompt, the sampling config or the stream drops that turn (the history as before it);
    after the reply is in (ending its line), the reply is kept. The chat goes on."""
    adapter = _FakeAdapter()
    owner, name = {"prompt_ids": (adapter, "prompt_ids"), "forward_config": (cli, "_forward_config"),
                   "stream": (adapter, "stream"), "end_line": (cli._Stdout, "end_line")}[step]
    _ctrl_c_on_call(monkeypatch, owner, name, 2)
    path = tmp_path / "s.json"
    assert _chat(monkeypatch, adapter, ["first", "second", "third", f"/save {path}"]) == 0
    assert "(interrupted)" in capsys.readouterr().err
    saved = json.loads(path.read_text())["messages"]
    users = [m["content"] for m in saved if m["role"] == "user"]
    assert users == (["first", "second", "third"] if step == "end_line" else ["first", "third"])
    assert [m["role"] for m in saved] == ["user", "assistant"] * len(users)
    assert all(m["content"] == "<1><2><3><4>" for m in saved if m["role"] == "assistant")


def test_chat_says_the_context_is_full_not_max_tokens(monkeypatch, capsys):
    # An 8-token prompt in a 12-token context leaves room for 4 tokens, under -n 256.
    adapter = _FakeAdapter(context_length=12)
    assert _chat(monkeypatch, adapter, ["hi"], "-n", "256") == 0
    err = capsys.readouterr().err
    assert adapter.limits == [4]
    assert "end of the model's context" in err and "raise it" not in err, err
    adapter = _FakeAdapter(context_length=4096)  # cut by -n itself: the --max-tokens notice
    assert _chat(monkeypatch, adapter, ["hi"], "-n", "4") == 0
    err = capsys.readouterr().err
    assert "stopped at --max-tokens 4; raise it" in err and "context" not in err, err


def test_pull_list_marks_the_default(capsys):
    assert cli.main(["pull", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "default" in line] == [
        line for line in lines if line.startswith(hub.DEFAULT_MODEL + " ")]
    assert len(lines) == len(hub.list_models())


def test_compilation_cache_setting(tmp_path, monkeypatch):
    from jaxllama import compilation_cache as cc

    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path / "models"))
    monkeypatch.delenv(cc.ENV_VAR, raising=False)
    assert cc.setting() == tmp_path / "models" / "xla-cache"  # on by default
    monkeypatch.setenv(cc.ENV_VAR, "OFF")
    assert cc.setting() is None
    assert cc.setting(str(tmp_path / "x")) == tmp_path / "x"  # the option wins
    monkeypatch.setenv(cc.ENV_VAR, str(tmp_path / "y"))
    assert cc.setting() == tmp_path / "y" and cc.setting("off") is None


def test_unusable_cache_directory_is_a_warning(tmp_path):
    from jaxllama import compilation_cache as cc

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    try:
        with pytest.warns(RuntimeWarning, match="not usable"):
            assert cc.enable_or_warn(blocker / "cache") is None
        assert cc.directory() is None
    finally:
        cc.disable()


def test_stop_filter_holds_back_partial_matches():
    """The stop-text rule `generate --stop` uses (the server's StopMatcher)."""
    from jaxllama.serve.stops import StopMatcher

    f = StopMatcher(["</end>", "STOP"])
    assert f.push("abc</e") == ("abc", None) and f._held == "</e"
    assert f.push("nx") == ("</enx", None)  # not a stop after all: released
    assert f.push("S") == ("", None) and f.push("TOPxyz") == ("", "STOP") and f.hit == "STOP"
    g = StopMatcher(["ab"])
    assert g.push("xa") == ("x", None) and g.flush() == "a"


# ------------------------------------------------------------------ with the model
@pytest.fixture(scope="module")
def smol():
    from conftest import jax_adapter

    return jax_adapter(SMOL)


def _json_run(capsys, *argv) -> dict:
    assert cli.main(["generate", *argv, "--json"]) == 0
    cap = capsys.readouterr()
    return json.loads(cap.out), cap.err


@pytest.mark.slow
def test_json_matches_the_library_and_says_length(smol, capsys):
    ids = smol.prompt_ids([{"role": "user", "content": README_PROMPT}])
    expected = smol.generate(ids, 8)[len(ids):]
    got, err = _json_run(capsys, "--chat", "--prompt", README_PROMPT, "-n", "8")
    assert got["token_ids"] == expected
    assert got["text"] == smol.decode_text(expected)
    assert got["prompt_tokens"] == len(ids) and got["generated_tokens"] == 8
    assert got["finish_reason"] == "length" and got["stop"] is None
    t = got["timings"]
    for key in ("load_seconds", "first_token_seconds", "decode_seconds", "compile_seconds",
                "compilations", "total_seconds"):
        assert t[key] >= 0, key
    assert "the reply stopped at --max-tokens 8" in err


@pytest.mark.slow
def test_json_says_stop_at_the_end_of_sequence(smol, capsys):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    ids = smol.prompt_ids(messages)
    expected = smol.generate(ids, 64)[len(ids):]
    assert expected[-1] in smol.eos_ids()  # the precondition: the model ends its answer
    got, err = _json_run(capsys, "--chat", "--prompt", "What is 2 + 2?", "-n", "64")
    assert got["token_ids"] == expected and got["finish_reason"] == "stop"
    assert "--max-tokens" not in err


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["def", "rse_str", "::-1]"])
def test_stop_cuts_before_the_stop_text(stop, smol, capsys):
    full = smol.generate_text([{"role": "user", "content": README_PROMPT}], 24)
    assert stop in full
    got, _ = _json_run(capsys, "--chat", "--prompt", README_PROMPT, "-n", "24", "--stop", "zzz",
                       "--stop", stop)
    assert got["text"] == full[:full.index(stop)]
    assert got["finish_reason"] == "stop" and got["stop"] == stop
    # Streamed, the stop text is never printed either.
    assert cli.main(["generate", "--chat", "--prompt", README_PROMPT, "-n", "24", "--stop", stop]) == 0
    assert capsys.readouterr().out == full[:full.index(stop)] + "\n"


@pytest.mark.slow
def test_prompt_from_file_and_stdin(smol, tmp_path, monkeypatch, capsys):
    prompt = "The capital of France is"
    expected = smol.generate_text(prompt, 6) + "\n"
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    assert cli.main(["generate", "-f", str(path), "-n", "6"]) == 0
    assert capsys.readouterr().out == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt))
    assert cli.main(["generate", "-f", "-", "-n", "6"]) == 0
    assert capsys.readouterr().out == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt))
    assert cli.main(["generate", "--prompt", "-", "-n", "6"]) == 0
    assert capsys.readouterr().out == expected


@pytest.mark.slow
def test_stats_prints_counts_speeds_and_compile_time(smol, capsys):
    ids = smol.encode("Once upon a time")
    assert cli.main(["generate", "--prompt", "Once upon a time", "-n", "12", "--stats"]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "tokens/s" in line)
    print(line)
    assert f"prompt {len(ids)} tokens, generated 12 tokens (finish: length)" in line
    assert re.search(r"prefill \d+\.\d tokens/s, decode \d+\.\d tokens/s", line), line
    assert re.search(r"compile \d+\.\d\d s \(\d+ compilations", line)


@pytest.mark.slow
def test_info_says_memory_on_a_cpu(capsys):
    import jax

    assert cli.main(["info", SMOL]) == 0
    out = capsys.readouterr().out
    label = "Memory" if jax.default_backend() == "cpu" else "VRAM"
    assert re.search(rf"\nLayers: 30\n{label}: \d+\.\d MB\n", out)


@pytest.mark.slow
def test_perplexity_progress_bar_ends_full(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    assert cli.main(["perplexity", str(text), "--context", "64", "--stride", "32"]) == 0
    err = capsys.readouterr().err
    counts = re.findall(r"perplexity: .*?(\d+)/(\d+)", err)
    assert counts and counts[-1][0] == counts[-1][1], err[-500:]


@pytest.mark.slow
def test_library_load_is_quiet_and_takes_packaged_names(capsys):
    import jax

    from jaxllama.models import LlamaInferenceAdapter, load_gguf
    from jaxllama.models.llama import Llama3Config, Llama3WeightLoader

    adapter = LlamaInferenceAdapter.from_gguf(SMOL)
    assert "loading" not in capsys.readouterr().err  # no progress bar in a library call
    assert adapter.model.path == hub.cached_path(SMOL)
    adapter.unload()
    # Packaged names work where a path does: the family loader and load_gguf.
    model = Llama3WeightLoader.load_to_vram(SMOL, Llama3Config.smollm2_135m(), progress=False)
    assert model.path == hub.cached_path(SMOL)
    for leaf in jax.tree_util.tree_leaves(model.params):
        leaf.delete()
    from jaxllama.gguf.reader import read_gguf

    assert load_gguf.__module__ == "jaxllama.models.weights"
    with pytest.raises(HubError, match="packaged models"):
        load_gguf("smollm2", progress=False)
    assert read_gguf(hub.cached_path(SMOL)).architecture == "llama"
    # The command line still shows one.
    assert cli.main(["generate", "--prompt", "Hi", "-n", "1"]) == 0
    assert "loading SmolLM2" in capsys.readouterr().err


@pytest.mark.slow
def test_library_loaders_are_quiet_by_default(smollm2_path, capsys):
    """load_gguf and the design's XWeightLoader.load_to_vram, called as the README does
    (no progress argument), print no loading bar."""
    import jax

    from jaxllama.models import load_gguf
    from jaxllama.models.llama import Llama3Config, Llama3WeightLoader

    for load in (lambda: Llama3WeightLoader.load_to_vram(SMOL, Llama3Config.smollm2_135m()),
                 lambda: load_gguf(smollm2_path)):
        model = load()
        err = capsys.readouterr().err
        assert "loading" not in err and "%|" not in err, err
        for leaf in jax.tree_util.tree_leaves(model.params):
            leaf.delete()


# ------------------------------------------------------------------ separate processes
def _spawn(args, cache: Path, **kwargs):
    env = dict(os.environ, JAXLLAMA_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as a user runs it
    return subprocess.Popen([sys.executable, "-m", "jaxllama", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, **kwargs)


def _timed_run(args, cache: Path):
    """(seconds from the start to the first byte of stdout, stdout, stderr, return code)."""
    start = time.perf_counter()
    proc = _spawn(args, cache)
    first = proc.stdout.read(1)
    first_s = time.perf_counter() - start
    out, err = proc.communicate(timeout=600)
    return first_s, (first + out).decode(), err.decode(), proc.returncode


README_ARGS = ["generate", "--chat", "--prompt", README_PROMPT]


@pytest.fixture(scope="module")
def cold_and_warm(tmp_path_factory):
    """The README's first command twice, both with --json, in a fresh cache dir."""
    cache = tmp_path_factory.mktemp("xla_cache")
    first = _timed_run(README_ARGS + ["-n", "16", "--json"], cache)
    second = _timed_run(README_ARGS + ["-n", "16", "--json"], cache)
    return cache, first, second


@pytest.mark.slow
def test_second_run_compiles_nothing_new(cold_and_warm):
    cache, first, second = cold_and_warm
    runs = []
    for first_s, out, err, code in (first, second):
        assert code == 0, err[-2000:]
        runs.append(json.loads(out))
    cold, warm = (r["timings"] for r in runs)
    print(f"cold run: first output {first[0]:.2f} s after spawn, first token "
          f"{cold['first_token_since_start_seconds']:.2f} s after start, "
          f"{cold['compilations']} compilations; warm run: first output {second[0]:.2f} s, first "
          f"token {warm['first_token_since_start_seconds']:.2f} s, {warm['compilations']} "
          f"compilations, {warm['compilation_cache_hits']} cache hits")
    assert runs[0]["compilation_cache"] == runs[1]["compilation_cache"] == str(cache.resolve())
    assert cold["compilations"] > 0 and any(cache.iterdir())
    assert warm["compilations"] == 0  # everything came from the cache
    assert warm["compilation_cache_hits"] >= cold["compilations"]
    assert runs[0]["token_ids"] == runs[1]["token_ids"]
    assert "compiling for this prompt size (first time only)..." in first[2]
    assert "compiling" not in second[2]


@pytest.mark.slow
def test_corrupt_cache_entry_is_ignored_with_a_warning(cold_and_warm):
    cache, first, _ = cold_and_warm
    entry = max(cache.glob("jit_prefill_rows*"), key=lambda p: p.stat().st_size)
    entry.write_bytes(b"\x00garbage" * 100)
    first_s, out, err, code = _timed_run(README_ARGS + ["-n", "16", "--json"], cache)
    assert code == 0, err[-2000:]
    assert "warning: Error reading persistent compilation cache entry" in err
    assert "Traceback" not in err
    got = json.loads(out)
    assert got["token_ids"] == json.loads(first[1])["token_ids"]
    assert got["timings"]["compilations"] >= 1  # the unreadable one, compiled afresh


@pytest.mark.slow
def test_closed_pipe_exits_quietly(cold_and_warm):
    """`| head -c 20`: the reader leaves after 20 bytes of a reply of up to 256 tokens, so
    later writes meet a closed pipe; the command stops with 141 (128 + SIGPIPE, as the
    module documents) and no traceback."""
    cache = cold_and_warm[0]
    proc = _spawn(README_ARGS + ["-n", "256"], cache)
    head = b""
    while len(head) < 20:  # `| head -c 20`
        chunk = proc.stdout.read(20 - len(head))
        if not chunk:
            break
        head += chunk
    proc.stdout.close()
    _, err = proc.communicate(timeout=600)
    assert len(head) == 20
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err[-2000:]
    assert proc.returncode == 141, err[-2000:]  # 0 would mean no write met the closed pipe
