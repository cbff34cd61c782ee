"""The one backend policy (`jaxllama.backend.choose`) and the kernels' fallback to XLA.

The GPU branch runs here on the CPU: the tests replace `jaxllama.backend.platform`, the
one backend query the policy makes. That also makes the fallback honest on a CPU: the
real (non-interpreted) Pallas kernels cannot lower for the CPU, exactly as a kernel
that the installed Triton or JAX rejects cannot lower for a GPU, so the adapter must
run their XLA twins, warn once per kernel, and give XLA's results. A second test
replaces the kernels with ones whose lowering raises a named error, to check the
warning carries it.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_to_gguf import tiny_hf_model, write_gguf
from jaxllama import backend
from jaxllama.engine import steps as engine_steps
from jaxllama.backend import ATTENTION_IMPLS, MATMUL_IMPLS, BackendPolicy, choose
from jaxllama.errors import InvalidRequestError, KernelFallbackWarning
from jaxllama.models import LlamaInferenceAdapter, load_gguf
from jaxllama.models import transformer
from jaxllama.models.transformer import KVCache, prefill
from jaxllama.quant import matmul as quant_matmul_module
from jaxllama.quant import qlinear, quantize
from jaxllama.sharding import make_mesh

# What each place can run, written out independently of the module's rule.
POSSIBLE = {
    # (backend, on a mesh): (attention, matmul)
    ("cpu", False): ({"xla", "pallas_interpret"}, {"xla", "pallas_interpret"}),
    ("cpu", True): ({"xla", "pallas_interpret"}, {"xla", "pallas_interpret"}),
    ("tpu", False): ({"xla", "pallas_interpret"}, {"xla", "pallas_interpret"}),
    ("tpu", True): ({"xla", "pallas_interpret"}, {"xla", "pallas_interpret"}),
    ("gpu", False): ({"xla", "pallas", "pallas_interpret", "cudnn"}, {"xla", "pallas", "pallas_interpret"}),
    ("gpu", True): ({"xla", "pallas_interpret", "cudnn"}, {"xla", "pallas_interpret"}),
}
DEFAULTS = {
    ("cpu", False): ("xla", "xla"),
    ("cpu", True): ("xla", "xla"),
    ("tpu", False): ("xla", "xla"),
    ("tpu", True): ("xla", "xla"),
    ("gpu", False): ("pallas", "pallas"),
    ("gpu", True): ("xla", "xla"),
}
NOT_NAMES = ["cuda", "PALLAS", "", "triton", 3, ["xla"], b"xla"]


def on(monkeypatch, name: str) -> None:
    monkeypatch.setattr(backend, "platform", lambda: name)


def _assert_names_choices(message: str, asked, choices) -> None:
    assert repr(asked) in message, message
    listed = message.split("possible here")[-1]
    for name in ATTENTION_IMPLS:
        assert (repr(name) in listed) == (name in choices), (name, message)


@pytest.mark.parametrize("where", list(POSSIBLE), ids=lambda w: f"{w[0]}{'-mesh' if w[1] else ''}")
def test_every_request(monkeypatch, where):
    """Every name, known or not, for attention and matmul: runs where it can, else the
    library's error naming the request and exactly what is possible here."""
    name, sharded = where
    on(monkeypatch, name)
    attention_ok, matmul_ok = POSSIBLE[where]
    for asked in list(ATTENTION_IMPLS) + NOT_NAMES:
        if isinstance(asked, str) and asked in attention_ok:
            policy = choose(asked, sharded=sharded)
            assert policy.attention == asked and policy.backend == name
            assert policy.matmul in matmul_ok
        else:
            with pytest.raises(InvalidRequestError) as exc:
                choose(asked, sharded=sharded)
            assert str(exc.value).startswith(f"attention_impl {asked!r}")
            _assert_names_choices(str(exc.value), asked, attention_ok)
    for asked in list(MATMUL_IMPLS) + ["cudnn"] + NOT_NAMES:
        if isinstance(asked, str) and asked in matmul_ok:
            assert choose("xla", asked, sharded=sharded).matmul == asked
        else:
            with pytest.raises(InvalidRequestError) as exc:
                choose("xla", asked, sharded=sharded)
            assert str(exc.value).startswith(f"matmul_impl {asked!r}")
            _assert_names_choices(str(exc.value), asked, matmul_ok)


