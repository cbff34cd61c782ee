"""Every module imports first, alone, in a fresh interpreter; the base needs no JAX.

An import cycle shows up only when a module is the first of its cycle to be imported,
so each module gets its own interpreter. The modules are found by walking the package,
so a new module is covered without editing this file. To keep it fast, one interpreter
imports the third-party libraries (JAX, numpy, flax, gguf, ...: they cannot take part in
a cycle of ours) and then forks one child per module, a few at a time; each child
imports its module first of all jaxllama modules. A failure names the module and the
last lines of its traceback.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import jaxllama

ROOT = Path(__file__).resolve().parent.parent

# Modules that promise not to import JAX (the CLI parser, configs, presets, the families'
# metadata mapping and the params description).
JAX_FREE = (
    "jaxllama",
    "jaxllama.errors",
    "jaxllama.hub",
    "jaxllama.cli",
    "jaxllama.bench_args",
    "jaxllama.gguf.reader",
    "jaxllama.models",
    "jaxllama.models.config",
    "jaxllama.models.params_spec",
    "jaxllama.models.family",
    "jaxllama.models.families",
    "jaxllama.models.qwen",
    "jaxllama.models.phi3",
    "jaxllama.models.llama",
)


def all_modules() -> list[str]:
    names = [jaxllama.__name__]
    for info in pkgutil.walk_packages(jaxllama.__path__, prefix="jaxllama."):
        names.append(info.name)
    return sorted(names)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# Run in one interpreter: import the third-party libraries, then fork a child per module
# (at most WORKERS at once); print one line per failing module, tracebacks escaped.
FORK_IMPORTS = r"""
import importlib, os, sys, traceback
for lib in ("numpy", "jax", "jax.numpy", "jax.experimental.pallas", "flax.struct", "gguf",
            "tokenizers", "jinja2", "jinja2.sandbox", "tqdm.auto"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "jaxllama"]
modules, workers = sys.argv[1].split(","), int(sys.argv[2])
running, failures = {}, []

def reap():
    pid, status = os.wait()
    module, read_end = running.pop(pid)
    text = os.read(read_end, 1 << 16).decode(errors="replace")
    os.close(read_end)
    if status != 0:
        failures.append((module, text or f"exit status {status}"))

for module in modules:
    while len(running) >= workers:
        reap()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            importlib.import_module(module)
        except BaseException:
            os.write(write_end, "".join(traceback.format_exc().splitlines(True)[-4:]).encode())
            os._exit(1)
        os._exit(0)
    os.close(write_end)
    running[pid] = (module, read_end)
while running:
    reap()
for module, text in failures:
    print(module + "\t" + text.replace("\n", "\\n"))
"""


def test_the_walk_finds_the_package():
    modules = all_modules()
    assert {"jaxllama.models.adapter", "jaxllama.sharding", "jaxllama.quant.matmul",
            "jaxllama.pallas.quant_matmul"} <= set(modules)
    assert set(JAX_FREE) <= set(modules)


def test_every_module_imports_first_in_a_fresh_interpreter():
    modules = all_modules()
    result = _run(FORK_IMPORTS, ",".join(modules), str(max(2, min(4, os.cpu_count() or 2))))
    assert result.returncode == 0, result.stderr
    failures = [line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line]
    assert not failures, "modules that fail when imported first:\n" + "\n\n".join(
        f"{m}:\n{err.replace(chr(92) + 'n', chr(10))}" for m, err in failures)


@pytest.mark.parametrize("module", JAX_FREE)
def test_base_modules_import_without_jax(module):
    code = (f"import sys, {module}\n"
            "bad = sorted(m for m in ('jax', 'jaxlib', 'jaxllama.models.adapter') if m in sys.modules)\n"
            "assert not bad, bad\n")
    result = _run(code)
    assert result.returncode == 0, f"{module} imports {result.stderr.strip().splitlines()[-1]}"


def test_cli_builds_its_parser_without_jax():
    code = ("import sys\nfrom jaxllama import cli\n"
            "args = cli.build_parser().parse_args(['bench', '--preset', 'smollm2-135m', '--random-weights'])\n"
            "assert args.preset == 'smollm2-135m'\n"
            "cli.build_parser().parse_args(['generate', '--prompt', 'x', '--weights', 'int4'])\n"
            "assert 'jax' not in sys.modules, 'jax was imported'\n")
    result = _run(code)
    assert result.returncode == 0, result.stderr


def test_lazy_package_names_still_resolve():
    """`from jaxllama.models import LlamaInferenceAdapter` and friends keep working."""
    import jaxllama.models as models
    from jaxllama.models.adapter import LlamaInferenceAdapter
    from jaxllama.quant.matmul import qlinear

    assert models.LlamaInferenceAdapter is LlamaInferenceAdapter
    for name in models.__all__:
        assert getattr(models, name) is not None
    import jaxllama.quant as quant

    assert quant.qlinear is qlinear
    with pytest.raises(AttributeError):
        models.NoSuchName  # noqa: B018
