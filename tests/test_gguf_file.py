"""The GGUF reader: typed metadata, the tensor table, and a clear error for every lie a header can tell."""

from __future__ import annotations

import struct
import sys

import numpy as np
import pytest
from craft import RawGGUF, gguf_string, kv, kv_str, kv_u32, phi3_metadata, tensor_info
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from phi3ref import GGUFError, GGUFFile, Phi3Config
from phi3ref.synthetic import vocab_path

F32 = int(QT.F32)


def one_tensor_file(ne=(64, 2), ggml_type=F32, offset=0, data_bytes=None, **kw) -> RawGGUF:
    n_bytes = int(np.prod(ne)) * 4 if data_bytes is None else data_bytes
    return RawGGUF(kvs=phi3_metadata(), tensors=[tensor_info("w.weight", list(ne), ggml_type, offset)], data=b"\x01" * n_bytes, **kw)


def expect_error(tmp_path, raw: RawGGUF | bytes, match: str) -> GGUFError:
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw if isinstance(raw, bytes) else raw.to_bytes())
    with pytest.raises(GGUFError, match=match) as info:
        GGUFFile(path)
    assert str(path) in str(info.value), "the message names the file"
    return info.value


# ---- valid files --------------------------------------------------------------------


def test_vocab_file_metadata():
    with GGUFFile(vocab_path()) as gf:
        assert gf.version == 3
        assert gf.architecture == "phi3"
        assert gf.get_int("phi3.block_count") == 32
        assert gf.get_float("phi3.rope.freq_base") == 10000.0
        assert gf.get_bool("tokenizer.ggml.add_bos_token") is True
        tokens = gf.get_array("tokenizer.ggml.tokens")
        assert len(tokens) == 32064 and tokens[:3] == ["<unk>", "<s>", "</s>"]
        assert tokens[32010] == "<|user|>"
        scores = gf.get_array("tokenizer.ggml.scores")
        assert scores.dtype == np.float32 and scores.shape == (32064,)
        assert gf.value_types["tokenizer.ggml.token_type"] == "array[int32]"
        assert "<|assistant|>" in gf.get_str("tokenizer.chat_template")
        assert gf.tensors == {}
        config = Phi3Config.from_gguf(gf)
        assert (config.n_embd, config.n_ff, config.n_head, config.n_rot, config.n_vocab) == (3072, 8192, 32, 96, 32064)
        assert config.partial_rotary is False and config.tied_embeddings is False


def test_typed_access_errors():
    with GGUFFile(vocab_path()) as gf:
        with pytest.raises(GGUFError, match="'general.architecture' should be an integer, but it is string"):
            gf.get_int("general.architecture")
        with pytest.raises(GGUFError, match="'phi3.block_count' should be a string"):
            gf.get_str("phi3.block_count")
        with pytest.raises(GGUFError, match="'phi3.nope' is missing"):
            gf.get_float("phi3.nope")
        assert gf.get_int("phi3.nope", 7) == 7
        assert gf.get("phi3.nope") is None
        with pytest.raises(GGUFError, match="should be an array"):
            gf.get_array("phi3.block_count")


def test_tensor_views_are_memmapped(tiny_model):
    path = tiny_model("phi3-mini", "Q4_K_M")
    with GGUFFile(path) as gf:
        info = gf.tensor_info("blk.0.ffn_up.weight")
        assert info.type_name == "Q4_K" and info.shape == (1024, 256)
        raw = gf.tensor_bytes("blk.0.ffn_up.weight")
        assert raw.shape == (1024, 144)
        assert isinstance(raw.base, np.memmap) or isinstance(raw, np.memmap)
        assert not raw.flags.writeable
        with open(path, "rb") as f:
            f.seek(info.offset)
            assert f.read(info.n_bytes) == raw.tobytes()
        norm = gf.dequantize_tensor("blk.0.attn_norm.weight")
        assert norm.shape == (256,) and norm.dtype == np.float32


def _resident_kib(path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0]:  # a mapping's header line
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="populating a mapping is a Linux madvise")
def test_populate_maps_a_tensor_in(tiny_model):
    path = tiny_model("phi3-mini", "Q4_K_M").resolve()
    with GGUFFile(path) as gf:
        name = "blk.1.ffn_up.weight"
        before = _resident_kib(path)
        gf.populate(name)
        assert _resident_kib(path) - before >= gf.tensor_info(name).n_bytes // 1024 - 8


# ---- one crafted error each ---------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04 this is a zip", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_not_gguf(tmp_path, content):
    expect_error(tmp_path, content, "not a GGUF file")


@pytest.mark.parametrize("version", [1, 4, 0x7FFF])
def test_unsupported_version(tmp_path, version):
    expect_error(tmp_path, one_tensor_file(version=version), f"unsupported GGUF version {version}")


