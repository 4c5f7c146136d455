"""The tokenizer against the reference vectors of the real Phi-3 tokenizer, and llama.cpp's."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from conftest import DATA
from craft import RawGGUF, gpt2_vocab, kv, kv_str, kv_str_array, rewrite_gguf
from hypothesis import given, settings
from hypothesis import strategies as st
from gguf import GGUFValueType as VT

from phi3ref import GGUFError, GGUFFile
from phi3ref.tokenizer import Tokenizer
from phi3ref.synthetic import vocab_path

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


@pytest.mark.parametrize("preset", ["phi3-mini", "phi4", "phi4-mini"])
def test_model_file_and_vocab_file_agree(tiny_model, preset):
    """A preset's model file tokenizes as the vocabulary file it was written from."""
    from phi3ref.synthetic import preset_vocab

    model_tok, vocab_tok = Tokenizer.from_gguf(tiny_model(preset, "Q4_0")), Tokenizer.from_gguf(preset_vocab(preset))
    assert model_tok.encode(CHAT) == vocab_tok.encode(CHAT) and model_tok.n_vocab == vocab_tok.n_vocab
    assert model_tok.eog_ids == vocab_tok.eog_ids and model_tok.bos_id == vocab_tok.bos_id


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
        kv_str("tokenizer.ggml.pre", "gpt-2"),
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
    invalid = _ids(tok, "<0xE4>", "<0xB8>", "<0x96>", "<0xFF>")  # decoded as the GGUF's vocabulary is
    assert loaded.decode(invalid) == bare.decode(invalid) == "世\ufffd"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")


# -- hostile vocabularies and careless input ------------------------------------------------


def _ids(tok: Tokenizer, *texts: str) -> list[int]:
    return [tok.backend.token_to_id(t) for t in texts]


def test_invalid_bytes_cost_only_themselves(tok):
    """A byte that is not UTF-8 becomes one U+FFFD; the character before it survives."""
    world = _ids(tok, "<0xE4>", "<0xB8>", "<0x96>")
    ff = _ids(tok, "<0xFF>")
    assert tok.decode(world) == "世"
    assert tok.decode(world + ff) == "世\ufffd"
    assert tok.decode(ff + world + ff + _ids(tok, "▁a")) == "\ufffd世\ufffd a"
    assert tok.decode(world[:2]) == "\ufffd"  # an incomplete sequence: one U+FFFD until it completes


@pytest.mark.parametrize(
    "key,spec,message",
    [
        ("tokenizer.ggml.bos_token_id", ("FLOAT32", float("inf")), "should be an integer, but it is float32"),
        ("tokenizer.ggml.eot_token_id", ("ARRAY", [1, 2], "INT32"), "should be an integer, but it is array"),
        ("tokenizer.ggml.eos_token_id", ("UINT32", 32064), "outside the vocabulary of 32064 tokens"),
        ("tokenizer.chat_template", ("UINT32", 7), "should be a string, but it is uint32"),
        ("tokenizer.ggml.model", ("UINT32", 1), "should be a string"),
        ("tokenizer.ggml.add_bos_token", ("UINT32", 2), "should be a bool"),
        ("tokenizer.ggml.tokens", ("ARRAY", list(range(32064)), "INT32"), "should be an array of strings"),
        ("tokenizer.ggml.scores", ("ARRAY", ["0"] * 32064, "STRING"), "should be an array of numbers"),
        ("tokenizer.ggml.token_type", ("ARRAY", [1.0] * 32064, "FLOAT32"), "should be an array of integers"),
    ],
)
def test_metadata_of_the_wrong_type(key, spec, message, tmp_path):
    vt = getattr(VT, spec[0])
    full = (vt, spec[1], getattr(VT, spec[2])) if len(spec) == 3 else (vt, spec[1])
    path = rewrite_gguf(vocab_path(), tmp_path / "lie.gguf", set_kv={key: full})
    with pytest.raises(GGUFError, match=message):
        Tokenizer.from_gguf(path)


def test_gpt2_merges_naming_unknown_tokens(tmp_path):
    """tokenizers raises a bare Exception for these; the file is blamed instead."""
    good = gpt2_vocab(tmp_path / "gpt2.gguf")
    bad = rewrite_gguf(good, tmp_path / "bad.gguf", set_kv={"tokenizer.ggml.merges": (VT.ARRAY, ["Ġ zzzz"], VT.STRING)})
    with pytest.raises(GGUFError, match="merge #0 'Ġ zzzz' in tokenizer.ggml.merges names 'zzzz', which is not in the vocabulary"):
        Tokenizer.from_gguf(bad)
    bad = rewrite_gguf(good, tmp_path / "bad-pre.gguf", set_kv={"tokenizer.ggml.pre": (VT.ARRAY, ["gpt2"], VT.STRING)})
    with pytest.raises(GGUFError, match="'tokenizer.ggml.pre' should be a string, but it is array"):
        Tokenizer.from_gguf(bad)
    # "gpt2" is the tokenizer model's name, not a pre-tokenizer's: llama.cpp refuses it too
    bad = rewrite_gguf(good, tmp_path / "gpt2-pre.gguf", set_kv={"tokenizer.ggml.pre": (VT.STRING, "gpt2")})
    with pytest.raises(GGUFError, match=r"pre-tokenizer 'gpt2' \(tokenizer.ggml.pre\) is not supported \(supported: default, gpt-2, phi-2"):
        Tokenizer.from_gguf(bad)