def test_reasons(monkeypatch):
    on(monkeypatch, "cpu")
    with pytest.raises(InvalidRequestError, match=r"'pallas' needs a GPU .*the backend is 'cpu'"):
        choose("pallas")
    with pytest.raises(InvalidRequestError, match=r"'cudnn' needs a GPU with cuDNN"):
        choose("cudnn")
    with pytest.raises(InvalidRequestError, match=r"'cuda' is not supported; expected one of 'xla', "
                                                  r"'pallas', 'pallas_interpret', 'cudnn'"):
        choose("cuda")
    on(monkeypatch, "gpu")
    with pytest.raises(InvalidRequestError, match=r"'pallas' cannot run on a mesh"):
        choose("pallas", sharded=True)
    with pytest.raises(InvalidRequestError, match=r"matmul_impl 'pallas' cannot run on a mesh"):
        choose("xla", "pallas", sharded=True)


@pytest.mark.parametrize("where", list(DEFAULTS), ids=lambda w: f"{w[0]}{'-mesh' if w[1] else ''}")
def test_defaults(monkeypatch, where):
    name, sharded = where
    on(monkeypatch, name)
    policy = choose(sharded=sharded)
    assert (policy.attention, policy.matmul) == DEFAULTS[where]
    assert policy == BackendPolicy(*DEFAULTS[where], backend=name, sharded=sharded)
    # An explicit attention choice keeps the backend's matmul, except the interpreter,
    # which the matmul follows off a mesh.
    assert choose("xla", sharded=sharded).matmul == DEFAULTS[where][1]
    assert choose("pallas_interpret", sharded=sharded).matmul == ("xla" if sharded else "pallas_interpret")


def test_policy_is_a_static_value():
    a, b = choose("xla"), choose("xla")
    assert a == b and hash(a) == hash(b) and a is not b
    with pytest.raises(Exception):
        a.attention = "pallas"  # frozen


