"""The lm-eval backend (`jaxllama.evaluation`) against lm-eval's own `hf` backend on the
same GGUF file (transformers dequantizes it; float32 both sides), over the offline tasks
in examples/eval_tasks: per-request log-likelihoods, is_greedy, accuracy, rolling
log-likelihoods and greedy generations; and `jaxllama eval` on the command line."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from conftest import jax_adapter  # noqa: E402
from jaxllama import hub  # noqa: E402
from jaxllama.errors import InvalidRequestError  # noqa: E402

pytestmark = pytest.mark.slow
SMOL = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "examples" / "eval_tasks"


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS))


@pytest.fixture(scope="module")
def ours():
    from jaxllama.evaluation import JaxLlamaLM

    lm = JaxLlamaLM(pretrained=SMOL, adapter=jax_adapter(SMOL), batch_size="auto")
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def hf():
    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(2)
    path = hub.pull(SMOL)
    return HFLM(pretrained=str(path.parent), gguf_file=path.name, dtype="float32", batch_size=8,
                device="cpu")


@pytest.fixture(scope="module")
def runs(ours, hf, task_manager):
    """Both backends over the three tasks (the generation task limited to 3 items)."""
    cwd = os.getcwd()
    os.chdir(REPO)  # the task files name their data relative to the repository root
    out = {}
    try:
        for name, lm in (("jaxllama", ours), ("hf", hf)):
            out[name] = {}
            for task, limit in (("jaxllama_mc", None), ("jaxllama_paragraphs", None),
                                ("jaxllama_short_answer", 3)):
                out[name][task] = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], task_manager=task_manager, limit=limit, log_samples=True,
                    bootstrap_iters=0)
    finally:
        os.chdir(cwd)
    return out


def _samples(result, task):
    return sorted(result["samples"][task], key=lambda s: s["doc_id"])


def test_tokenization_matches_hf(ours, hf):
    for ctx, cont in [("Question: What is the capital of France?\nAnswer:", " Paris"),
                      ("Trailing space ", "word"), ("<|im_start|>user", " hi"), ("", "Hello there")]:
        assert ours.tok_encode(ctx + cont) == hf.tok_encode(ctx + cont)
        if ctx:
            assert ours._encode_pair(ctx, cont) == hf._encode_pair(ctx, cont)
    assert ours.prefix_token_id == hf.prefix_token_id and ours.eot_token_id == hf.eot_token_id
    assert ours.max_length == hf.max_length


def test_multiple_choice_matches_hf(runs):
    ours, theirs = _samples(runs["jaxllama"]["jaxllama_mc"], "jaxllama_mc"), _samples(runs["hf"]["jaxllama_mc"], "jaxllama_mc")
    assert len(ours) == len(theirs) == 20
    worst = 0.0
    for a, b in zip(ours, theirs):
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip((r[0] for r in a["resps"]), (r[0] for r in b["resps"])):
            worst = max(worst, abs(lp_a - lp_b))
            assert greedy_a == greedy_b
    print(f"largest |loglikelihood difference| over 80 requests: {worst:.2e}")
    assert worst < 1e-4
    for metric in ("acc,none", "acc_norm,none"):
        assert (runs["jaxllama"]["jaxllama_mc"]["results"]["jaxllama_mc"][metric]
                == runs["hf"]["jaxllama_mc"]["results"]["jaxllama_mc"][metric])


def test_rolling_loglikelihood_matches_hf(runs):
    task = "jaxllama_paragraphs"
    for a, b in zip(_samples(runs["jaxllama"][task], task), _samples(runs["hf"][task], task)):
        ours, theirs = a["resps"][0][0], b["resps"][0][0]
        assert math.isclose(ours, theirs, rel_tol=1e-3), (ours, theirs)


def test_rolling_windows_cover_long_documents(ours):
    """A document longer than max_length is split into the hf backend's disjoint windows;
    their sum equals scoring the tokens window by window with the adapter."""
    from lm_eval.api.instance import Instance
    from jaxllama.evaluation import JaxLlamaLM

    short = JaxLlamaLM(pretrained=SMOL, adapter=ours.adapter, max_length=16)
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen " * 3
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    got = short.loglikelihood_rolling([req], disable_tqdm=True)[0]
    ids = short.tok_encode(text)
    assert len(ids) > 32
    want, pos = 0.0, 0
    while pos < len(ids):  # each window predicts up to 16 new tokens with 16 of context at most
        end = min(pos + 16, len(ids))
        inp = ([short.prefix_token_id] + ids)[max(0, end - 16):end]  # inputs for targets ids[pos:end]
        lp = ours.adapter.score([inp + [ids[end - 1]]], packed=False)[0]
        want += float(lp[-(end - pos):].sum())
        pos = end
    assert got == pytest.approx(want, abs=1e-3)


def test_greedy_generation_matches_hf(runs):
    task = "jaxllama_short_answer"
    ours = [s["resps"][0][0] for s in _samples(runs["jaxllama"][task], task)]
    theirs = [s["resps"][0][0] for s in _samples(runs["hf"][task], task)]
    print("generations:", ours)
    assert ours == theirs and len(ours) == 3
    assert all("\n" not in t for t in ours)


def test_bad_model_args_are_refused():
    from jaxllama.evaluation import JaxLlamaLM

    with pytest.raises(InvalidRequestError, match="unknown model_args colour"):
        JaxLlamaLM(pretrained=SMOL, adapter=jax_adapter(SMOL), colour="red")
    with pytest.raises(InvalidRequestError, match="batch_size"):
        JaxLlamaLM(pretrained=SMOL, adapter=jax_adapter(SMOL), batch_size="many")
    with pytest.raises(InvalidRequestError, match="dtype"):
        JaxLlamaLM(pretrained=SMOL, adapter=jax_adapter(SMOL), dtype="float8")


def test_cli_prints_the_results_table(smollm2_path):
    cmd = [sys.executable, "-m", "jaxllama", "eval", "--model", "jaxllama", "--model_args",
           f"pretrained={SMOL},dtype=float32", "--tasks", "jaxllama_mc", "--include_path",
           str(TASKS), "--limit", "3", "--batch_size", "auto"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|jaxllama_mc|" in proc.stdout and "|acc " in proc.stdout, proc.stdout
    assert "jaxllama loglikelihood" in proc.stderr  # the progress bar
