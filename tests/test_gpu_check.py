"""benchmarks/gpu_check.py runs end to end on the CPU (`--interpret --small`), so the
one prepared GPU command does not rot between the rare GPU sessions: every section
prints its rows, no kernel disagrees with its twin, and nothing errors."""

from __future__ import annotations

import re

import pytest

from benchmarks import gpu_check


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(capsys):
    rc = gpu_check.main(["--interpret", "--small", "--time-budget", "1200"])
    out = capsys.readouterr().out
    print(out[-6000:])
    table = out[out.index("\nSummary"):]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    sections = {line.split(" | ")[0][2:] for line in rows}
    assert sections >= {"kernels", "model", "quantized", "bandwidth", "attention", "ttft", "decode"}
    bad = [line for line in rows if re.search(r"\| (FAIL|error)", line)]
    assert bad == [] and rc == 0
    # Every kernel row carries a measured error against its twin.
    kernels = [line for line in rows if line.startswith("| kernels")]
    assert len(kernels) == 2 * 2 + 2 * 3 and all("rel err" in line for line in kernels)
    # Both paths of every decode configuration gave a figure.
    decode = [line for line in rows if line.startswith("| decode")]
    assert len(decode) == 2 * 3 * 2 and all("tok/s" in line for line in decode)


def test_time_budget_skips_the_remaining_sections(capsys):
    gpu_check.main(["--interpret", "--small", "--time-budget", "0",
                    "--skip", "model", "quantized", "attention", "ttft", "decode"])
    out = capsys.readouterr().out
    assert "skipped: --time-budget 0 s spent" in out
    assert "rel err" not in out  # the kernels section did not run