# ------------------------------------------------------------------ on the adapter
@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_gguf(tiny_hf_model("llama"), tmp_path_factory.mktemp("policy") / "llama.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_gguf(tiny_path, dtype=jnp.float32, progress=False)


@pytest.fixture(scope="module")
def tiny_int8(tiny_path):
    return load_gguf(tiny_path, dtype=jnp.float32, weights="int8", progress=False)


def test_adapter_decides_once_at_construction(monkeypatch, tiny):
    on(monkeypatch, "cpu")
    assert LlamaInferenceAdapter.from_model(tiny).policy == BackendPolicy("xla", "xla", "cpu")
    interp = LlamaInferenceAdapter.from_model(tiny, attention_impl="pallas_interpret")
    assert interp.policy == BackendPolicy("pallas_interpret", "pallas_interpret", "cpu")
    for asked, choices in (("pallas", POSSIBLE["cpu", False][0]), ("cudnn", POSSIBLE["cpu", False][0]),
                           ("flash", POSSIBLE["cpu", False][0])):
        with pytest.raises(InvalidRequestError) as exc:
            LlamaInferenceAdapter.from_model(tiny, attention_impl=asked)
        _assert_names_choices(str(exc.value), asked, choices)
    with pytest.raises(InvalidRequestError, match="matmul_impl 'pallas' needs a GPU"):
        LlamaInferenceAdapter.from_model(tiny, matmul_impl="pallas")
    on(monkeypatch, "gpu")
    assert LlamaInferenceAdapter.from_model(tiny).policy == BackendPolicy("pallas", "pallas", "gpu")
    mesh = make_mesh(model=1, data=1, devices=jax.devices()[:1])
    on_mesh = LlamaInferenceAdapter.from_model(tiny, mesh=mesh)
    assert on_mesh.policy == BackendPolicy("xla", "xla", "gpu", sharded=True)
    with pytest.raises(InvalidRequestError, match="cannot run on a mesh") as exc:
        LlamaInferenceAdapter.from_model(tiny, mesh=mesh, attention_impl="pallas")
    _assert_names_choices(str(exc.value), "pallas", POSSIBLE["gpu", True][0])


def test_model_functions_refuse_impossible_names(tiny):
    """The model functions take a name too; one that cannot run is the library's error,
    not JAX's bare ValueError."""
    cache = KVCache.for_params(tiny.params, tiny.config, 1, 16)
    with pytest.raises(InvalidRequestError, match="'pallas' needs a GPU"):
        prefill(tiny.params, jnp.asarray([[1, 2, 3]]), cache, jnp.asarray([3]), config=tiny.config,
                attention_impl="pallas")


def test_qlinear_takes_the_policy_rule(monkeypatch):
    w = quantize(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32), "int8")
    x = jnp.ones((2, 64))
    with pytest.raises(InvalidRequestError) as exc:
        qlinear(x, w, impl="cudnn")
    assert "possible here" in str(exc.value) and "'pallas_interpret'" in str(exc.value)
    on(monkeypatch, "gpu")
    backend.forget_kernel_probes()
    with pytest.warns(KernelFallbackWarning, match="quant_matmul"):  # cannot lower on the CPU
        got = qlinear(x, w, impl="pallas")
    np.testing.assert_allclose(np.asarray(got), np.asarray(qlinear(x, w, impl="xla")), rtol=1e-6)


# ------------------------------------------------------------------ fallback
PROMPT = [5, 17, 42, 9, 11]


def _fallbacks(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, KernelFallbackWarning)]


@pytest.fixture
def fresh():
    """No compiled step or kernel probe from another test is reused."""
    jax.clear_caches()
    backend.forget_kernel_probes()
    yield
    jax.clear_caches()
    backend.forget_kernel_probes()


def _run_all(adapter):
    """Every jitted step once: prefill, decode and generate (the engine's steps: the
    paged attention) and unpacked scoring (the model's forward: flash attention)."""
    ids, state = adapter.prefill(PROMPT)
    nxt, _ = adapter.decode(ids[-1], state)
    return adapter.generate(PROMPT, 4), nxt, adapter.score([PROMPT], packed=False)[0]


def _assert_same(got, want):
    assert got[:2] == want[:2]
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def xla_results(tiny, tiny_int8):
    """What plain XLA gives on each model (the reference of the fallback tests)."""
    return {name: _run_all(LlamaInferenceAdapter.from_model(m, attention_impl="xla", matmul_impl="xla"))
            for name, m in (("dense", tiny), ("int8", tiny_int8))}


@pytest.mark.parametrize("weights", ["dense", "int8"])
def test_kernels_that_do_not_lower_fall_back_to_xla(monkeypatch, xla_results, fresh, tiny, tiny_int8,
                                                     weights):
    """On a (simulated) GPU whose Pallas lowering fails, the adapter's first run gives
    XLA's results, with one warning per kernel that names the error."""
    model = tiny if weights == "dense" else tiny_int8
    want = xla_results[weights]
    on(monkeypatch, "gpu")
    adapter = LlamaInferenceAdapter.from_model(model)
    assert adapter.policy == BackendPolicy("pallas", "pallas", "gpu")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _run_all(adapter)
        again = _run_all(adapter)
    _assert_same(got, want)
    _assert_same(again, want)
    messages = _fallbacks(record)
    kernels = ["flash_attention", "paged_attention"] + (["quant_matmul"] if weights == "int8" else [])
    for name in kernels:
        mine = [m for m in messages if f"kernel {name} " in m]
        assert len(mine) == 1, (name, messages)
        # The CPU's own refusal to lower a non-interpreted kernel, named in the warning.
        assert "interpret" in mine[0] and "XLA twin" in mine[0], mine[0]
    assert len(messages) == len(kernels), messages


