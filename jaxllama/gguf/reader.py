"""Reading GGUF v2/v3 files: metadata, the tensor table, and memory-mapped tensor data.

The header is parsed here rather than with `gguf.GGUFReader`: on the real Qwen file
GGUFReader spends about 20 s turning 300k vocabulary strings into numpy views, and it
raises bare ValueErrors (or tries to map whatever sizes a damaged header claims). This
parser uses the `gguf` package's own type tables, checks every count against the bytes
that remain before it allocates anything, and raises `GGUFError` saying what and where.
Tensor data stays memory-mapped; `GGUFTensor.data` has exactly the dtype and shape that
`GGUFReader` gives (typed arrays for F32/F16/F64/I*, uint8 block rows otherwise), which
the tests check against GGUFReader on the real files.
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
MAX_DIMS = 4  # GGML_MAX_DIMS
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


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header and map its tensor data (nothing is copied)."""
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
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise GGUFError(f"{path}: metadata key {key} appears twice")
        vtype = cur.value_type(f"metadata {key}")
        metadata[key] = cur.value(vtype, f"metadata {key}")

    cur.need(n_tensors * 24, f"{n_tensors} tensor entries")
    entries = []
    names = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
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
        offset = cur.u64(f"offset of tensor {name}")
        entries.append((name, qtype, tuple(reversed(ne)), offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment is {alignment!r}, expected a power of two")
    data_offset = -(-cur.pos // alignment) * alignment

    tensors: dict[str, GGUFTensor] = {}
    for name, qtype, shape, rel_offset in entries:
        tensors[name] = _map_tensor(mm, path, size, name, qtype, shape, data_offset + rel_offset)
    return GGUFFile(path, version, metadata, tensors, data_offset)


def _map_tensor(mm, path, size, name, qtype, shape, offset) -> GGUFTensor:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if any(d == 0 for d in shape) or any(d >= 1 << 40 for d in shape):
        raise GGUFError(f"{path}: tensor {name} has an invalid shape {shape}")
    n_elements = math.prod(shape)
    if shape[-1] % block_size:
        raise GGUFError(
            f"{path}: tensor {name} of type {qtype.name} has rows of {shape[-1]} elements, "
            f"not a multiple of its block size {block_size}"
        )
    nbytes = n_elements // block_size * type_size
    if offset + nbytes > size:
        raise GGUFError(
            f"{path}: tensor {name} ({nbytes} bytes at offset {offset}) extends past the end "
            f"of the file ({size} bytes)"
        )
    if qtype in _TYPED_TENSORS:
        dtype = _TYPED_TENSORS[qtype]
        data = np.frombuffer(mm, dtype=dtype, count=n_elements, offset=offset).reshape(shape)
    else:
        row_bytes = shape[-1] // block_size * type_size
        data = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset)
        data = data.reshape(shape[:-1] + (row_bytes,))
    return GGUFTensor(name, qtype, shape, offset, nbytes, data)