def test_a_token_text_twice_is_refused(tmp_path):
    """Two ids with one text: encoding maps the text to one of them, and the other once
    decoded to '' (and the vocabulary seemed one token short)."""
    with GGUFFile(vocab_path()) as gf:
        tokens = list(gf.get_array("tokenizer.ggml.tokens"))
    tokens[281] = tokens[280]
    path = rewrite_gguf(vocab_path(), tmp_path / "dup.gguf", set_kv={"tokenizer.ggml.tokens": (VT.ARRAY, tokens, VT.STRING)})
    with pytest.raises(GGUFError, match=f"tokenizer.ggml.tokens holds {tokens[280]!r} twice .ids 280 and 281."):
        Tokenizer.from_gguf(path)
    gpt2 = gpt2_vocab(tmp_path / "gpt2.gguf")
    with GGUFFile(gpt2) as gf:
        tokens = list(gf.get_array("tokenizer.ggml.tokens"))
    tokens[-1] = tokens[-2]
    bad = rewrite_gguf(gpt2, tmp_path / "dup2.gguf", set_kv={"tokenizer.ggml.tokens": (VT.ARRAY, tokens, VT.STRING)})
    with pytest.raises(GGUFError, match="twice"):
        Tokenizer.from_gguf(bad)


@pytest.mark.parametrize("extra,token_type,message", [
    (["x" * 400_000], 1, "token 32064 of tokenizer.ggml.tokens is 400,000 characters long"),
    (["\ua66e" * k for k in range(1, 1025)], 1, "merges of more than 32,000,000 characters"),
    ([f"<|c{i}|>" + "z" * 1000 for i in range(1200)], 3, "control, user-defined and unknown tokens of tokenizer.ggml.tokens hold"),
])
def test_building_a_hostile_vocabulary_is_bounded(extra, token_type, message, tmp_path):
    """A token of a million characters, tokens whose every cut is in the vocabulary (merges
    come from every cut of a SentencePiece token) or megabytes of control tokens once took
    minutes, or gigabytes, or crashed the process in the tokenizers library."""
    with GGUFFile(vocab_path()) as gf:
        tokens, types = list(gf.get_array("tokenizer.ggml.tokens")), list(gf.get_array("tokenizer.ggml.token_type"))
    tokens, types = tokens + extra, [int(t) for t in types] + [token_type] * len(extra)
    path = rewrite_gguf(vocab_path(), tmp_path / "long.gguf", set_kv={
        "tokenizer.ggml.tokens": (VT.ARRAY, tokens, VT.STRING), "tokenizer.ggml.scores": (VT.ARRAY, [0.0] * len(tokens), VT.FLOAT32),
        "tokenizer.ggml.token_type": (VT.ARRAY, types, VT.INT32)})
    start = time.perf_counter()
    with pytest.raises(GGUFError, match=message):
        Tokenizer.from_gguf(path)
    assert time.perf_counter() - start < 10


def test_a_tokenizer_json_of_another_vocabulary_is_refused(tmp_path, tok):
    other = Tokenizer.from_gguf(gpt2_vocab(tmp_path / "gpt2.gguf"))
    other.backend.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="not the vocabulary of the model file"):
        Tokenizer.from_file(tmp_path / "other.json", gguf=vocab_path())


def test_token_types_outside_llama_cpp_s(tmp_path):
    with GGUFFile(vocab_path()) as gf:
        types = [int(t) for t in gf.get_array("tokenizer.ggml.token_type")]
    types[7] = -1  # (a uint64 of 2**64 - 1 reads as -1)
    path = rewrite_gguf(vocab_path(), tmp_path / "types.gguf", set_kv={"tokenizer.ggml.token_type": (VT.ARRAY, types, VT.INT64)})
    with pytest.raises(GGUFError, match=r"tokenizer.ggml.token_type\[7\] = -1 is not a token type \(0 to 6\)"):
        Tokenizer.from_gguf(path)


