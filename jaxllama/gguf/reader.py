"""Reading GGUF v2/v3 files: metadata, the tensor table, and memory-mapped tensor data.

The header is parsed here rather than with `gguf.GGUFReader`: on the real Qwen file
GGUFReader spends about 20 s turning 300k vocabulary strings into numpy views, and it
raises bare ValueErrors (or tries to map whatever sizes a damaged header claims). This
parser uses the `gguf` package's own type tables, checks every count against the bytes
that remain before it allocates anything, and raises `GGUFError` saying what and where.
Tensor data stays memory-mapped; `GGUFTensor.data` has exactly the dtype and shape that
`GGUFReader` gives (typed arrays for F32/F16/F64/I*, uint8 block rows otherwise), which
the tests check against GGUFReader on the real files.

The layout is checked as llama.cpp's `gguf_init_from_file` checks it (ggml/src/gguf.cpp),
so a file llama.cpp refuses is refused here too, before any tensor is mapped:
general.alignment is a UINT32 and a nonzero power of two; keys and tensor names are
non-empty and unique, names shorter than GGML_MAX_NAME (64, with the terminator); and
each tensor's offset is exactly the running sum of the previous tensors' sizes (in table
order), each padded to the alignment, so no tensor overlaps another or leaves a gap. That
last rule is what keeps a table whose offsets disagree with the data's real padding from
loading shifted bytes as weights. GGUFReader checks neither the offsets nor empty or
long names (benchmarks/RESULTS.md, "GGUF layout validation").
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from jaxllama.errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name is at most 63 bytes, plus the terminator
MAX_ELEMENTS = (1 << 63) - 1  # INT64_MAX: llama.cpp counts elements in int64_t
MAX_DIM = 1 << 40  # each dimension below this (llama.cpp allows up to INT64_MAX)
# Arrays of arrays nest at most this deep. llama.cpp refuses nested arrays outright
# (gguf.cpp, gguf_init_from_file_impl) and GGUFReader reads any depth; the cap keeps a
# crafted file (12 bytes a level) from exhausting the Python stack (RecursionError).
MAX_ARRAY_DEPTH = 8

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_TYPES = {
    GGUFValueType.UINT8: np.uint8,
    GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32,
    GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32,
    GGUFValueType.BOOL: np.bool_,
    GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}
# Tensor types GGUFReader presents as typed arrays; every other type is uint8 block rows.
_TYPED_TENSORS = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table.

    `shape` is the logical numpy-order shape (GGML `ne` reversed); `data` is a read-only
    memory-mapped view: typed for F32/F16/F64/I*, else uint8 of shape
    `shape[:-1] + (bytes per row,)`.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    data_offset: int
    alignment: int = DEFAULT_ALIGNMENT  # of the tensor data (general.alignment)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata key general.architecture is missing")
        return arch

    def tensor(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: required tensor {name} is missing") from None


class _Cursor:
    """Bounds-checked little-endian reads over a memory map."""

    def __init__(self, buf: memoryview | np.ndarray, path: Path):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                f"{self.path}: file is truncated or corrupt: {what} needs {n} bytes at offset "
                f"{self.pos}, but the file has {self.size} bytes"
            )

    def scalar(self, vtype: GGUFValueType, what: str):
        fmt = _SCALAR_FORMATS[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8 ({exc})") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(f"type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFError(f"{self.path}: {what} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0):
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(
                    f"{self.path}: {what} nests arrays more than {MAX_ARRAY_DEPTH} deep"
                )
            etype = self.value_type(f"elements of {what}")
            count = self.u64(f"length of {what}")
            if etype in _NUMPY_TYPES:
                itemsize = np.dtype(_NUMPY_TYPES[etype]).itemsize
                self.need(count * itemsize, f"{count} elements of {what}")
                arr = np.frombuffer(self.buf, dtype=_NUMPY_TYPES[etype], count=count, offset=self.pos)
                self.pos += count * itemsize
                return arr.tolist()
            # Strings and nested arrays take at least 8 bytes each (their length field).
            self.need(count * 8, f"{count} elements of {what}")
            if etype == GGUFValueType.STRING:
                return self._string_array(count, what)
            return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]
        return self.scalar(vtype, what)

    def _string_array(self, count: int, what: str) -> list[str]:
        out = []
        buf, pos, size = self.buf, self.pos, self.size
        unpack = struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.need(n, f"{what}[{i}]")
            raw = bytes(buf[pos : pos + n])
            pos += n
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                # llama.cpp stores some vocab pieces that are not valid UTF-8 on their own.
                out.append(raw.decode("utf-8", errors="surrogateescape"))
        self.pos = pos
        return out


def _shown(name: str, limit: int = 80) -> str:
    """A key or tensor name for a message: whole unless absurdly long."""
    return name if len(name) <= limit else f"{name[:limit]}... ({len(name)} characters)"


def _padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor-table entry as read, before its data is mapped."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (GGML ne reversed)
    rel_offset: int  # from the start of the data section, as stored
    nbytes: int


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header, validate its layout and map its tensor data (nothing
    is copied). Raises `GGUFError` naming the key or tensor, what was found and what was
    expected, for every file llama.cpp's reader refuses and a few more (see module doc)."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if path.is_dir():
        raise GGUFError(f"{path}: is a directory, expected a .gguf file")
    try:
        size = path.stat().st_size
        if size == 0:
            raise GGUFError(f"{path}: file is empty, expected a GGUF file")
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except PermissionError as exc:
        raise GGUFError(f"{path}: cannot be read ({exc.strerror})") from None
    except OSError as exc:
        raise GGUFError(f"{path}: cannot be opened ({exc})") from None

    cur = _Cursor(memoryview(mm), path)
    cur.need(4, "magic")
    magic = bytes(mm[:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file: magic is {magic!r}, expected {GGUF_MAGIC!r}")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (big-endian files are not supported)" if version >= 1 << 16 else ""
        raise GGUFError(
            f"{path}: GGUF version {version} is not supported{hint}; supported: "
            + ", ".join(map(str, SUPPORTED_VERSIONS))
        )
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # Each key/value takes at least 12 bytes and each tensor entry at least 24.
    cur.need(n_kv * 12, f"{n_kv} metadata entries")

    metadata: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if not key:
            raise GGUFError(f"{path}: metadata key #{i} is empty, expected a non-empty name")
        if key in metadata:
            raise GGUFError(f"{path}: metadata key {_shown(key)} appears twice "
                            f"(entries #{list(metadata).index(key)} and #{i}), expected once")
        vtype = cur.value_type(f"metadata {_shown(key)}")
        metadata[key] = cur.value(vtype, f"metadata {_shown(key)}")
        types[key] = vtype
    alignment = _alignment(path, metadata, types)

    cur.need(n_tensors * 24, f"{n_tensors} tensor entries")
    entries: list[_Entry] = []
    names: set[str] = set()
    for i in range(n_tensors):
        entries.append(_read_entry(cur, path, i, names))

    # The data section starts at the end of the table, padded to the alignment.
    data_offset = _padded(cur.pos, alignment)
    if entries and data_offset > size:
        raise GGUFError(
            f"{path}: file is truncated or corrupt: the tensor data starts at offset "
            f"{data_offset} (the tensor table's end {cur.pos} padded to alignment {alignment}), "
            f"but the file has {size} bytes"
        )
    expected = 0
    tensors: dict[str, GGUFTensor] = {}
    for e in entries:
        offset = data_offset + e.rel_offset
        if offset + e.nbytes > size:
            raise GGUFError(
                f"{path}: tensor {e.name} ({e.nbytes} bytes at offset {offset}) extends past the "
                f"end of the file ({size} bytes)"
            )
        if e.rel_offset != expected:
            raise GGUFError(
                f"{path}: tensor {e.name}: data offset {e.rel_offset}, expected {expected} "
                f"(running sum of padded tensor sizes, alignment {alignment})"
            )
        expected += _padded(e.nbytes, alignment)
        tensors[e.name] = _map_tensor(mm, e, offset)
    return GGUFFile(path, version, metadata, tensors, data_offset, alignment)


def _alignment(path: Path, metadata: dict[str, Any], types: dict[str, GGUFValueType]) -> int:
    """general.alignment: absent (32), or a UINT32 nonzero power of two (the spec and
    llama.cpp; an INT32 32 or a BOOL true is refused, not taken as 32 or 1)."""
    if ALIGNMENT_KEY not in metadata:
        return DEFAULT_ALIGNMENT
    value, vtype = metadata[ALIGNMENT_KEY], types[ALIGNMENT_KEY]
    if vtype != GGUFValueType.UINT32:
        shown = "an array" if vtype == GGUFValueType.ARRAY else repr(value)[:40]
        raise GGUFError(
            f"{path}: {ALIGNMENT_KEY} is {shown}, expected a power of two stored as UINT32, "
            f"found type {vtype.name}"
        )
    if value == 0 or value & (value - 1):
        raise GGUFError(f"{path}: {ALIGNMENT_KEY} is {value}, expected a power of two (nonzero)")
    return value


def _read_entry(cur: _Cursor, path: Path, i: int, names: set[str]) -> _Entry:
    """Tensor-table entry #i, its name, dimensions and type checked as llama.cpp does."""
    name = cur.string(f"name of tensor #{i}")
    if not name:
        raise GGUFError(f"{path}: name of tensor #{i} is empty, expected a non-empty name")
    n_bytes = len(name.encode("utf-8", errors="surrogateescape"))
    if n_bytes >= MAX_NAME:
        raise GGUFError(
            f"{path}: tensor {_shown(name)}: name is {n_bytes} bytes, expected at most "
            f"{MAX_NAME - 1} (GGML_MAX_NAME {MAX_NAME}, with the terminator)"
        )
    if "\0" in name:
        # ggml keeps names as C strings: llama.cpp would see only the part before the NUL.
        raise GGUFError(f"{path}: tensor {name!r}: name contains a NUL byte, expected none")
    if name in names:
        raise GGUFError(f"{path}: tensor {name} appears twice in the tensor table")
    names.add(name)
    n_dims = cur.u32(f"dimension count of tensor {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
    ne = [cur.u64(f"dimension {d} of tensor {name}") for d in range(n_dims)]
    raw_type = cur.u32(f"type of tensor {name}")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise GGUFError(f"{path}: tensor {name} has unknown type number {raw_type}") from None
    rel_offset = cur.u64(f"offset of tensor {name}")

    shape = tuple(reversed(ne))
    if any(d == 0 or d >= MAX_DIM for d in shape):
        raise GGUFError(f"{path}: tensor {name} has an invalid shape {shape}: every dimension "
                        f"expected from 1 to {MAX_DIM - 1}")
    n_elements = math.prod(shape)
    if n_elements > MAX_ELEMENTS:
        raise GGUFError(f"{path}: tensor {name} of shape {shape} has {n_elements} elements, "
                        f"expected at most {MAX_ELEMENTS} (INT64_MAX)")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        raise GGUFError(
            f"{path}: tensor {name} of type {qtype.name} has rows of {shape[-1]} elements, "
            f"not a multiple of its block size {block_size}"
        )
    return _Entry(name, qtype, shape, rel_offset, n_elements // block_size * type_size)


def _map_tensor(mm: np.memmap, e: _Entry, offset: int) -> GGUFTensor:
    """A read-only view of the entry's bytes (already checked to lie inside the file)."""
    if e.qtype in _TYPED_TENSORS:
        dtype = _TYPED_TENSORS[e.qtype]
        count = e.nbytes // np.dtype(dtype).itemsize
        data = np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(e.shape)
    else:
        block_size, type_size = GGML_QUANT_SIZES[e.qtype]
        row_bytes = e.shape[-1] // block_size * type_size
        data = np.frombuffer(mm, dtype=np.uint8, count=e.nbytes, offset=offset)
        data = data.reshape(e.shape[:-1] + (row_bytes,))
    return GGUFTensor(e.name, e.qtype, e.shape, offset, e.nbytes, data)
