"""Which implementation runs: the one backend policy, and the kernels' fallback.

`choose` decides the attention implementation (``"xla"``, ``"pallas"``,
``"pallas_interpret"``, ``"cudnn"``) and the quantized-matmul implementation (``"xla"``,
``"pallas"``, ``"pallas_interpret"``) from the backend, the mesh and the user's request,
once, when an adapter is made. It returns a `BackendPolicy`, a frozen, hashable value
that the jitted steps take as a static argument; nothing below it decides again.

What is possible where:

* ``"xla"``: everywhere.
* ``"pallas_interpret"``: everywhere (the Pallas interpreter runs the kernels as XLA
  ops; for tests on the CPU).
* ``"pallas"``: on a GPU backend, without a mesh (the kernels lower through Triton, and
  GSPMD cannot split a ``pallas_call``).
* ``"cudnn"`` (attention only): on a GPU backend.

Defaults: on a mesh, XLA for both; on a GPU, the Pallas kernels; elsewhere XLA. The
matmul follows an interpreted attention (``"pallas_interpret"``), so one switch runs
every kernel in the interpreter.

A request that cannot run here is an `InvalidRequestError` naming what was asked, why
not, and what is possible here.

Kernel fallback: no Pallas kernel is assumed to compile on every GPU and JAX version.
Before a real (non-interpreted) kernel is placed in a traced computation, the caller
asks `kernel_compiles`, which lowers and compiles that kernel alone for the same
abstract arguments, once per distinct call signature. If that fails, the caller uses
the kernel's XLA twin instead, and one `KernelFallbackWarning` per (kernel, shape
class) names the error.

This module imports no JAX at import time.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from typing import Any, Callable, Hashable

from jaxllama.errors import InvalidRequestError, KernelFallbackWarning

ATTENTION_IMPLS: tuple[str, ...] = ("xla", "pallas", "pallas_interpret", "cudnn")
MATMUL_IMPLS: tuple[str, ...] = ("xla", "pallas", "pallas_interpret")


def platform() -> str:
    """The JAX backend the arrays live on: "cpu", "gpu" or "tpu". The one backend query
    the policy makes (tests replace it to take the GPU branch on a CPU)."""
    import jax

    return jax.default_backend()


def device_kind() -> str:
    """The first device's kind (e.g. "NVIDIA H100 80GB HBM3", "cpu"), for messages."""
    import jax

    try:
        return str(jax.devices()[0].device_kind)
    except Exception:  # a backend without devices: the name is only for messages
        return "unknown device"


@dataclasses.dataclass(frozen=True)
class BackendPolicy:
    """The implementations one adapter runs (static in every jitted step)."""

    attention: str  # one of ATTENTION_IMPLS
    matmul: str  # one of MATMUL_IMPLS
    backend: str  # the backend they were chosen for: "cpu", "gpu", "tpu"
    sharded: bool = False  # chosen for arrays on a mesh

    def describe(self) -> str:
        return f"attention {self.attention}, quantized matmul {self.matmul} ({self.backend})"


def _where(backend: str, sharded: bool) -> str:
    return f"backend {backend!r}" + (", arrays on a mesh" if sharded else "")


def _why_not(impl: str, backend: str, sharded: bool) -> str | None:
    """Why `impl` (a known name) cannot run here, or None when it can."""
    if impl in ("xla", "pallas_interpret"):
        return None
    if impl == "pallas":
        if backend != "gpu":
            return (f"needs a GPU (the Pallas kernels lower through Triton) and the backend "
                    f"is {backend!r}")
        if sharded:
            return "cannot run on a mesh (GSPMD cannot split a pallas_call)"
        return None
    if impl == "cudnn":
        if backend != "gpu":
            return f"needs a GPU with cuDNN and the backend is {backend!r}"
        return None
    raise AssertionError(impl)


def possible(kind: str, backend: str | None = None, sharded: bool = False) -> tuple[str, ...]:
    """The implementations of `kind` ("attention" or "matmul") that can run here."""
    backend = platform() if backend is None else backend
    names = ATTENTION_IMPLS if kind == "attention" else MATMUL_IMPLS
    return tuple(n for n in names if _why_not(n, backend, sharded) is None)


def _quoted(names) -> str:
    return ", ".join(repr(n) for n in names)


