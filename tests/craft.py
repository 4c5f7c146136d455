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


# -- rewriting real files: one lie at a time in an otherwise valid model ---------------------

_SCALAR_FORMATS = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
    VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}
_VT_BY_NAME = {vt.name.lower(): vt for vt in VT}


def value_type(name: str) -> tuple[int, int | None]:
    """GGUFFile.value_types' spelling ("uint32", "array[string]") -> (type, item type)."""
    if name.startswith("array["):
        inner = name[len("array[") : -1]
        return VT.ARRAY, _VT_BY_NAME[inner] if inner != "array" else VT.ARRAY
    return _VT_BY_NAME[name], None


def encode_value(vtype: int, value, item: int | None = None) -> bytes:
    """The bytes of one metadata value of GGUF type ``vtype`` (arrays: items of ``item``)."""
    if vtype == VT.STRING:
        return gguf_string(value)
    if vtype == VT.ARRAY:
        values = list(value)
        if item == VT.STRING:
            body = b"".join(gguf_string(v) for v in values)
        elif item == VT.ARRAY:
            raise ValueError("nested arrays are not rewritten")
        else:
            body = b"".join(struct.pack(_SCALAR_FORMATS[item], v) for v in values)
        return struct.pack("<IQ", item, len(values)) + body
    return struct.pack(_SCALAR_FORMATS[vtype], value)


def rewrite_gguf(src: Path, dst: Path, *, set_kv: dict | None = None, drop: tuple[str, ...] = (), tensor_data: dict | None = None) -> Path:
    """Copy the GGUF ``src`` to ``dst`` with metadata changed: ``set_kv`` maps a key to
    ``(vtype, value)`` or ``(VT.ARRAY, values, item_type)`` (added if new), ``drop`` removes
    keys; ``tensor_data`` maps a tensor name to replacement bytes (same length). Tensor
    table and data are kept, with the data realigned after the new header."""
    import numpy as np

    from phi3ref.gguf_file import GGUFFile

    set_kv = dict(set_kv or {})
    with GGUFFile(src) as gf:
        kvs = []
        for key, value in gf.metadata.items():
            if key in drop:
                continue
            if key in set_kv:
                spec = set_kv.pop(key)
                kvs.append(kv(key, spec[0], encode_value(*spec)))
                continue
            vtype, item = value_type(gf.value_types[key])
            if vtype == VT.ARRAY and item not in (VT.STRING, VT.ARRAY):
                body = struct.pack("<IQ", item, len(value)) + np.asarray(value).tobytes()
                kvs.append(kv(key, vtype, body))
            else:
                kvs.append(kv(key, vtype, encode_value(vtype, value, item)))
        kvs += [kv(key, spec[0], encode_value(*spec)) for key, spec in set_kv.items()]
        infos, data = [], bytearray(Path(src).read_bytes()[gf.data_offset :])
        for name, info in gf.tensors.items():
            rel = info.offset - gf.data_offset
            infos.append(tensor_info(name, list(reversed(info.shape)), int(info.qtype), rel))
            if tensor_data and name in tensor_data:
                raw = tensor_data[name]
                assert len(raw) == info.n_bytes, (name, len(raw), info.n_bytes)
                data[rel : rel + info.n_bytes] = raw
        alignment = gf.alignment
    return RawGGUF(kvs=kvs, tensors=infos, data=bytes(data), alignment=alignment).write(Path(dst))


# -- small vocabularies: tokenizers that build in milliseconds, for the fuzz corpus ---------


def small_spm_vocab(path: Path, n_normal: int = 48) -> Path:
    """A vocab-only GGUF cut from the real Phi-3 vocabulary: <unk> <s> </s>, the 256 byte
    tokens, the first ``n_normal`` merged tokens and Phi-3's control tokens (<|endoftext|>,
    <|assistant|>, ... <|end|>, <|user|>), with their scores, types and the chat template."""
    import numpy as np

    from phi3ref.gguf_file import GGUFFile
    from phi3ref.synthetic import vocab_path

    with GGUFFile(vocab_path()) as gf:
        tokens = gf.get_array("tokenizer.ggml.tokens")
        keep = list(range(259 + n_normal)) + list(range(32000, 32011))
        scores = np.asarray(gf.get_array("tokenizer.ggml.scores"))[keep]
        types = np.asarray(gf.get_array("tokenizer.ggml.token_type"))[keep]
        kvs = [
            kv_str("tokenizer.ggml.model", "llama"),
            kv_str("tokenizer.ggml.pre", "default"),
            kv_str_array("tokenizer.ggml.tokens", [tokens[i] for i in keep]),
            kv("tokenizer.ggml.scores", VT.ARRAY, encode_value(VT.ARRAY, scores.tolist(), VT.FLOAT32)),
            kv("tokenizer.ggml.token_type", VT.ARRAY, encode_value(VT.ARRAY, types.tolist(), VT.INT32)),
            kv_u32("tokenizer.ggml.bos_token_id", 1),
            kv_u32("tokenizer.ggml.eos_token_id", keep.index(32000)),
            kv_u32("tokenizer.ggml.unknown_token_id", 0),
            kv("tokenizer.ggml.add_bos_token", VT.BOOL, b"\x01"),
            kv_str("tokenizer.chat_template", gf.get_str("tokenizer.chat_template")),
        ]
    return RawGGUF(kvs=kvs).write(Path(path))


def gpt2_vocab(path: Path, vocab_size: int = 400) -> Path:
    """A vocab-only GGUF with a GPT-2-style byte-level BPE trained on a small corpus (as
    Phi-4's vocabularies are stored), Phi-3's control tokens added as control tokens."""
    import json

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from phi3ref.tokenizer import PRE_TOKENIZERS

    corpus = ["The quick brown fox jumps over the lazy dog. 1234 numbers!", "Ice hockey haiku: puck on the frozen lake.",
              "naïve café — résumé 🦙", "Write a haiku about ice hockey"] * 50
    specials = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    trained = tokenizers.Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(PRE_TOKENIZERS["gpt-2"].regexes[0]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trained.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials)
    trained.train_from_iterator(corpus, trainer)
    spec = json.loads(trained.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [3 if t in specials else 1 for t in tokens]
    return RawGGUF(kvs=[
        kv_str("tokenizer.ggml.model", "gpt2"),
        kv_str("tokenizer.ggml.pre", "gpt-2"),
        kv_str_array("tokenizer.ggml.tokens", tokens),
        kv_str_array("tokenizer.ggml.merges", merges),
        kv("tokenizer.ggml.token_type", VT.ARRAY, encode_value(VT.ARRAY, types, VT.INT32)),
        kv_u32("tokenizer.ggml.eos_token_id", tokens.index("<|endoftext|>")),
        kv_u32("tokenizer.ggml.eot_token_id", tokens.index("<|end|>")),
        kv("tokenizer.ggml.add_bos_token", VT.BOOL, b"\x00"),
        kv_str("tokenizer.chat_template", "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"),
    ]).write(Path(path))