def test_big_endian(tmp_path):
    raw = bytearray(one_tensor_file().to_bytes())
    raw[4:8] = struct.pack(">I", 3)
    expect_error(tmp_path, bytes(raw), "big-endian")


def test_truncated_everywhere(tmp_path):
    """Cut a valid file at every byte of its header and inside its data: always a GGUFError."""
    full = one_tensor_file().to_bytes()
    path = tmp_path / "cut.gguf"
    for cut in list(range(4, len(full) - 512)) + [len(full) - 1]:
        path.write_bytes(full[:cut])
        with pytest.raises(GGUFError, match="truncated|corrupt|runs past the end|not a GGUF"):
            GGUFFile(path)


@pytest.mark.parametrize("field", ["n_tensors", "n_kv"])
def test_absurd_counts(tmp_path, field):
    raw = one_tensor_file(**{field: 1 << 60})
    expect_error(tmp_path, raw, "more than the .* remaining bytes can hold")


def test_absurd_string_length(tmp_path):
    raw = RawGGUF(kvs=[struct.pack("<Q", 1 << 62) + b"general.architecture"])
    expect_error(tmp_path, raw, "truncated or corrupt header: metadata key #0")


def test_absurd_array_length(tmp_path):
    body = struct.pack("<IQ", VT.UINT32, 1 << 61)
    expect_error(tmp_path, RawGGUF(kvs=[kv("tokenizer.ggml.scores", VT.ARRAY, body)]), "array length of 'tokenizer.ggml.scores' is 2305843009213693952")
    body = struct.pack("<IQ", VT.STRING, 1 << 40)
    expect_error(tmp_path, RawGGUF(kvs=[kv("tokenizer.ggml.tokens", VT.ARRAY, body)]), "array length of 'tokenizer.ggml.tokens'")


def test_unknown_value_type(tmp_path):
    expect_error(tmp_path, RawGGUF(kvs=[kv("x.y", 99, b"\0" * 8)]), "value type 99 of 'x.y'")
    body = struct.pack("<IQ", 77, 1) + b"\0" * 8
    expect_error(tmp_path, RawGGUF(kvs=[kv("x.z", VT.ARRAY, body)]), "array item type 77 of 'x.z'")


def test_duplicate_key(tmp_path):
    expect_error(tmp_path, RawGGUF(kvs=[kv_u32("a.b", 1), kv_u32("a.b", 2)]), "'a.b' appears twice")


def test_invalid_utf8_key(tmp_path):
    expect_error(tmp_path, RawGGUF(kvs=[kv(b"bad\xff\xfekey", VT.UINT32, struct.pack("<I", 1))]), "not valid UTF-8")


def test_bad_alignment(tmp_path):
    raw = one_tensor_file()
    raw.kvs.append(kv_u32("general.alignment", 48))
    expect_error(tmp_path, raw, "general.alignment must be a power-of-two")


def test_unknown_ggml_type(tmp_path):
    expect_error(tmp_path, one_tensor_file(ggml_type=250), "tensor 'w.weight' has unknown GGML type id 250")


@pytest.mark.parametrize("ne", [[64, 2, 1, 1, 1], [64, 0]])
def test_impossible_dimensions(tmp_path, ne):
    expect_error(tmp_path, one_tensor_file(ne=ne, data_bytes=512), "tensor 'w.weight' has")


def test_row_not_whole_blocks(tmp_path):
    expect_error(tmp_path, one_tensor_file(ne=(100, 2), ggml_type=int(QT.Q4_K), data_bytes=288), "rows of 100 elements are not whole Q4_K blocks of 256")


def test_tensor_past_end_of_file(tmp_path):
    err = expect_error(tmp_path, one_tensor_file(data_bytes=100), "tensor 'w.weight' \\(F32, shape \\[2, 64\\], 512 bytes")
    assert "runs past the end of the file" in str(err)


def test_tensor_offset_overflow(tmp_path):
    expect_error(tmp_path, one_tensor_file(offset=(1 << 64) - 32), "runs past the end of the file")


def test_misaligned_offset(tmp_path):
    expect_error(tmp_path, one_tensor_file(offset=4, data_bytes=1024), "data offset 4 is not a multiple of the alignment 32")


def test_overlapping_tensors(tmp_path):
    raw = RawGGUF(
        kvs=phi3_metadata(),
        tensors=[tensor_info("a.weight", [64, 2], F32, 0), tensor_info("b.weight", [64, 2], F32, 256)],
        data=b"\0" * 1024,
    )
    expect_error(tmp_path, raw, "tensors 'a.weight' and 'b.weight' overlap")


def test_duplicate_tensor(tmp_path):
    raw = RawGGUF(
        kvs=phi3_metadata(),
        tensors=[tensor_info("a.weight", [64], F32, 0), tensor_info("a.weight", [64], F32, 256)],
        data=b"\0" * 1024,
    )
    expect_error(tmp_path, raw, "tensor 'a.weight' appears twice")