def check(kind: str, impl: Any, *, what: str, backend: str | None = None,
          sharded: bool = False) -> str:
    """`impl` if it names an implementation of `kind` that can run here; otherwise an
    InvalidRequestError that says what `what` asked for and what is possible here."""
    backend = platform() if backend is None else backend
    names = ATTENTION_IMPLS if kind == "attention" else MATMUL_IMPLS
    here = f"possible here ({_where(backend, sharded)}): {_quoted(possible(kind, backend, sharded))}"
    if not isinstance(impl, str) or impl not in names:
        raise InvalidRequestError(
            f"{what} {impl!r} is not supported; expected one of {_quoted(names)}; {here}"
        )
    reason = _why_not(impl, backend, sharded)
    if reason is not None:
        raise InvalidRequestError(f"{what} {impl!r} {reason}; {here}")
    return impl


def choose(attention: str | None = None, matmul: str | None = None, *, mesh: Any = None,
           sharded: bool | None = None) -> BackendPolicy:
    """The implementations to run for this backend, mesh and request.

    Args:
      attention: the requested attention implementation, or None for the default.
      matmul: the requested quantized-matmul implementation, or None for the default.
      mesh: the `jax.sharding.Mesh` the arrays live on, or None.
      sharded: instead of `mesh`, whether the arrays live on one (default: mesh given).

    Raises:
      InvalidRequestError: an unknown name, or one that cannot run here (the message
        lists what can).
    """
    backend = platform()
    sharded = (mesh is not None) if sharded is None else bool(sharded)
    if attention is None:
        attention = "pallas" if backend == "gpu" and not sharded else "xla"
    check("attention", attention, what="attention_impl", backend=backend, sharded=sharded)
    if matmul is None:
        if sharded:
            matmul = "xla"
        elif attention == "pallas_interpret":
            matmul = "pallas_interpret"
        else:
            matmul = "pallas" if backend == "gpu" else "xla"
    check("matmul", matmul, what="matmul_impl", backend=backend, sharded=sharded)
    return BackendPolicy(attention=attention, matmul=matmul, backend=backend, sharded=sharded)


def as_policy(impl: "str | BackendPolicy", shard: Any = None) -> BackendPolicy:
    """A BackendPolicy as is, or the policy `choose` makes for an attention name (the
    model functions' `attention_impl` argument takes either)."""
    if isinstance(impl, BackendPolicy):
        return impl
    return choose(impl, sharded=shard is not None)


# ----------------------------------------------------------------- kernel fallback
_lock = threading.RLock()
_probes: dict[Hashable, BaseException | None] = {}
_warned: set[Hashable] = set()
# The probe's error in the warning: the first lines are the useful part of a lowering
# error (the rest is often an MLIR dump).
_ERROR_CHARS = 600


def _abstract(tree):
    import jax

    def leaf(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    return jax.tree_util.tree_map(leaf, tree)


def _signature(tree) -> Hashable:
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def kernel_compiles(name: str, kernel: Callable, args: tuple, static: dict[str, Hashable],
                    *, shape_class: Hashable, twin: str) -> bool:
    """Whether `kernel(*args, **static)` lowers and compiles for this device and JAX.

    `kernel` is a jitted function whose keyword arguments in `static` are static; `args`
    may be tracers (only their shapes and dtypes are used). The answer is cached per
    (kernel, abstract arguments, static arguments). On failure a KernelFallbackWarning
    names `name`, the error and `twin` (what runs instead), once per (name,
    shape_class); the caller then runs the twin.
    """
    abstract = _abstract(args)
    key = (name, kernel, _signature(abstract), tuple(sorted(static.items())))
    with _lock:
        if key not in _probes:
            try:
                kernel.lower(*abstract, **static).compile()
                _probes[key] = None
            except Exception as exc:  # any failure to lower or compile means: do not use it
                _probes[key] = exc
        error = _probes[key]
        if error is None:
            return True
        warn_key = (name, shape_class)
        if warn_key not in _warned:
            _warned.add(warn_key)
            import jax

            detail = f"{type(error).__name__}: {error}"
            if len(detail) > _ERROR_CHARS:
                detail = detail[:_ERROR_CHARS] + " ..."
            warnings.warn(
                f"the Pallas kernel {name} does not compile for {device_kind()} with jax "
                f"{jax.__version__} ({shape_class}); running its XLA twin {twin} instead. "
                f"{detail}",
                KernelFallbackWarning,
                stacklevel=2,
            )
        return False


def forget_kernel_probes() -> None:
    """Drop every cached probe and warning (for tests; compiled steps stay cached)."""
    with _lock:
        _probes.clear()
        _warned.clear()
