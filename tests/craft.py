"""Hand-built GGUF bytes for tests that need a header to lie.

``gguf.GGUFWriter`` only writes valid files; these helpers write whatever they are told,
so each test can put one specific error into an otherwise valid file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFValueType as VT


def gguf_string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """One metadata entry; ``payload`` is the already-packed value."""
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, VT.UINT32, struct.pack("<I", value))


def kv_f32(key: str, value: float) -> bytes:
    return kv(key, VT.FLOAT32, struct.pack("<f", value))


def kv_str(key: str, value: str) -> bytes:
    return kv(key, VT.STRING, gguf_string(value))


def kv_str_array(key: str, values: list[str]) -> bytes:
    body = struct.pack("<IQ", VT.STRING, len(values)) + b"".join(gguf_string(v) for v in values)
    return kv(key, VT.ARRAY, body)


def tensor_info(name: str, ne: list[int], ggml_type: int, offset: int) -> bytes:
    """A tensor table entry; ``ne`` in GGUF order (row length first)."""
    return gguf_string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", ggml_type, offset)


@dataclass
class RawGGUF:
    """A GGUF file assembled from parts; every count and offset can be overridden."""

    kvs: list[bytes] = field(default_factory=list)
    tensors: list[bytes] = field(default_factory=list)
    data: bytes = b""
    version: int = 3
    magic: bytes = b"GGUF"
    n_tensors: int | None = None
    n_kv: int | None = None
    alignment: int = 32

    def to_bytes(self) -> bytes:
        head = self.magic + struct.pack("<I", self.version)
        head += struct.pack("<QQ", len(self.tensors) if self.n_tensors is None else self.n_tensors, len(self.kvs) if self.n_kv is None else self.n_kv)
        head += b"".join(self.kvs) + b"".join(self.tensors)
        pad = -len(head) % self.alignment
        return head + b"\0" * pad + self.data

    def write(self, path: Path) -> Path:
        path.write_bytes(self.to_bytes())
        return path


def phi3_metadata(n_embd: int = 64, n_head: int = 2, n_ff: int = 128, n_layer: int = 1, arch: str = "phi3") -> list[bytes]:
    """Minimal ``phi3`` hyperparameters for hand-built files."""
    return [
        kv_str("general.architecture", arch),
        kv_u32(f"{arch}.context_length", 128),
        kv_u32(f"{arch}.embedding_length", n_embd),
        kv_u32(f"{arch}.feed_forward_length", n_ff),
        kv_u32(f"{arch}.block_count", n_layer),
        kv_u32(f"{arch}.attention.head_count", n_head),
        kv_u32(f"{arch}.attention.head_count_kv", n_head),
        kv_f32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        kv_u32(f"{arch}.rope.dimension_count", n_embd // n_head),
        kv_str_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(16)]),
    ]
