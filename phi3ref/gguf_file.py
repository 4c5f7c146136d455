"""A validating, zero-copy GGUF reader.

A GGUF file is::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x  (key: string, value_type: u32, value)
    tensor_count x  (name: string, n_dims: u32, ne: u64[n_dims], ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32)
    tensor data: each tensor at data_start + offset

(strings are a u64 byte length followed by UTF-8 bytes; all numbers little-endian.)

The file is memory-mapped, exactly as ``gguf.GGUFReader`` does it, and tensor data are
returned as views of that map: opening a 2.4 GB model reads only its header. We parse the
header ourselves rather than through ``gguf.GGUFReader`` for two reasons:

* **Safety.** The Numba kernels that consume tensor bytes run without bounds checks, so
  every count, length and offset in the header is checked against the bytes that are
  really there before anything is allocated or handed on; a lie in a header becomes a
  :class:`GGUFError` naming the file and the field, never an out-of-bounds read.
  ``GGUFReader`` trusts the header (a corrupt array length makes it loop or crash).
* **Speed.** ``GGUFReader`` builds a numpy object per array element: 1.5 s for the 32k-token
  Phi-3 vocabulary on our machine, several times that for a 200k-token one. Here string
  arrays become Python lists and numeric arrays stay memmap views.

``gguf``'s enums and its table of type sizes (which knows every GGML type, including
those phi3ref cannot compute with) are used, so any GGUF can at least be inspected.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .quants import QUANT_TYPES, dequantize

__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "open_gguf"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4

_SCALARS: dict[int, tuple[str, str]] = {  # value type -> (struct format, numpy dtype)
    GGUFValueType.UINT8: ("<B", "<u1"),
    GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"),
    GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"),
    GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"),
    GGUFValueType.BOOL: ("<?", "<u1"),
    GGUFValueType.UINT64: ("<Q", "<u8"),
    GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}
_INT_TYPES = {
    GGUFValueType.UINT8,
    GGUFValueType.INT8,
    GGUFValueType.UINT16,
    GGUFValueType.INT16,
    GGUFValueType.UINT32,
    GGUFValueType.INT32,
    GGUFValueType.UINT64,
    GGUFValueType.INT64,
}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}


_MISSING: Any = object()  # "no default given": a missing key is an error


class GGUFError(Exception):
    """A GGUF file that phi3ref cannot use; the message names the file and the problem."""


class GGUFFileNotFoundError(GGUFError, FileNotFoundError):
    """The path does not name a readable file."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a GGUF tensor table.

    ``shape`` is in numpy order (rows first, the contiguous row last): GGUF stores the
    dimensions innermost first (``ne[0]`` is the row length), so it is reversed here.
    ``offset`` is absolute, from the start of the file.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    offset: int

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the last axis)."""
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block_size * type_size

    @property
    def supported(self) -> bool:
        """Whether phi3ref can decode / compute with this tensor's type."""
        return self.qtype in QUANT_TYPES


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer, for error messages that say where."""

    def __init__(self, buf: memoryview, path: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated or corrupt header: {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has {self.size} bytes"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        self.need(length, f"{what} ({length} bytes)")
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 element count, refused if the remaining bytes cannot possibly hold it."""
        n = self.u64(what)
        if n * min_item_bytes > self.size - self.pos:
            raise self.fail(
                f"{what} is {n}, more than the {self.size - self.pos} remaining bytes can hold "
                f"(corrupt or truncated header)"
            )
        return n


def _type_name(vtype: int, item: str | None = None) -> str:
    name = GGUFValueType(vtype).name.lower()
    return f"array[{item}]" if item is not None else name