def test_a_shorter_tokenizer_json_is_padded_with_the_file_s_tokens(tmp_path, tok):
    """Phi-3's tokenizer.json has 32,011 entries for the model's 32,064 rows (the file names
    the rest [PAD32011] ...): every id the model can produce must decode."""
    import json

    full = json.loads(tok.backend.to_str())
    full["added_tokens"] = [t for t in full["added_tokens"] if t["id"] < 32011]
    (tmp_path / "short.json").write_text(json.dumps(full), encoding="utf-8")
    short = Tokenizer.from_file(tmp_path / "short.json", gguf=vocab_path())
    assert short.n_vocab == 32064 and short.decode([32063]) == tok.decode([32063])
    assert short.encode(CHAT) == tok.encode(CHAT)
    with pytest.raises(FileNotFoundError, match="not a regular file, not a tokenizer.json"):
        Tokenizer.from_file("/dev/zero")
    with pytest.raises(TypeError, match="the tokenizer must be the path of a tokenizer.json"):
        Tokenizer.from_file(5)


def test_careless_token_ids(tok):
    for bad, error in ((-1, ValueError), (2**64, ValueError), (32064, ValueError), (1.7, TypeError), ("5", TypeError), (None, TypeError)):
        with pytest.raises(error, match="token"):
            tok.token_text(bad)
        with pytest.raises(error, match="token"):
            tok.is_special(bad)
    assert tok.token_text(np.int64(32010)) == "<|user|>" and tok.is_special(np.uint16(32010))


def test_careless_flags_and_bools(tok):
    with pytest.raises(TypeError, match="integer token ids"):
        tok.decode([True])
    for call, name in ((lambda: tok.decode([1], skip_special="x"), "skip_special"), (lambda: tok.encode("a", add_bos="yes"), "add_bos"),
                       (lambda: tok.encode("a", special=None), "special"), (lambda: tok.decode([1], continuation=1), "continuation")):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            call()


def test_careless_text_and_ids(tok):
    with pytest.raises(ValueError, match="cannot be encoded as UTF-8"):
        tok.encode("hi \ud800 there")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([2**63])
    with pytest.raises(TypeError, match="integer token ids"):
        tok.decode(["a"])


# -- properties -----------------------------------------------------------------------------

# U+2581 is how SentencePiece writes a space: a "▁" in the text becomes a space when decoded,
# in llama.cpp as here, so it cannot come back
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=60)


@settings(max_examples=300, deadline=None)
@given(text=_TEXT)
def test_decode_inverts_encode(tok, text):
    """Any text (no special-token parsing) comes back from its ids exactly."""
    assert tok.decode(tok.encode(text, add_bos=False, special=False)) == text


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 32063), max_size=24), cut=st.integers(0, 24))
def test_decoding_a_prefix_gives_a_prefix(tok, ids, cut):
    """The property streaming rests on: the text of a prefix of ids, less a trailing
    U+FFFD that more bytes may complete, is a prefix of the text of all of them."""
    for skip in (False, True):
        head = tok.decode(ids[:cut], skip_special=skip).rstrip("\ufffd")
        assert tok.decode(ids, skip_special=skip).startswith(head)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=16))
def test_byte_tokens_decode_as_python_does(tok, data):
    """Bytes spelled as <0xNN> tokens decode as Python decodes them with errors="replace"."""
    ids = _ids(tok, *[f"<0x{b:02X}>" for b in data])
    assert tok.decode(ids) == data.decode("utf-8", errors="replace").removeprefix(" ")


def test_pre_tokenizer_names_set_the_split_and_the_bos_default(tmp_path):
    """What each tokenizer.ggml.pre name changes, on a small trained GPT-2-style vocabulary
    (llama.cpp's own behaviour is held in test_crosscheck_tokenizer): "default" splits
    punctuation runs, then GPT-2's pieces, then digits in threes; llama3's names add BOS
    when the file does not say; an empty name is "default"."""
    good = gpt2_vocab(tmp_path / "gpt2.gguf")

    def with_pre(pre: str, drop=()) -> Tokenizer:
        return Tokenizer.from_gguf(rewrite_gguf(good, tmp_path / f"{pre or 'empty'}-{len(drop)}.gguf",
                                                set_kv={"tokenizer.ggml.pre": (VT.STRING, pre)}, drop=drop))

    default, gpt2 = with_pre("default"), with_pre("gpt-2")
    assert default.encode("1234567") == default.encode("123") + default.encode("456") + default.encode("7")
    assert gpt2.encode("1234567") != default.encode("1234567")  # GPT-2 keeps the digits one piece
    assert default.encode("hockey!!(puck)") == sum((default.encode(p) for p in ("hockey", "!!(", "puck", ")")), [])
    assert with_pre("").encode("1234567 (ok)") == default.encode("1234567 (ok)")
    assert with_pre("llama3", drop=("tokenizer.ggml.add_bos_token",)).add_bos
    assert not with_pre("gpt-2", drop=("tokenizer.ggml.add_bos_token",)).add_bos
    assert not with_pre("llama3").add_bos  # the file's own add_bos_token = false wins
