"""benchmarks/llama_server_compare.py without llama-server: its arguments, the workload
it hands to benchmarks/serve.py, the ratio it reports, and its error when the binary is
missing. The comparison itself needs a llama.cpp build and runs by hand
(benchmarks/RESULTS.md)."""

from __future__ import annotations

import math
import random
import stat

import pytest

from benchmarks import llama_server_compare as compare
from benchmarks import serve


def _summary(tok_s: float, ttft_median_ms: float) -> dict:
    return {"output_throughput": tok_s, "ttft_ms": {"median": ttft_median_ms}}


def test_ratios_are_jaxllama_over_llamacpp():
    r = compare.ratios(_summary(30.0, 500.0), _summary(60.0, 250.0))
    assert r["output_throughput"] == pytest.approx(0.5)
    assert r["ttft_median"] == pytest.approx(2.0)
    empty = compare.ratios(_summary(30.0, 500.0), _summary(0.0, float("nan")))
    assert math.isnan(empty["output_throughput"]) and math.isnan(empty["ttft_median"])


def test_defaults_are_the_issue_workload():
    args = compare.parse_args([])
    assert (args.slots, args.num_requests, args.concurrency) == (32, 32, 32)
    assert args.prompt_len == (128, 512) and args.max_tokens == 128
    cmd = compare.llama_server_cmd(args, "/bin/llama-server", "m.gguf", 8123)
    # llama-server's -c is the total context, shared out over -np slots
    assert cmd[cmd.index("-np") + 1] == "32"
    assert cmd[cmd.index("-c") + 1] == str(32 * 1024)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


@pytest.mark.parametrize("argv, message", [
    (["--prompt-len", "128:1000", "--max-tokens", "128"], "cannot hold the longest request"),
    (["--slots", "0"], "--slots must be at least 1"),
    (["--prompt-len", "9:3"], "LOW:HIGH"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(argv)
    assert message in capsys.readouterr().err


def test_warmup_prompts_are_not_the_timed_prompts():
    """A timed prompt seen in warm-up would be a prompt-cache hit on either server."""
    args = compare.parse_args(["--slots", "8", "--num-requests", "16", "--max-tokens", "32"])
    warm = compare.load_args(args, "http://127.0.0.1:1", warmup=True)
    timed = compare.load_args(args, "http://127.0.0.1:1", warmup=False)
    assert (warm.num_requests, warm.concurrency, warm.max_tokens) == (8, 8, 8)
    assert (timed.num_requests, timed.concurrency, timed.max_tokens) == (16, 16, 32)
    assert not warm.warmup and not timed.warmup
    warm_prompts = serve.make_prompts(warm, random.Random(warm.seed))
    timed_prompts = serve.make_prompts(timed, random.Random(timed.seed))
    assert not {tuple(p) for p in warm_prompts} & {tuple(p) for p in timed_prompts}
    assert all(128 <= len(p) <= 512 and max(p) < 32000 for p in timed_prompts)


def test_missing_llama_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    with pytest.raises(SystemExit, match="pass --llama-server PATH or set LLAMA_SERVER"):
        compare.main(["--num-requests", "1"])
    with pytest.raises(SystemExit, match="does not exist"):
        compare.main(["--llama-server", str(tmp_path / "nope")])
    plain = tmp_path / "llama-server"
    plain.write_text("")
    monkeypatch.setenv("LLAMA_SERVER", str(plain))
    with pytest.raises(SystemExit, match="is not executable"):
        compare.main([])
    plain.chmod(plain.stat().st_mode | stat.S_IXUSR)
    assert compare.find_llama_server(None) == str(plain)