class GGUFFile:
    """An open GGUF file: header parsed and validated, tensor data memory-mapped.

    Use as a context manager, or call :meth:`close`. Metadata values are Python scalars,
    lists of ``str`` for string arrays, and read-only numpy views for numeric arrays.
    """

    def __init__(self, path: str | os.PathLike[str]):
        if str(path) == "":
            raise GGUFFileNotFoundError("the path is empty")
        self.path = Path(path)
        name = str(self.path)
        try:
            regular = self.path.is_file()
            what = "no such file" if not self.path.exists() else "a folder" if self.path.is_dir() else "not a regular file"
        except OSError as e:  # a name too long for the file system, ...
            raise GGUFFileNotFoundError(f"{name[:200]}: not a usable path ({e.strerror})") from None
        if not regular:
            raise GGUFFileNotFoundError(f"{name}: {what}")
        self.file_size = self.path.stat().st_size
        if self.file_size < 4:
            raise GGUFError(f"{name}: not a GGUF file ({self.file_size} bytes)")
        self._map: np.memmap | None = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self._parse(_Cursor(memoryview(self._map), name))
        except Exception:
            self.close()
            raise

    # -- parsing -------------------------------------------------------------------------

    def _parse(self, cur: _Cursor) -> None:
        magic = bytes(cur.buf[0:4])
        if magic != GGUF_MAGIC:
            raise cur.fail(f"not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        cur.pos = 4
        version = cur.u32("version")
        if version & 0xFFFF == 0 and int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise cur.fail("big-endian GGUF file; phi3ref reads little-endian files only")
        if version not in SUPPORTED_VERSIONS:
            raise cur.fail(f"unsupported GGUF version {version} (phi3ref reads versions 2 and 3)")
        self.version = version
        # The smallest key/value is 8 (key length) + 1 (key) + 4 (type) + 1 (u8 value) bytes;
        # the smallest tensor info is 8 + 1 + 4 + 8 + 4 + 8.
        n_tensors = cur.count("tensor count", 33)
        n_kv = cur.count("metadata key/value count", 14)

        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, str] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if not key:
                raise cur.fail(f"metadata key #{i} is empty")
            if key in self.metadata:
                raise cur.fail(f"metadata key {key!r} appears twice")
            vtype = cur.u32(f"value type of {key!r}")
            self.metadata[key], self.value_types[key] = self._value(cur, vtype, key, depth=0)

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            align = self.metadata["general.alignment"]
            if self.value_types["general.alignment"] != "uint32" or align == 0 or align & (align - 1):
                raise cur.fail(f"general.alignment must be a power-of-two uint32, got {align!r}")
            self.alignment = align

        infos = []
        for i in range(n_tensors):
            infos.append(self._tensor_info(cur, i))
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment

        self.tensors: dict[str, TensorInfo] = {}
        for tname, qtype, shape, rel_offset in infos:
            if tname in self.tensors:
                raise cur.fail(f"tensor {tname!r} appears twice in the tensor table")
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            if shape[-1] % block_size:
                raise cur.fail(
                    f"tensor {tname!r}: rows of {shape[-1]} elements are not whole {qtype.name} "
                    f"blocks of {block_size}"
                )
            n_elements = int(np.prod(shape, dtype=object))
            n_bytes = n_elements // block_size * type_size
            if rel_offset % self.alignment:
                raise cur.fail(f"tensor {tname!r}: data offset {rel_offset} is not a multiple of the alignment {self.alignment}")
            start = self.data_offset + rel_offset
            if start + n_bytes > self.file_size:
                raise cur.fail(
                    f"tensor {tname!r} ({qtype.name}, shape {list(shape)}, {n_bytes} bytes at offset {start}) "
                    f"runs past the end of the file ({self.file_size} bytes): truncated or corrupt file"
                )
            self.tensors[tname] = TensorInfo(tname, qtype, shape, n_bytes, start)

        # Tensors must not share bytes: a kernel writing scratch data never does, but a
        # header that aliases two weights is corrupt.
        spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in self.tensors.values())
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise cur.fail(f"tensors {name_a!r} and {name_b!r} overlap in the file")

    def _value(self, cur: _Cursor, vtype: int, key: str, depth: int) -> tuple[Any, str]:
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype][0]
            return cur.scalar(fmt, f"value of {key!r}"), _type_name(vtype)
        if vtype == GGUFValueType.STRING:
            return cur.string(f"value of {key!r}"), "string"
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise cur.fail(f"value of {key!r}: arrays nested deeper than {MAX_ARRAY_NESTING}")
            item_type = cur.u32(f"array item type of {key!r}")
            if item_type in _SCALARS:
                fmt, dtype = _SCALARS[item_type]
                size = struct.calcsize(fmt)
                n = cur.count(f"array length of {key!r}", size)
                arr = np.frombuffer(cur.buf, dtype=dtype, count=n, offset=cur.pos)
                if item_type == GGUFValueType.BOOL:
                    arr = arr.view(np.bool_)
                cur.pos += n * size
                return arr, _type_name(vtype, _type_name(item_type))
            if item_type == GGUFValueType.STRING:
                n = cur.count(f"array length of {key!r}", 8)
                items = [cur.string(f"item {i} of {key!r}") for i in range(n)]
                return items, "array[string]"
            if item_type == GGUFValueType.ARRAY:
                n = cur.count(f"array length of {key!r}", 12)
                sub = [self._value(cur, GGUFValueType.ARRAY, f"{key}[{i}]", depth + 1) for i in range(n)]
                return [v for v, _ in sub], "array[array]"
            raise cur.fail(f"array item type {item_type} of {key!r} is not a GGUF value type")
        raise cur.fail(f"value type {vtype} of {key!r} is not a GGUF value type")

    def _tensor_info(self, cur: _Cursor, i: int) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (GGML allows 1 to {MAX_DIMS})")
        ne = [cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        if any(n == 0 or n >= 1 << 40 for n in ne):
            raise cur.fail(f"tensor {name!r} has an impossible shape {ne} (GGUF order)")
        raw_type = cur.u32(f"type of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise cur.fail(f"tensor {name!r} has unknown GGML type id {raw_type}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise cur.fail(f"tensor {name!r} has GGML type {qtype.name}, whose layout is unknown")
        offset = cur.u64(f"data offset of tensor {name!r}")
        return name, qtype, tuple(reversed(ne)), offset

    # -- metadata ------------------------------------------------------------------------

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def __contains__(self, key: str) -> bool:
        return key in self.metadata

    def _get(self, key: str, default: Any, kinds: set[int] | None, what: str) -> Any:
        if key not in self.metadata:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
            return default
        vtype = self.value_types[key]
        if kinds is not None and vtype not in {_type_name(k) for k in kinds}:
            raise GGUFError(f"{self.path}: metadata key {key!r} should be {what}, but it is {vtype}")
        return self.metadata[key]

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when the file does not have it."""
        return self.metadata.get(key, default)

    def get_int(self, key: str, default: Any = _MISSING) -> int:
        """An integer value; ``default`` if absent (``GGUFError`` if absent and no default)."""
        return self._get(key, default, _INT_TYPES, "an integer")

    def get_float(self, key: str, default: Any = _MISSING) -> float:
        """A float value (integers are accepted); ``default`` if absent."""
        value = self._get(key, default, _FLOAT_TYPES | _INT_TYPES, "a number")
        return float(value)

    def get_str(self, key: str, default: Any = _MISSING) -> str:
        """A string value; ``default`` if absent."""
        return self._get(key, default, {GGUFValueType.STRING}, "a string")

    def get_bool(self, key: str, default: Any = _MISSING) -> bool:
        """A bool value; ``default`` if absent."""
        return bool(self._get(key, default, {GGUFValueType.BOOL}, "a bool"))

    def get_array(self, key: str, default: Any = _MISSING) -> Any:
        """An array value (list of str, numpy view, or nested list); ``default`` if absent."""
        value = self._get(key, default, None, "an array")
        if key in self.value_types and not self.value_types[key].startswith("array"):
            raise GGUFError(f"{self.path}: metadata key {key!r} should be an array, but it is {self.value_types[key]}")
        return value

    # -- tensors -------------------------------------------------------------------------

    def tensor_info(self, name: str) -> TensorInfo:
        """The table entry of tensor ``name``; ``GGUFError`` if the file has none."""
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: tensor {name!r} is missing") from None

    def tensor_bytes(self, name: str) -> np.ndarray:
        """Raw bytes of a tensor as a read-only memmap view, shape ``(*shape[:-1], row_bytes)``.

        Raises ``GGUFError`` for a missing tensor or a type phi3ref cannot compute with.
        """
        info = self.tensor_info(name)
        if not info.supported:
            supported = ", ".join(t.name for t in QUANT_TYPES)
            raise GGUFError(
                f"{self.path}: tensor {name!r} has type {info.type_name}, which phi3ref does not support "
                f"(supported: {supported})"
            )
        if self._map is None:
            raise GGUFError(f"{self.path}: file is closed")
        flat = self._map[info.offset : info.offset + info.n_bytes]
        return flat.reshape(*info.shape[:-1], info.row_bytes)

    def populate(self, name: str) -> None:
        """Map tensor ``name``'s pages into the process now rather than at first use, as
        llama.cpp's ``MAP_POPULATE`` does, so that the first forward pass does not stall on
        page faults (Linux 5.14+: ``MADV_POPULATE_READ``; older Linux: a read-ahead hint;
        elsewhere nothing). Reads the tensor from disk if it is not in the page cache."""
        if not sys.platform.startswith("linux"):
            return
        view = self.tensor_bytes(name)
        start = view.ctypes.data - view.ctypes.data % mmap.PAGESIZE
        length = view.ctypes.data + view.nbytes - start
        if _madvise(start, length, _MADV_POPULATE_READ) != 0:
            _madvise(start, length, mmap.MADV_WILLNEED)

    def dequantize_tensor(self, name: str) -> np.ndarray:
        """A tensor decoded to float32, in numpy shape order. For small tensors (norms,
        rope factors) and tests: the model never expands a weight matrix whole."""
        info = self.tensor_info(name)
        return dequantize(self.tensor_bytes(name), info.qtype).reshape(info.shape)

    def close(self) -> None:
        """Drop the memory map (views handed out keep it alive until they are freed)."""
        self._map = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, version={self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


_MADV_POPULATE_READ = 22  # linux/mman.h, Linux 5.14+ (Python's mmap module does not name it)


@functools.lru_cache(maxsize=None)
def _libc_madvise():
    """libc's madvise(2), looked up once (a model populates hundreds of tensors)."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _madvise(address: int, length: int, advice: int) -> int:
    """libc madvise(2); 0 on success."""
    return _libc_madvise()(address, length, advice)


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file (see :class:`GGUFFile`)."""
    return GGUFFile(path)
