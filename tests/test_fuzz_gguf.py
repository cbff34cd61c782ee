"""Fuzzed GGUF files: every outcome is a loaded model or one of the library's own errors.

Tiny valid files of each family (F32, and Q8_0 / Q4_0 where the 64- and 96-wide rows
allow; the K-quants need rows of 256) are truncated, corrupted byte by byte, have their
structural header fields overwritten with boundary integers, and have chunks copied,
inserted and deleted. Each result goes through `read_gguf` and then `load_gguf`. An
example passes when the file loads (and every param has the shape its config implies)
or raises a `JaxLlamaError`, and in either case within EXAMPLE_SECONDS and with at most
MEMORY_LIMIT bytes of Python-side allocations. numpy reports its buffers to
`tracemalloc`, so an array sized by an unchecked header count counts in full even if its
pages are never touched; a watchdog timer stops an example that runs away (memory or
time) before it takes the machine down with it. XLA's own allocations are not traced,
but the loader only dequantizes tensors whose shape matches the config and whose bytes
lie inside the file, so those are bounded by the file's size.

Files laid out at alignments 1, 32, 64 and 256 (with a 20-byte tensor, so the padding is
not zero) have their tensor offsets and their general.alignment (value or type) mutated.
There the property is stricter: the file loads exactly the weights of the unmutated file,
or `read_gguf` refuses it with a `GGUFError` (any other exception fails), since a layout
that disagrees with its data must never load shifted bytes.

The plain tests below the fuzzers pin the header cases one by one: absurd lengths,
unknown types, bad dimensions, alignment, encodings, and regressions for the bugs found
while writing this file (each names the bug it guards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import signal
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from jaxllama.errors import GGUFError, JaxLlamaError
from jaxllama.gguf.reader import MAX_ARRAY_DEPTH, read_gguf
from jaxllama.models import load_gguf

from ggufmake import ALIGNMENT_KEY, EXTRA_TENSOR, write_tiny_gguf

QT = gguf.GGMLQuantizationType

EXAMPLE_SECONDS = 5.0  # the requirement: each input is decided within a few seconds
HARD_SECONDS = 20.0  # the watchdog stops a hung example here (the assertion says why)
MEMORY_LIMIT = 32 << 20  # traced bytes; a valid tiny file loads in ~64 KiB (compiles aside)
WATCHDOG_INTERVAL = 0.05  # seconds between the watchdog's checks
# Multiplies every fuzzer's example count (e.g. 20 for a long hunt before a release).
SCALE = float(os.environ.get("JAXLLAMA_FUZZ_SCALE", "1"))

# name: (arch, qtype, tied output). Every family, both tied and untied output, and two
# block types: one more compile per distinct (type, shape) for the successful loads.
BASES = {
    "llama-f32": ("llama", QT.F32, True),
    "qwen2-f32": ("qwen2", QT.F32, False),
    "phi3-f32": ("phi3", QT.F32, True),
    "llama-q8_0": ("llama", QT.Q8_0, True),
    "phi3-q4_0": ("phi3", QT.Q4_0, False),
}
# name: (arch, qtype, tied output, alignment), each with ggufmake's 20-byte extra tensor
# after token_embd.weight, so every later offset depends on the alignment's padding.
LAYOUT_BASES = {
    "llama-f32-a1": ("llama", QT.F32, True, 1),
    "llama-f32-a32": ("llama", QT.F32, True, 32),
    "qwen2-f32-a256": ("qwen2", QT.F32, False, 256),
    "phi3-q8_0-a64": ("phi3", QT.Q8_0, False, 64),
}
ALL_BASES = (*BASES, *LAYOUT_BASES)

# Byte widths of the scalar GGUF value types (gguf.GGUFValueType numbers).
_SCALAR_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


# --------------------------------------------------------------------------------------
# The valid files and a map of their structural fields.


@dataclasses.dataclass(frozen=True)
class Field:
    """One integer of the header: its byte range, what it is, and whose it is."""

    offset: int
    width: int
    kind: str  # "version", "kv_count", "string_length", "dim", "tensor_offset", ...
    owner: str  # the metadata key or tensor name it belongs to ("" for the preamble)
    nth: int  # which of the owner's fields of this kind (dims, element string lengths)


@dataclasses.dataclass(frozen=True)
class Base:
    data: bytes
    header_end: int  # start of the tensor data (the tensor table end, aligned)
    fields: tuple[Field, ...]
    alignment: int = 32
    sizes: tuple[tuple[str, int], ...] = ()  # (tensor, bytes) in table order, from GGUFReader

    def kinds(self) -> list[str]:
        return sorted({f.kind for f in self.fields})

    def field(self, kind: str, owner: str, nth: int = 0) -> Field:
        for f in self.fields:
            if (f.kind, f.owner, f.nth) == (kind, owner, nth):
                return f
        raise KeyError((kind, owner, nth))


def _walk(data: bytes, alignment: int = 32) -> tuple[tuple[Field, ...], int]:
    """Independently of the reader, list the header's integer fields of a valid file."""
    fields: list[Field] = []
    pos = 4
    counts: dict[tuple[str, str], int] = {}

    def take(width: int, kind: str, owner: str) -> int:
        nonlocal pos
        nth = counts.get((kind, owner), 0)
        counts[kind, owner] = nth + 1
        fields.append(Field(pos, width, kind, owner, nth))
        value = int.from_bytes(data[pos : pos + width], "little")
        pos += width
        return value

    def string(kind: str, owner: str) -> str:
        nonlocal pos
        n = take(8, kind, owner)
        pos += n
        return data[pos - n : pos].decode()

    def value(vtype: int, owner: str, element: bool = False) -> None:
        nonlocal pos
        if vtype == 8:
            string("element_string_length" if element else "string_length", owner)
        elif vtype == 9:
            etype = take(4, "array_type", owner)
            for _ in range(take(8, "array_length", owner)):
                value(etype, owner, element=True)
        elif element:
            pos += _SCALAR_WIDTHS[vtype]
        else:
            take(_SCALAR_WIDTHS[vtype], "scalar", owner)

    take(4, "version", "")
    n_tensors = take(8, "tensor_count", "")
    n_kv = take(8, "kv_count", "")
    for _ in range(n_kv):
        key = string("key_length", "")
        value(take(4, "value_type", key), key)
    for _ in range(n_tensors):
        name = string("tensor_name_length", "")
        for _ in range(take(4, "n_dims", name)):
            take(8, "dim", name)
        take(4, "tensor_type", name)
        take(8, "tensor_offset", name)
    return tuple(fields), -(-pos // alignment) * alignment


@functools.cache
def _base(name: str) -> Base:
    if name in BASES:
        arch, qtype, tied = BASES[name]
        kwargs, alignment = {}, 32
    else:
        arch, qtype, tied, alignment = LAYOUT_BASES[name]
        kwargs = dict(alignment=alignment, extra_tensor=EXTRA_TENSOR)
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-base-"))
    try:
        path = write_tiny_gguf(tmp / "base.gguf", arch, qtype=qtype, tied=tied, **kwargs)
        data = path.read_bytes()
        sizes = tuple((t.name, int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors)
    finally:
        shutil.rmtree(tmp)
    fields, header_end = _walk(data, alignment)
    return Base(data, header_end, fields, alignment, sizes)


# --------------------------------------------------------------------------------------
# Mutations: plain tuples, so a failing example prints as something to paste into @example.


def _apply(base: Base, ops) -> bytes:
    d = bytearray(base.data)
    for op in ops:
        kind, args = op[0], op[1:]
        if kind == "truncate":
            del d[args[0] :]
        elif kind == "set":  # (pos, byte)
            if args[0] < len(d):
                d[args[0]] = args[1]
        elif kind == "xor":  # (pos, mask): a bit flip when mask is a power of two
            if args[0] < len(d):
                d[args[0]] ^= args[1]
        elif kind in ("int", "field"):  # (pos, width, value) or (kind, owner, nth, width, value)
            if kind == "field":
                pos = base.field(*args[:3]).offset
                width, value = args[3:]
            else:
                pos, width, value = args
            d[pos : pos + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
        elif kind == "copy":  # (src, n, dst): overwrite d[dst:] with d[src:src+n]
            src, n, dst = args
            chunk = bytes(d[src : src + n])
            d[dst : dst + len(chunk)] = chunk
        elif kind == "insert":  # (src, n, dst): duplicate d[src:src+n] at dst
            src, n, dst = args
            d[dst:dst] = bytes(d[src : src + n])
        elif kind == "delete":  # (pos, n)
            del d[args[0] : args[0] + args[1]]
        elif kind == "relayout":  # (alignment,): every tensor offset as laid out at it
            offsets = [f for f in base.fields if f.kind == "tensor_offset"]
            for f, value in zip(offsets, _running_sums(base, args[0]), strict=True):
                d[f.offset : f.offset + 8] = value.to_bytes(8, "little")
        else:
            raise AssertionError(f"unknown mutation {op}")
    return bytes(d)


INTERESTING = (
    0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 32, 255, 256, 1 << 15, (1 << 16) - 1, (1 << 31) - 1,
    1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 60, 1 << 63, (1 << 64) - 1, -2, -(1 << 31),
)

base_names = st.sampled_from(sorted(BASES))


def _position(draw, base: Base, slack: int = 0) -> int:
    """A byte offset, half the time inside the header (where the structure is)."""
    return draw(st.one_of(st.integers(0, base.header_end - 1),
                          st.integers(0, len(base.data) - 1 + slack)))


@st.composite
def truncations(draw):
    name = draw(base_names)
    return name, (("truncate", _position(draw, _base(name))),)


@st.composite
def byte_corruptions(draw):
    name = draw(base_names)
    base = _base(name)
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        pos = _position(draw, base)
        if draw(st.booleans()):
            ops.append(("xor", pos, 1 << draw(st.integers(0, 7))))
        else:
            ops.append(("set", pos, draw(st.integers(0, 255))))
    return name, tuple(ops)


@st.composite
def field_overwrites(draw):
    """Boundary integers in counts, lengths, types, dims and offsets (or any aligned word)."""
    name = draw(base_names)
    base = _base(name)
    ops = []
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.integers(0, 4)):
            kind = draw(st.sampled_from(base.kinds()))
            f = draw(st.sampled_from([f for f in base.fields if f.kind == kind]))
            width = f.width if draw(st.integers(0, 5)) else (4 if f.width == 8 else 8)  # spill over
            old = int.from_bytes(base.data[f.offset : f.offset + f.width], "little")
            value = draw(st.one_of(st.sampled_from(INTERESTING),
                                   st.sampled_from((old - 1, old + 1, 2 * old, old + (1 << 32))),
                                   st.integers(0, (1 << 8 * width) - 1)))
            ops.append(("field", f.kind, f.owner, f.nth, width, value))
        else:
            width = draw(st.sampled_from((4, 8)))
            pos = draw(st.integers(0, (base.header_end - width) // 4)) * 4
            ops.append(("int", pos, width, draw(st.sampled_from(INTERESTING))))
    return name, tuple(ops)


@st.composite
def splices(draw):
    name = draw(base_names)
    base = _base(name)
    ops = []
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(("copy", "insert", "delete")))
        n = draw(st.one_of(st.integers(1, 16), st.integers(1, 512)))
        if kind == "delete":
            ops.append((kind, _position(draw, base), n))
        else:
            ops.append((kind, _position(draw, base), n, _position(draw, base)))
    return name, tuple(ops)


def _running_sums(base: Base, alignment: int) -> list[int]:
    """The tensor offsets a table laid out at `alignment` holds."""
    out, at = [], 0
    for _, nbytes in base.sizes:
        out.append(at)
        at += -(-nbytes // alignment) * alignment
    return out


layout_base_names = st.sampled_from(sorted(LAYOUT_BASES))
ALIGNMENTS = tuple(1 << k for k in range(13))  # 1 .. 4096


@st.composite
def offset_mutations(draw):
    """Tensor offsets moved: by a little, by alignments, onto another tensor's, swapped, or
    the whole table laid out at another alignment than the data (alignment unchanged)."""
    name = draw(st.one_of(layout_base_names, base_names))
    base = _base(name)
    offsets = [f for f in base.fields if f.kind == "tensor_offset"]
    values = [int.from_bytes(base.data[f.offset : f.offset + 8], "little") for f in offsets]
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(("nudge", "align", "other", "swap", "relayout", "boundary")))
        i = draw(st.integers(0, len(offsets) - 1))
        f = offsets[i]
        if how == "relayout":
            ops.append(("relayout", draw(st.sampled_from(ALIGNMENTS))))
            continue
        if how == "swap":
            j = draw(st.integers(0, len(offsets) - 1))
            ops.append(("field", "tensor_offset", f.owner, 0, 8, values[j]))
            ops.append(("field", "tensor_offset", offsets[j].owner, 0, 8, values[i]))
            continue
        if how == "nudge":
            step = draw(st.integers(1, 2 * base.alignment + 1))
            value = values[i] + (step if draw(st.booleans()) else -step)
        elif how == "align":
            value = values[i] + base.alignment * draw(st.sampled_from((-2, -1, 1, 2, 64)))
        elif how == "other":
            j = draw(st.integers(0, len(values) - 1))
            value = values[j] + draw(st.sampled_from((0, 4, -4)))
        else:
            value = draw(st.sampled_from(INTERESTING))
        ops.append(("field", "tensor_offset", f.owner, 0, 8, value))
    return name, tuple(ops)


@st.composite
def alignment_mutations(draw):
    """general.alignment given another value (powers of two, near misses, boundaries) or
    another type (the same width more often, so the rest of the header still parses)."""
    name = draw(layout_base_names)
    ops = []
    if draw(st.integers(0, 2)):
        value = draw(st.one_of(st.sampled_from(ALIGNMENTS),
                               st.sampled_from(ALIGNMENTS).map(lambda a: a + 1),
                               st.sampled_from(INTERESTING), st.integers(0, (1 << 32) - 1)))
        ops.append(("field", "scalar", ALIGNMENT_KEY, 0, 4, value))
    if not ops or draw(st.booleans()):
        vtype = draw(st.one_of(st.sampled_from((4, 5, 6)), st.integers(0, 12),
                               st.sampled_from((13, 255, (1 << 32) - 1))))
        ops.append(("field", "value_type", ALIGNMENT_KEY, 0, 4, vtype))
    return name, tuple(ops)


# --------------------------------------------------------------------------------------
# Running one input.


class _Runaway(Exception):
    pass


@contextlib.contextmanager
def _watchdog(what: str, seconds: float = EXAMPLE_SECONDS):
    """Trace allocations and time; stop the block if either runs away, then assert both."""
    tracemalloc.start()
    start = time.monotonic()
    state = {"active": True}

    def check(signum, frame):
        if not state["active"]:
            return
        current = tracemalloc.get_traced_memory()[0]
        elapsed = time.monotonic() - start
        if current > MEMORY_LIMIT or elapsed > HARD_SECONDS:
            state["active"] = False
            raise _Runaway(f"{what}: stopped after {elapsed:.1f} s with {current} bytes traced")

    previous = signal.signal(signal.SIGALRM, check)
    signal.siginterrupt(signal.SIGALRM, False)  # restart, not fail, system calls it lands in
    signal.setitimer(signal.ITIMER_REAL, WATCHDOG_INTERVAL, WATCHDOG_INTERVAL)
    try:
        yield
    except _Runaway as exc:
        raise AssertionError(str(exc)) from None
    finally:
        state["active"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    elapsed = time.monotonic() - start
    assert peak <= MEMORY_LIMIT, f"{what}: allocated {peak} bytes (limit {MEMORY_LIMIT})"
    assert elapsed <= seconds, f"{what}: took {elapsed:.1f} s (limit {seconds})"


def _check_loaded(model) -> None:
    """Every param is a float32 array of the shape the (possibly mutated) config implies."""
    c, p = model.config, model.params
    d, q, kv, f, v = c.hidden_dim, c.q_dim, c.kv_dim, c.ffn_dim, c.vocab_size
    expected = {"embed": (v, d), "final_norm": (d,)}
    if not c.tied_output:
        expected["output"] = (v, d)
    assert len(p.layers) == c.num_layers
    for i in range(c.num_layers):
        expected.update({
            f"{i}.attn_norm": (d,), f"{i}.wq": (q, d), f"{i}.wk": (kv, d), f"{i}.wv": (kv, d),
            f"{i}.wo": (d, q), f"{i}.ffn_norm": (d,), f"{i}.w_gate": (f, d), f"{i}.w_up": (f, d),
            f"{i}.w_down": (d, f),
        })
        if c.qkv_bias:
            expected.update({f"{i}.bq": (q,), f"{i}.bk": (kv,), f"{i}.bv": (kv,)})
    got = {"embed": p.embed, "final_norm": p.final_norm, "output": p.output}
    for i, layer in enumerate(p.layers):
        got.update({f"{i}.{k.name}": getattr(layer, k.name) for k in dataclasses.fields(layer)})
    got = {k: x for k, x in got.items() if x is not None}
    assert {k: tuple(x.shape) for k, x in got.items()} == expected
    for x in got.values():
        assert isinstance(x, jax.Array) and x.dtype == np.float32


_counter = iter(range(1 << 62))


def _feed(workdir: Path, name: str, ops, seconds: float = EXAMPLE_SECONDS) -> str:
    """Write the mutated file, read and load it; return the outcome (for `event`)."""
    data = _apply(_base(name), ops)
    path = workdir / f"fuzz-{next(_counter)}.gguf"  # a fresh file: old maps never see it change
    path.write_bytes(data)
    try:
        with _watchdog(f"{name} {ops}", seconds):
            try:
                f = read_gguf(path)
            except JaxLlamaError as exc:
                return f"read: {type(exc).__name__}"
            for t in f.tensors.values():
                assert 1 <= len(t.shape) <= 4 and all(d > 0 for d in t.shape)
                assert t.offset + t.nbytes <= len(data) and t.data.nbytes == t.nbytes
            del f
            try:
                model = load_gguf(path, progress=False)
            except JaxLlamaError as exc:
                return f"load: {type(exc).__name__}"
            _check_loaded(model)
            jax.tree_util.tree_map(lambda x: x.delete(), model.params)
            return "loaded"
    finally:
        path.unlink()


@functools.cache
def _unmutated(name: str):
    """The base file as read and loaded: (tensors as (type, shape, bytes), metadata
    without general.alignment, params as host arrays)."""
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-ref-"))
    try:
        (tmp / "b.gguf").write_bytes(_base(name).data)
        tensors, metadata = _contents(read_gguf(tmp / "b.gguf"))
        model = load_gguf(tmp / "b.gguf", progress=False)
        params = [np.asarray(x) for x in jax.tree_util.tree_leaves(model.params)]
        jax.tree_util.tree_map(lambda x: x.delete(), model.params)
    finally:
        shutil.rmtree(tmp)
    return tensors, metadata, params


def _contents(f):
    tensors = {t.name: (t.qtype, t.shape, t.data.tobytes()) for t in f.tensors.values()}
    return tensors, {k: v for k, v in f.metadata.items() if k != ALIGNMENT_KEY}


def _feed_layout(workdir: Path, name: str, ops) -> str:
    """The mutated file is refused with a GGUFError, or loads the base's exact weights."""
    data = _apply(_base(name), ops)
    path = workdir / f"layout-{next(_counter)}.gguf"
    path.write_bytes(data)
    tensors, metadata, params = _unmutated(name)
    try:
        with _watchdog(f"{name} {ops}"):
            try:
                f = read_gguf(path)
            except GGUFError:  # any other exception fails the example
                return "refused"
            got_tensors, got_metadata = _contents(f)
            del f
            assert got_tensors == tensors, "accepted a layout that maps other bytes"
            assert got_metadata == metadata
            model = load_gguf(path, progress=False)
            got = [np.asarray(x) for x in jax.tree_util.tree_leaves(model.params)]
            jax.tree_util.tree_map(lambda x: x.delete(), model.params)
            assert len(got) == len(params)
            for a, b in zip(got, params):
                np.testing.assert_array_equal(a, b)
            return "identical"
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # Compile the dequantizers of every base's shapes up front, so the examples' timing
    # measures parsing and checking, not the first JIT compilation.
    d = tmp_path_factory.mktemp("fuzz")
    for name in ALL_BASES:
        assert _feed(d, name, (), seconds=HARD_SECONDS) == "loaded"
    return d


def _fuzz_settings(n: int):
    return settings(max_examples=max(1, round(n * SCALE)), deadline=EXAMPLE_SECONDS * 1000, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------
# The fuzzers: 1040 examples in all.


@_fuzz_settings(100)
@given(truncations())
@example(case=("llama-f32", (("truncate", 0),)))
@example(case=("phi3-q4_0", (("truncate", 7),)))
def test_truncated(workdir, case):
    event(_feed(workdir, *case))


@_fuzz_settings(200)
@given(byte_corruptions())
def test_corrupted_bytes(workdir, case):
    event(_feed(workdir, *case))


@_fuzz_settings(300)
@given(field_overwrites())
# Regression: block_count 2**32-1 made the loader plan one dict entry per layer (hang,
# then out of memory) before looking for the first missing tensor.
@example(case=("llama-f32", (("field", "scalar", "llama.block_count", 0, 4, (1 << 32) - 1),)))
@example(case=("phi3-q4_0", (("field", "scalar", "phi3.block_count", 0, 4, 1 << 26),)))
@example(case=("qwen2-f32", (("field", "array_length", "tokenizer.ggml.tokens", 0, 8, 1 << 60),)))
@example(case=("llama-q8_0", (("field", "tensor_count", "", 0, 8, (1 << 64) - 1),)))
def test_header_fields(workdir, case):
    event(_feed(workdir, *case))


@_fuzz_settings(120)
@given(splices())
def test_spliced(workdir, case):
    event(_feed(workdir, *case))


@_fuzz_settings(200)
@given(offset_mutations())
# The first layout: data padded to 32, the table packed as if at 1 (it loaded
# shifted bytes). Then one tensor moved onto the next padded boundary (a gap).
@example(case=("llama-f32-a32", (("relayout", 1),)))
@example(case=("llama-f32-a1", (("field", "tensor_offset", "blk.0.attn_norm.weight", 0, 8,
                                 16416),)))
def test_tensor_offsets(workdir, case):
    event(_feed_layout(workdir, *case))


@_fuzz_settings(120)
@given(alignment_mutations())
# The second layout: packed at 1 throughout, saying 32. Then an INT32 32; and 16,
# which gives this file the same layout if its table ends in the right place (then it
# must load the same weights).
@example(case=("llama-f32-a1", (("field", "scalar", ALIGNMENT_KEY, 0, 4, 32),)))
@example(case=("llama-f32-a32", (("field", "value_type", ALIGNMENT_KEY, 0, 4, 5),)))
@example(case=("llama-f32-a32", (("field", "scalar", ALIGNMENT_KEY, 0, 4, 16),)))
def test_alignment_field(workdir, case):
    event(_feed_layout(workdir, *case))


# --------------------------------------------------------------------------------------
# Plain tests of single header faults (test_reader.py holds the magic, versions 1 and 4,
# truncation, the tensor/kv/first-key counts of 2**60, and the tensor offset past the end).


def _refused(workdir: Path, data: bytes, pattern: str, exc=GGUFError) -> None:
    """Both the reader and the loader refuse `data` with `exc`, quickly and without allocating."""
    path = workdir / f"plain-{next(_counter)}.gguf"
    path.write_bytes(data)
    with _watchdog(pattern):
        with pytest.raises(exc, match=pattern):
            f = read_gguf(path)
            load_gguf(f, progress=False)
        with pytest.raises(exc, match=pattern):
            load_gguf(path, progress=False)
    path.unlink()


def _mutated(name: str, *ops) -> bytes:
    return _apply(_base(name), ops)


@pytest.mark.parametrize("value", [1 << 60, (1 << 64) - 1, 1 << 40])
@pytest.mark.parametrize("owner", ["general.architecture", "tokenizer.ggml.model"])
def test_metadata_string_length_absurd(workdir, owner, value):
    data = _mutated("llama-f32", ("field", "string_length", owner, 0, 8, value))
    _refused(workdir, data, f"truncated or corrupt: metadata {owner} needs {value} bytes")


@pytest.mark.parametrize("value", [1 << 60, (1 << 64) - 1, 1 << 61])
@pytest.mark.parametrize("owner", ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"])
def test_metadata_array_length_absurd(workdir, owner, value):
    data = _mutated("qwen2-f32", ("field", "array_length", owner, 0, 8, value))
    _refused(workdir, data, f"truncated or corrupt: {value} elements of metadata {owner}")


def test_element_string_length_absurd(workdir):
    data = _mutated("llama-f32", ("field", "element_string_length", "tokenizer.ggml.tokens", 5, 8,
                                  1 << 60))
    _refused(workdir, data, r"truncated or corrupt: metadata tokenizer.ggml.tokens\[5\] needs")


def test_big_endian_version(workdir):
    data = _mutated("llama-f32", ("field", "version", "", 0, 4, 3 << 24))
    _refused(workdir, data, r"version 50331648 is not supported \(big-endian files are not supported\)")


@pytest.mark.parametrize("value", [0, 5, (1 << 32) - 1])
def test_n_dims_out_of_range(workdir, value):
    data = _mutated("llama-f32", ("field", "n_dims", "blk.0.attn_q.weight", 0, 4, value))
    _refused(workdir, data, f"tensor blk.0.attn_q.weight has {value} dimensions, expected 1 to 4")


@pytest.mark.parametrize("value", [0, 1 << 40, (1 << 64) - 1])
def test_dimension_zero_or_absurd(workdir, value):
    data = _mutated("phi3-f32", ("field", "dim", "blk.1.ffn_up.weight", 1, 8, value))
    _refused(workdir, data, r"tensor blk.1.ffn_up.weight has an invalid shape")


def test_tensor_size_past_end(workdir):
    # The offset is in range, but a larger leading dimension runs the data past the end.
    base = _base("llama-f32")
    last = max((f for f in base.fields if f.kind == "tensor_offset"),
               key=lambda f: int.from_bytes(base.data[f.offset : f.offset + 8], "little"))
    data = _mutated("llama-f32", ("field", "dim", last.owner, 0, 8, 1 << 20))
    _refused(workdir, data, f"tensor {last.owner} .* extends past the end of the file")
    data = _mutated("llama-f32", ("field", "tensor_offset", last.owner, 0, 8, (1 << 64) - 1))
    _refused(workdir, data, f"tensor {last.owner} .* extends past the end of the file")


def test_tensor_row_not_whole_blocks(workdir):
    data = _mutated("llama-q8_0", ("field", "dim", "blk.0.ffn_down.weight", 0, 8, 95))
    _refused(workdir, data, "rows of 95 elements, not a multiple of its block size 32")


@pytest.mark.parametrize("value", [13, 255, (1 << 32) - 1])
def test_unknown_metadata_value_type(workdir, value):
    data = _mutated("llama-f32", ("field", "value_type", "llama.context_length", 0, 4, value))
    _refused(workdir, data, f"metadata llama.context_length has unknown value type {value}")
    data = _mutated("llama-f32", ("field", "array_type", "tokenizer.ggml.token_type", 0, 4, value))
    _refused(workdir, data, f"elements of metadata tokenizer.ggml.token_type has unknown value "
                            f"type {value}")


@pytest.mark.parametrize("value", [4, 36, 1 << 20, (1 << 32) - 1])  # 4, 36: gaps in the enum
def test_unknown_tensor_type(workdir, value):
    data = _mutated("llama-f32", ("field", "tensor_type", "output_norm.weight", 0, 4, value))
    _refused(workdir, data, f"tensor output_norm.weight has unknown type number {value}")


def _tiny_with(tmp_path: Path, **extra) -> bytes:
    return write_tiny_gguf(tmp_path / "extra.gguf", "llama", extra_metadata=extra).read_bytes()


@pytest.mark.parametrize("alignment", [0, 3, 48, 100])
def test_alignment_not_power_of_two(workdir, tmp_path, alignment):
    data = _tiny_with(tmp_path, **{"general.alignment": alignment})
    _refused(workdir, data, f"general.alignment is {alignment}, expected a power of two")


def test_alignment_of_wrong_type(workdir, tmp_path):
    data = _tiny_with(tmp_path, **{"general.alignment": "32"})
    _refused(workdir, data, "general.alignment is '32', expected a power of two")


def test_non_utf8_key_and_tensor_name(workdir):
    data = bytearray(_base("llama-f32").data)
    at = data.index(b"llama.context_length")
    data[at + 2] = 0xFF
    _refused(workdir, bytes(data), r"metadata key #\d+ is not valid UTF-8")
    data = bytearray(_base("llama-f32").data)
    at = data.index(b"blk.0.attn_k.weight")
    data[at + 1] = 0xC3  # a lead byte with no continuation
    _refused(workdir, bytes(data), r"name of tensor #\d+ is not valid UTF-8")


def test_duplicate_metadata_key(workdir):
    data = _base("llama-f32").data.replace(b"tokenizer.ggml.eos_token_id", b"tokenizer.ggml.bos_token_id")
    _refused(workdir, data, "metadata key tokenizer.ggml.bos_token_id appears twice")


def _metadata_only(*kv: bytes, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kv)) + b"".join(kv)


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_nested_arrays_are_capped(workdir):
    """Regression: arrays of arrays nested ~1000 deep (12 bytes a level) raised RecursionError."""
    def nested(depth):
        return (_key("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * (depth - 1)
                + struct.pack("<IQ", 4, 1) + struct.pack("<I", 7))

    path = workdir / "nested.gguf"
    path.write_bytes(_metadata_only(nested(MAX_ARRAY_DEPTH)))
    value = read_gguf(path).metadata["k"]
    for _ in range(MAX_ARRAY_DEPTH):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == 7
    for depth in (MAX_ARRAY_DEPTH + 1, 5000):
        _refused(workdir, _metadata_only(nested(depth)), f"nests arrays more than {MAX_ARRAY_DEPTH} deep")


def test_block_count_bounded_by_tensor_table(workdir):
    """Regression: a block_count of 2**26 hung building the per-layer plan (then ran out of memory)."""
    n_tensors = sum(f.kind == "tensor_offset" for f in _base("llama-f32").fields)
    for value in (1 << 26, (1 << 32) - 1, n_tensors + 1, 3):
        data = _mutated("llama-f32", ("field", "scalar", "llama.block_count", 0, 4, value))
        pattern = (f"block_count is {value}, but the file holds only {n_tensors} tensors"
                   if value > n_tensors else "required tensor blk.2.attn_norm.weight is missing")
        _refused(workdir, data, pattern)


@pytest.mark.parametrize("original", [0, 1])
def test_longrope_original_context_below_two(workdir, tmp_path, original):
    """Regression: original_context_length 0 or 1 raised ZeroDivisionError in the config."""
    w = gguf.GGUFWriter(str(tmp_path / "longrope.gguf"), "phi3")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_uint32("phi3.rope.scaling.original_context_length", original)
    w.add_tensor("token_embd.weight", np.zeros((64, 64), np.float32))
    w.add_tensor("rope_factors_long.weight", np.ones(8, np.float32))
    w.add_tensor("rope_factors_short.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = (tmp_path / "longrope.gguf").read_bytes()
    _refused(workdir, data, f"original_context_length is {original}, expected at least 2")


def test_walker_matches_reader():
    """The fuzzers' field map agrees with the reader on every base file."""
    for name in ALL_BASES:
        base = _base(name)
        tmp = Path(tempfile.mkdtemp(prefix="fuzz-walk-"))
        try:
            (tmp / "b.gguf").write_bytes(base.data)
            f = read_gguf(tmp / "b.gguf")
        finally:
            shutil.rmtree(tmp)
        assert base.header_end == f.data_offset
        tensors = [x for x in base.fields if x.kind == "tensor_offset"]
        assert [x.owner for x in tensors] == list(f.tensors)
        for x in tensors:
            rel = int.from_bytes(base.data[x.offset : x.offset + 8], "little")
            assert f.data_offset + rel == f.tensors[x.owner].offset
        dims = {t: math.prod(int.from_bytes(base.data[x.offset : x.offset + 8], "little")
                             for x in base.fields if x.kind == "dim" and x.owner == t)
                for t in f.tensors}
        assert dims == {t: f.tensors[t].n_elements for t in f.tensors}
        assert base.sizes == tuple((t, f.tensors[t].nbytes) for t in f.tensors)
        assert [f.data_offset + v for v in _running_sums(base, base.alignment)] == [
            t.offset for t in f.tensors.values()]
