"""The tokenizer against the reference vectors of the real Phi-3 tokenizer, and llama.cpp's."""

from __future__ import annotations

import struct

import pytest
from conftest import DATA
from craft import RawGGUF, kv, kv_str, kv_str_array
from gguf import GGUFValueType as VT

from phi3ref import GGUFError
from phi3ref.tokenizer import Tokenizer
from phi3ref.testing import vocab_path

CHAT = "<|user|>\nWrite a haiku about ice hockey<|end|>\n<|assistant|>"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(vocab_path())


def reference_vectors() -> list[tuple[str, list[int]]]:
    texts = (DATA / "ggml-vocab-phi-3.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (DATA / "ggml-vocab-phi-3.gguf.out").read_text(encoding="utf-8").split("\n")
    cases = [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids)]
    assert len(cases) >= 46
    return cases


@pytest.mark.parametrize("case", range(46))
def test_reference_vectors(tok, case):
    text, expected = reference_vectors()[case]
    assert tok.encode(text, add_bos=False, special=False) == expected
    assert tok.decode(expected) == text


def test_metadata(tok):
    assert tok.kind == "llama" and tok.n_vocab == 32064
    assert tok.bos_id == 1 and tok.add_bos is True
    assert tok.eog_ids == {2, 32000, 32007}  # </s>, <|endoftext|>, <|end|>
    assert "<|assistant|>" in tok.chat_template


def test_chat_tokens_are_single_ids(tok):
    ids = tok.encode(CHAT)
    # BOS, then <|user|> (whose trailing newline llama.cpp strips for Phi-3 models) ...
    assert ids == [1, 32010, 14350, 263, 447, 18282, 1048, 14890, 18881, 32007, 32001]
    assert tok.is_special(32010) and not tok.is_special(14350)
    plain = tok.encode(CHAT, special=False, add_bos=False)
    assert 32010 not in plain and tok.decode(plain) == CHAT
    assert tok.decode(ids, skip_special=True).strip() == "Write a haiku about ice hockey"


def test_bos_policy(tok):
    assert tok.encode("Hello")[0] == 1
    assert tok.encode("Hello", add_bos=False)[0] != 1
    assert tok.encode("", add_bos=False) == []


def test_byte_fallback_round_trip(tok):
    for text in ["🦙🦙", "日本語のテキスト", "\x00\x01 control", "e\u0301", "tab\there\r\n"]:
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == text


def test_decode_errors(tok):
    with pytest.raises(ValueError, match="token id 99999 is outside the vocabulary"):
        tok.decode([1, 99999])
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_gguf_without_vocabulary(tmp_path):
    path = RawGGUF(kvs=[kv_str("general.architecture", "phi3")]).write(tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="no tokenizer in the file"):
        Tokenizer.from_gguf(path)
    path = RawGGUF(kvs=[kv_str("tokenizer.ggml.model", "rwkv"), kv_str_array("tokenizer.ggml.tokens", ["a"])]).write(tmp_path / "y.gguf")
    with pytest.raises(GGUFError, match="tokenizer model 'rwkv' is not supported"):
        Tokenizer.from_gguf(path)
    bad_bos = RawGGUF(kvs=[
        kv_str("tokenizer.ggml.model", "llama"),
        kv_str_array("tokenizer.ggml.tokens", ["<unk>", "a"]),
        kv("tokenizer.ggml.scores", VT.ARRAY, struct.pack("<IQ", VT.FLOAT32, 2) + struct.pack("<2f", 0, 0)),
        kv("tokenizer.ggml.bos_token_id", VT.UINT32, struct.pack("<I", 7)),
    ]).write(tmp_path / "z.gguf")
    with pytest.raises(GGUFError, match="bos_token_id = 7 is outside the vocabulary of 2 tokens"):
        Tokenizer.from_gguf(bad_bos)


def test_model_file_and_vocab_file_agree(tiny_model, tok):
    model_tok = Tokenizer.from_gguf(tiny_model("phi4-mini", "Q4_0"))
    assert model_tok.encode(CHAT) == tok.encode(CHAT)


def test_gpt2_vocabulary_from_gguf(tmp_path):
    """A GPT-2-style byte-level BPE stored in GGUF (as Phi-4-mini's is) rebuilds into the
    same tokenizer: train one, write its tokens and merges, read them back."""
    import json

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    corpus = ["The quick brown fox jumps over the lazy dog. 1234 numbers!", "Ice hockey haiku: puck on the frozen lake.", "naïve café — résumé 🦙"] * 50
    trained = tokenizers.Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trained.decoder = decoders.ByteLevel()
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    spec = json.loads(trained.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [3 if t == "<|endoftext|>" else 1 for t in tokens]
    path = RawGGUF(kvs=[
        kv_str("tokenizer.ggml.model", "gpt2"),
        kv_str("tokenizer.ggml.pre", "gpt2"),
        kv_str_array("tokenizer.ggml.tokens", tokens),
        kv_str_array("tokenizer.ggml.merges", merges),
        kv("tokenizer.ggml.token_type", VT.ARRAY, struct.pack("<IQ", VT.INT32, len(types)) + struct.pack(f"<{len(types)}i", *types)),
        kv("tokenizer.ggml.eos_token_id", VT.UINT32, struct.pack("<I", tokens.index("<|endoftext|>"))),
        kv("tokenizer.ggml.add_bos_token", VT.BOOL, b"\x00"),
    ]).write(tmp_path / "gpt2.gguf")
    ours = Tokenizer.from_gguf(path)
    assert ours.kind == "gpt2" and ours.eog_ids == {tokens.index("<|endoftext|>")}
    for text in ["The lazy fox's café", "hockey 2024 — puck!!", " leading space", "🦙 unseen 漢字"]:
        assert ours.encode(text) == trained.encode(text).ids
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("a<|endoftext|>b")[1] == tokens.index("<|endoftext|>")


def test_from_tokenizer_json(tmp_path, tok):
    """A tokenizer.json (as the base model's repository has) with the GGUF's special ids."""
    path = tmp_path / "tokenizer.json"
    tok.backend.save(str(path))
    loaded = Tokenizer.from_file(path, gguf=vocab_path())
    assert loaded.encode(CHAT) == tok.encode(CHAT)
    assert loaded.eog_ids == tok.eog_ids and loaded.bos_id == 1
    bare = Tokenizer.from_file(path)
    assert bare.encode(CHAT, add_bos=False) == tok.encode(CHAT, add_bos=False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