def _lowering_fails(message):
    """A jitted stand-in for a kernel whose lowering raises `message`."""

    def kernel(*args, **kwargs):
        raise NotImplementedError(message)

    return jax.jit(kernel, static_argnames=("sm_scale", "interpret"))


def test_simulated_lowering_failure_names_the_error(monkeypatch, xla_results, fresh, tiny_int8):
    want = xla_results["int8"]
    on(monkeypatch, "gpu")
    for module, name in ((transformer, "flash_attention"), (engine_steps, "paged_attention")):
        monkeypatch.setattr(module, name, _lowering_fails(f"Mosaic GPU rejected {name} (simulated)"))
    monkeypatch.setattr(quant_matmul_module._kernel, "quant_matmul",
                        _lowering_fails("ptxas: out of registers in quant_matmul (simulated)"))
    adapter = LlamaInferenceAdapter.from_model(tiny_int8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _run_all(adapter)
    _assert_same(got, want)
    messages = _fallbacks(record)
    assert len(messages) == 3, messages
    for name, error in (("flash_attention", "Mosaic GPU rejected flash_attention (simulated)"),
                        ("paged_attention", "Mosaic GPU rejected paged_attention (simulated)"),
                        ("quant_matmul", "ptxas: out of registers in quant_matmul (simulated)")):
        (mine,) = [m for m in messages if f"kernel {name} " in m]
        assert f"NotImplementedError: {error}" in mine, mine
        assert re.search(rf"jax {re.escape(jax.__version__)}", mine), mine


def test_cudnn_that_does_not_compile_falls_back(monkeypatch, xla_results, fresh, tiny):
    want = xla_results["dense"]
    on(monkeypatch, "gpu")
    adapter = LlamaInferenceAdapter.from_model(tiny, attention_impl="cudnn", matmul_impl="xla")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _run_all(adapter)
    _assert_same(got, want)
    messages = _fallbacks(record)
    assert len(messages) == 1 and "cudnn attention" in messages[0], messages


def test_interpreted_kernels_are_not_probed(monkeypatch, fresh, tiny):
    """pallas_interpret lowers everywhere: no probe, no warning."""
    calls = []
    monkeypatch.setattr(backend, "kernel_compiles", lambda *a, **k: calls.append(a) or True)
    LlamaInferenceAdapter.from_model(tiny, attention_impl="pallas_interpret").generate(PROMPT, 2)
    assert calls == []



def test_a_kernel_that_compiles_is_used(monkeypatch, xla_results, fresh, tiny):
    """The probe runs inside the model's trace; a kernel that lowers and compiles there is
    placed in the step (here the interpreted kernels stand in for GPU ones that compile)."""
    from jaxllama.pallas.flash_attention import flash_attention
    from jaxllama.pallas.paged_attention import paged_attention

    placed = []

    def compiling(kernel, name):
        def stand_in(*args, sm_scale, interpret=False):
            placed.append(name)
            return kernel(*args, sm_scale=sm_scale, interpret=True)

        return jax.jit(stand_in, static_argnames=("sm_scale", "interpret"))

    on(monkeypatch, "gpu")
    monkeypatch.setattr(transformer, "flash_attention", compiling(flash_attention, "flash"))
    monkeypatch.setattr(engine_steps, "paged_attention", compiling(paged_attention, "paged"))
    adapter = LlamaInferenceAdapter.from_model(tiny, matmul_impl="xla")
    assert adapter.policy.attention == "pallas"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _run_all(adapter)
    assert _fallbacks(record) == []
    assert {"flash", "paged"} <= set(placed)
    want = xla_results["dense"]
    assert got[:2] == want[:2]
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-4)