# ---- errors that need the model config ------------------------------------------------


def test_wrong_architecture(tmp_path):
    path = RawGGUF(kvs=phi3_metadata(arch="llama")).write(tmp_path / "llama.gguf")
    with GGUFFile(path) as gf, pytest.raises(GGUFError, match="architecture is 'llama'; phi3ref runs 'phi3'"):
        Phi3Config.from_gguf(gf)
    path = RawGGUF(kvs=[kv_str("general.name", "x")]).write(tmp_path / "noarch.gguf")
    with GGUFFile(path) as gf, pytest.raises(GGUFError, match="general.architecture is missing"):
        Phi3Config.from_gguf(gf)


def test_missing_hyperparameter(tmp_path):
    kvs = [k for k in phi3_metadata() if b"feed_forward_length" not in k]
    path = RawGGUF(kvs=kvs).write(tmp_path / "m.gguf")
    with GGUFFile(path) as gf, pytest.raises(GGUFError, match="'phi3.feed_forward_length' is missing"):
        Phi3Config.from_gguf(gf)


def test_inconsistent_heads(tmp_path):
    kvs = phi3_metadata(n_head=3) + [kv_u32("phi3.attention.key_length", 16)]
    kvs = [k for k in kvs if b"head_count_kv" not in k] + [kv_u32("phi3.attention.head_count_kv", 2)]
    path = RawGGUF(kvs=kvs).write(tmp_path / "m.gguf")
    with GGUFFile(path) as gf, pytest.raises(GGUFError, match="3 attention heads cannot be shared among 2 KV heads"):
        Phi3Config.from_gguf(gf)


def _model_file(tmp_path, tiny_model, drop: str | None = None, replace: dict | None = None):
    """Rebuild a tiny synthetic model's header with one tensor dropped or changed."""
    src = tiny_model("phi3-mini", "Q4_K_M")
    with GGUFFile(src) as gf:
        kvs = []
        for key, value in gf.metadata.items():
            if not key.startswith("tokenizer.") and key != "general.name":
                vt = gf.value_types[key]
                if vt == "string":
                    kvs.append(kv_str(key, value))
                elif vt == "uint32":
                    kvs.append(kv_u32(key, value))
                elif vt == "float32":
                    kvs.append(kv(key, VT.FLOAT32, struct.pack("<f", value)))
        kvs.append(kv(
            "tokenizer.ggml.tokens", VT.ARRAY,
            struct.pack("<IQ", VT.STRING, 32064) + b"".join(gguf_string(f"t{i}") for i in range(32064)),
        ))
        tensors, data = [], b""
        for t in gf.tensors.values():
            if t.name == drop:
                continue
            qtype, shape = (replace or {}).get(t.name, (t.qtype, t.shape))
            block, size = GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(shape)) // block * size
            tensors.append(tensor_info(t.name, list(reversed(shape)), int(qtype), len(data)))
            data += b"\0" * n_bytes + b"\0" * (-n_bytes % 32)
    return RawGGUF(kvs=kvs, tensors=tensors, data=data).write(tmp_path / "model.gguf")


def test_missing_tensor(tmp_path, tiny_model):
    path = _model_file(tmp_path, tiny_model, drop="blk.1.ffn_down.weight")
    with GGUFFile(path) as gf:
        config = Phi3Config.from_gguf(gf)
        with pytest.raises(GGUFError, match="tensor 'blk.1.ffn_down.weight' is missing"):
            config.check_tensors(gf)


def test_shape_inconsistent_with_config(tmp_path, tiny_model):
    path = _model_file(tmp_path, tiny_model, replace={"blk.0.attn_qkv.weight": (QT.Q5_K, (512, 256))})
    with GGUFFile(path) as gf:
        with pytest.raises(GGUFError, match=r"'blk.0.attn_qkv.weight' has shape \[512, 256\], but the config .* needs \[768, 256\]"):
            Phi3Config.from_gguf(gf).check_tensors(gf)


def test_unsupported_quant_type(tmp_path, tiny_model):
    path = _model_file(tmp_path, tiny_model, replace={"blk.0.ffn_up.weight": (QT.IQ2_XXS, (1024, 256))})
    with GGUFFile(path) as gf:
        assert not gf.tensors["blk.0.ffn_up.weight"].supported
        with pytest.raises(GGUFError, match="tensor 'blk.0.ffn_up.weight' has type IQ2_XXS, which phi3ref does not support"):
            Phi3Config.from_gguf(gf).check_tensors(gf)
        with pytest.raises(GGUFError, match="IQ2_XXS"):
            gf.tensor_bytes("blk.0.ffn_up.weight")
