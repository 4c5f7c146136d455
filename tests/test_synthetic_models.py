"""Synthetic Phi-3 models: layout, types, metadata and vocabulary as llama.cpp writes them."""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest
from conftest import ALL_PRESETS
from gguf import GGMLQuantizationType as QT

from phi3ref import GGUFFile, Phi3Config
from phi3ref.quants import QUANT_TYPES
from phi3ref.synthetic import PRESETS, QUANT_MIXES, preset_shape, preset_vocab, tensor_plan, tensor_type, vocab_path, write_model


def reader_tensors(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (type, numpy-order shape) as gguf-py's own reader sees the file."""
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape.tolist()))) for t in r.tensors}


def expected_names(n_layer: int, longrope: bool, tied: bool) -> list[str]:
    names = ["token_embd.weight"]
    if longrope:
        names += ["rope_factors_long.weight", "rope_factors_short.weight"]
    for i in range(n_layer):
        names += [f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")]
    names.append("output_norm.weight")
    if not tied:
        names.append("output.weight")
    return names


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_tiny_preset_layout(preset, tiny_model):
    shape = preset_shape(preset, "tiny")
    path = tiny_model(preset, "Q4_K_M")
    tensors = reader_tensors(path)
    assert list(tensors) == expected_names(shape.n_layer, shape.longrope, shape.tied_embeddings)

    e, hd = shape.n_embd, shape.n_embd // shape.n_head
    with GGUFFile(preset_vocab(preset)) as vocab:
        n_vocab = len(vocab.get_array("tokenizer.ggml.tokens"))
    assert n_vocab == {"phi4": 100352, "phi4-mini": 200064}.get(preset, 32064)
    assert tensors["token_embd.weight"][1] == (n_vocab, e)
    assert tensors["blk.0.attn_qkv.weight"][1] == ((shape.n_head + 2 * shape.n_head_kv) * hd, e)
    assert tensors["blk.0.attn_output.weight"][1] == (e, shape.n_head * hd)
    assert tensors["blk.0.ffn_up.weight"][1] == (2 * shape.n_ff, e)
    assert tensors["blk.0.ffn_down.weight"][1] == (e, shape.n_ff)
    if shape.longrope:
        assert tensors["rope_factors_long.weight"] == ("F32", (shape.n_rot // 2,))

    with GGUFFile(path) as gf:
        config = Phi3Config.from_gguf(gf)
        config.check_tensors(gf)
        assert (config.n_layer, config.n_embd, config.n_ff, config.n_head, config.n_head_kv, config.n_rot) == (
            shape.n_layer, shape.n_embd, shape.n_ff, shape.n_head, shape.n_head_kv, shape.n_rot,
        )
        assert config.tied_embeddings == shape.tied_embeddings
        assert config.longrope == shape.longrope
        assert config.partial_rotary == (shape.n_rot < hd)
        assert config.gqa == (shape.n_head_kv < shape.n_head)
        if shape.longrope:
            assert config.rope_orig_ctx == shape.rope_orig_ctx
            scale = shape.n_ctx / shape.rope_orig_ctx
            assert config.longrope_attn_factor == pytest.approx(np.sqrt(1 + np.log(scale) / np.log(shape.rope_orig_ctx)), rel=1e-6)
            long = gf.dequantize_tensor("rope_factors_long.weight")
            short = gf.dequantize_tensor("rope_factors_short.weight")
            assert (long >= 1).all() and (short >= 1).all() and long[-1] > short[-1]
        # Phi-4 says "no sliding window" with a 0; the others' tiny sizes leave the key out
        assert gf.get("phi3.attention.sliding_window") == (0 if preset == "phi4" else None)
        assert config.sliding_window is None
        # the preset's vocabulary (every tokenizer key), special tokens and chat template
        with GGUFFile(preset_vocab(preset)) as vocab:
            keys = [k for k in vocab.metadata if k.startswith("tokenizer.")]
            assert keys == [k for k in gf.metadata if k.startswith("tokenizer.")]
            assert {"tokenizer.ggml.tokens", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.token_type"} <= set(keys)
            for key in keys:
                a, b = gf.get(key), vocab.get(key)
                assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b), key
            assert gf.value_types["tokenizer.ggml.token_type"] == vocab.value_types["tokenizer.ggml.token_type"]


def test_q4_k_m_follows_llama_cpp_recipe(tiny_model):
    n_layer = 8
    path = write_model(tiny_model("phi3-mini").parent / "q4km8.gguf", preset="phi3-mini", n_layer=n_layer)
    types = {name: t for name, (t, _) in reader_tensors(path).items()}
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_K"
    for i in range(n_layer):
        assert types[f"blk.{i}.attn_qkv.weight"] == "Q5_K"
        assert types[f"blk.{i}.attn_output.weight"] == "Q4_K"
        assert types[f"blk.{i}.ffn_up.weight"] == "Q4_K"
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"
    # use_more_bits(i, 8): i < 1, i >= 7, (i - 1) % 3 == 2
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(n_layer)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]


def test_separate_q_k_v_projections(tmp_path):
    """fused_qkv=False writes attn_q / attn_k / attn_v (types by llama.cpp's recipe for
    attn_v) holding the fused projection's rows, so the two files are one model."""
    n_layer = 8
    split = write_model(tmp_path / "split.gguf", preset="phi3-medium", n_layer=n_layer, fused_qkv=False, seed=4)
    types = {name: t for name, (t, _) in reader_tensors(split).items()}
    assert not any(name.endswith("attn_qkv.weight") for name in types)
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(n_layer)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert {types[f"blk.{i}.attn_{n}.weight"] for i in range(n_layer) for n in "qk"} == {"Q4_K"}
    with GGUFFile(split) as gf:
        assert not Phi3Config.from_gguf(gf).fused_qkv
    fused = write_model(tmp_path / "fused.gguf", preset="phi3-medium", quant="Q8_0", seed=4)
    split = write_model(tmp_path / "split8.gguf", preset="phi3-medium", quant="Q8_0", seed=4, fused_qkv=False)
    with GGUFFile(fused) as a, GGUFFile(split) as b:
        for i in range(2):
            parts = [np.asarray(b.tensor_bytes(f"blk.{i}.attn_{n}.weight")) for n in "qkv"]
            assert np.array_equal(np.asarray(a.tensor_bytes(f"blk.{i}.attn_qkv.weight")), np.concatenate(parts))


def test_full_size_mix_matches_the_real_file_size():
    """The real Phi-3-mini-4k-instruct-q4.gguf is 2.39 GB; our plan for the full preset must
    add up to the same size (checked without writing 2.4 GB)."""
    total = sum(
        int(np.prod(p.shape)) // QUANT_TYPES[p.qtype].block_size * QUANT_TYPES[p.qtype].type_size
        for p in tensor_plan(preset_shape("phi3-mini", "full"), 32064, "Q4_K_M", pure=False)
    )
    assert 2.36e9 < total < 2.40e9


def test_tied_head_and_legacy_mixes():
    assert tensor_type("token_embd.weight", (32064, 256), "Q4_K_M", 2, tied=True) == QT.Q6_K
    assert tensor_type("token_embd.weight", (32064, 256), "Q4_K_M", 2, tied=False) == QT.Q4_K
    assert tensor_type("output.weight", (32064, 256), "Q4_0", 2) == QT.Q6_K
    assert tensor_type("output.weight", (32064, 256), "Q8_0", 2) == QT.Q8_0
    assert tensor_type("output.weight", (32064, 256), "Q4_0", 2, pure=True) == QT.Q4_0
    assert tensor_type("blk.0.ffn_up.weight", (512, 256), "F16", 2) == QT.F16
    assert tensor_type("blk.0.attn_norm.weight", (256,), "Q4_K_M", 2) == QT.F32
    # rows that are not whole 256-blocks fall back as in llama.cpp
    assert tensor_type("blk.0.ffn_down.weight", (96, 96), "Q4_K_S", 2) == QT.Q5_0
    with pytest.raises(ValueError, match="unknown quant 'Q3_K_XL'"):
        tensor_type("x", (2, 2), "Q3_K_XL", 1)


@pytest.mark.parametrize("quant", list(QUANT_MIXES))
def test_every_mix_writes_a_valid_file(quant, tmp_path):
    path = write_model(tmp_path / f"{quant}.gguf", preset="phi3-medium", quant=quant, n_layer=1)
    base = QUANT_MIXES[quant][0].name
    types = {t for t, _ in reader_tensors(path).values()}
    assert base in types and "F32" in types
    with GGUFFile(path) as gf:
        Phi3Config.from_gguf(gf).check_tensors(gf)
        assert gf.get_int("general.file_type") == int(QUANT_MIXES[quant][1])
        w = gf.dequantize_tensor("blk.0.ffn_up.weight")
        ref = gguf.quants.dequantize(gf.tensor_bytes("blk.0.ffn_up.weight"), gf.tensors["blk.0.ffn_up.weight"].qtype)
        assert np.array_equal(w, ref)
        assert 0.5 / np.sqrt(256) < w.std() < 2 / np.sqrt(256)  # 1/sqrt(fan_in) weights


def test_same_seed_same_bytes(tmp_path):
    digests = set()
    for name in ("a", "b"):
        path = write_model(tmp_path / f"{name}.gguf", preset="phi4-mini", quant="Q4_0", seed=5)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    other = write_model(tmp_path / "c.gguf", preset="phi4-mini", quant="Q4_0", seed=6)
    assert hashlib.sha256(other.read_bytes()).hexdigest() not in digests


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'phi2'"):
        write_model(tmp_path / "x.gguf", preset="phi2")
    with pytest.raises(ValueError, match="n_head=8 is not a multiple of n_head_kv=3"):
        write_model(tmp_path / "x.gguf", preset="phi3-medium", n_head_kv=3)
    with pytest.raises(ValueError, match="n_rot=66 must be even and at most head_dim=64"):
        write_model(tmp_path / "x.gguf", n_rot=66)
    with pytest.raises(ValueError, match=r"sliding_window must be 0 \(none\) or positive, got -1"):
        write_model(tmp_path / "x.gguf", sliding_window=-1)
    with pytest.raises(ValueError, match="unknown preset 'phi5'; choose one of phi3-mini, "):
        write_model(tmp_path / "x.gguf", preset="phi5")
    with pytest.raises(ValueError, match="name 'my phi3 test': llama.cpp gives a file whose name holds 'phi3'"):
        write_model(tmp_path / "x.gguf", preset="phi4", name="my phi3 test")
    with pytest.raises(ValueError, match="does not exist"):  # the path, before any vocabulary is made
        write_model(tmp_path / "missing" / "x.gguf", preset="phi4-mini")
    assert not list(tmp_path.iterdir()), "a failed write leaves no file behind"


def test_presets_have_the_family_shapes():
    mini, medium, phi35, phi4, phi4_mini = (PRESETS[p]["full"] for p in ("phi3-mini", "phi3-medium", "phi3.5-mini", "phi4", "phi4-mini"))
    assert (mini.n_embd, mini.n_ff, mini.n_layer, mini.n_head, mini.n_rot) == (3072, 8192, 32, 32, 96)
    assert (medium.n_embd, medium.n_head, medium.n_head_kv, medium.head_dim) == (5120, 40, 10, 128)
    assert phi35.longrope and phi35.n_ctx == 131072 and phi35.rope_orig_ctx == 4096
    assert (phi4.n_layer, phi4.n_embd, phi4.n_ff, phi4.n_head, phi4.n_head_kv, phi4.n_rot) == (40, 5120, 17920, 40, 10, 128)
    assert (phi4.rope_base, phi4.n_ctx, phi4.sliding_window, phi4.tied_embeddings) == (250000.0, 16384, 0, False)
    assert phi4_mini.tied_embeddings and phi4_mini.head_dim == 128 and phi4_mini.n_rot == 96 and phi4_mini.n_head_kv == 8


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_written_file_declares_its_shape_config(preset, tmp_path):
    """ModelShape.config() is what phi3ref reads back from the file write_model writes (the
    tensor layout comes from that one config: Phi3Config.tensor_specs)."""
    import dataclasses

    path = write_model(tmp_path / "m.gguf", preset=preset, quant="Q8_0", seed=1)
    with GGUFFile(path) as gf:
        read = Phi3Config.from_gguf(gf)
        config = preset_shape(preset).config(read.n_vocab)
        config.check_tensors(gf)
    assert dataclasses.replace(read, rope_attn_factor=None) == config
