"""phi3ref.tiktoken_vocab: merges recovered from ranks (against a naive BPE), the rank
file reader's errors, Phi-4's special-token layout."""

from __future__ import annotations

import base64
import gzip
from dataclasses import replace

import pytest

from phi3ref import tiktoken_vocab


def _bpe(word: bytes, merges: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Naive BPE: apply the lowest-ranked merge present until none is."""
    parts, rank = [word[i : i + 1] for i in range(len(word))], {m: r for r, m in enumerate(merges)}
    while True:
        pairs = [(rank[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in rank]
        if not pairs:
            return parts
        _, i = min(pairs)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def test_merges_recovered_from_ranks_rebuild_every_token():
    """Ranks made by merges (each token reachable by BPE with the ones before, as training
    makes them): the recovered merges are those merges, and BPE with them turns each
    token's bytes back into that one token."""
    merges = [(b"a", b"b"), (b"c", b"d"), (b"ab", b"cd"), (b" ", b"ab"), (b"ab", b"ab"), (b"abcd", b"ab"), (b" ", b"abcd")]
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in merges:
        ranks[left + right] = len(ranks)
    tokens, recovered = tiktoken_vocab.tokens_and_merges(ranks)
    alphabet = tiktoken_vocab.byte_alphabet()
    assert len(tokens) == len(ranks) and tokens[ord("a")] == "a" and tokens[ord(" ")] == alphabet[32] == "Ġ"
    assert recovered == [" ".join("".join(alphabet[x] for x in part) for part in m) for m in merges]
    for token in ranks:
        assert _bpe(token, merges) == [token]


def test_byte_alphabet_is_gpt2_s():
    from tokenizers import pre_tokenizers

    alphabet = tiktoken_vocab.byte_alphabet()
    assert sorted(alphabet.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())  # the same 256 characters
    assert alphabet[ord("A")] == "A" and alphabet[32] == "Ġ" and alphabet[10] == "Ċ" and alphabet[255] == "ÿ"


def test_rank_files_are_checked(tmp_path):
    def write(name, lines):
        path = tmp_path / name
        path.write_bytes(gzip.compress("".join(lines).encode()))
        return path

    single = [f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)]
    assert len(tiktoken_vocab.read_ranks(write("ok.tiktoken.gz", single))) == 256
    with pytest.raises(ValueError, match=r"bad.tiktoken.gz: line 257 is not '<base64 token> <rank>'"):
        tiktoken_vocab.read_ranks(write("bad.tiktoken.gz", single + ["not base64!\n"]))
    with pytest.raises(ValueError, match=r"the ranks are not 0..256, each once"):
        tiktoken_vocab.read_ranks(write("gap.tiktoken.gz", single + [f"{base64.b64encode(b'ab').decode()} 300\n"]))
    with pytest.raises(ValueError, match=r"1 single bytes are not tokens \(the first: 0x00\)"):
        tiktoken_vocab.read_ranks(write("short.tiktoken.gz", single[1:] + [f"{base64.b64encode(b'ab').decode()} 0\n"]))
    with pytest.raises(ValueError, match=r"dup.tiktoken.gz: line 257 repeats the token of line 1"):
        tiktoken_vocab.read_ranks(write("dup.tiktoken.gz", single + [f"{base64.b64encode(bytes([0])).decode()} 256\n"]))
    assert len(tiktoken_vocab.read_ranks(write("blank.tiktoken.gz", single[:100] + ["\n"] + single[100:]))) == 256
    (tmp_path / "plain.tiktoken.gz").write_text("".join(single))  # not gzip
    with pytest.raises(ValueError, match=r"plain.tiktoken.gz: not a tiktoken rank file"):
        tiktoken_vocab.read_ranks(tmp_path / "plain.tiktoken.gz")
    with pytest.raises(ValueError, match=r"ranks: the ranks are not 0..256, each once"):
        tiktoken_vocab.tokens_and_merges({**{bytes([b]): b for b in range(256)}, b"ab": 300})


def test_phi4_special_tokens_sit_where_phi4_s_do():
    """cl100k's 256 single bytes stand in for its ranks: the layout after them is Phi-4's
    (dummies counted around the named tokens, <|dummy_85|> the padding id 100349)."""
    ranks = {bytes([b]): b for b in range(256)}
    phi4 = tiktoken_vocab.PHI4
    special = replace(phi4, n_vocab=256 + 96, named={k - 100256 + 256: v for k, v in phi4.named.items()})
    meta = tiktoken_vocab.vocabulary(ranks, special)
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[256] == "<|dummy_0|>" and tokens[256 + 1] == "<|endoftext|>" and tokens[256 + 5] == "<|dummy_1|>"
    assert tokens[256 + 100349 - 100256] == "<|dummy_85|>" and tokens[-1] == "<|dummy_87|>" and len(set(tokens)) == len(tokens)
    assert meta["tokenizer.ggml.token_type"][255:258] == [1, 3, 3] and meta["tokenizer.ggml.eos_token_id"] == 256 + 9
    assert meta["tokenizer.ggml.pre"] == "dbrx" and meta["tokenizer.chat_template"] == phi4.template


@pytest.mark.parametrize("change,message", [
    (dict(named={10: "<|x|>"}), "the special tokens' ids must lie from 256"),
    (dict(n_vocab=200), "n_vocab must be an integer of at least the 256 ranks"),
    (dict(dummy="<d>"), "the special tokens' texts .named and dummies. must differ"),
    (dict(dummy="<{x}>"), "dummy '<{x}>' must be a format string with one {}"),
    (dict(named={256: "<a>", 257: "<a>"}), "the special tokens' texts .named and dummies. must differ"),
    (dict(named={256: "a"}), r"special token texts are also ordinary tokens: \['a'\]"),
    (dict(bos="<|nope|>"), "bos '<|nope|>' is not one of the named special tokens"),
])
def test_bad_special_tokens_are_refused(change, message):
    ranks = {bytes([b]): b for b in range(256)}
    base = tiktoken_vocab.SpecialTokens(n_vocab=260, named={256: "<|s|>"})
    with pytest.raises(ValueError, match=message):
        tiktoken_vocab.vocabulary(ranks, replace(base, **change))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # bpe-openai reads its data with importlib's old API
def test_bundled_ranks_are_bpe_openai_s():
    """The rank files phi3ref ships are bpe-openai 0.1.4's, byte for byte (where it is
    installed: the crosscheck extra), and hold each encoding's count of ranks."""
    assert len(tiktoken_vocab.bundled_ranks("cl100k_base")) == 100256
    assert len(tiktoken_vocab.bundled_ranks("o200k_base")) == 199998
    with pytest.raises(ValueError, match="encoding must be one of cl100k_base, o200k_base, got 'p50k_base'"):
        tiktoken_vocab.bundled_ranks("p50k_base")
    with pytest.raises(ValueError, match="encoding must be one of"):
        tiktoken_vocab.rank_file("p50k_base")
    try:
        from importlib import resources

        theirs = resources.files("bpe_openai.data")
    except ModuleNotFoundError:
        pytest.skip("bpe-openai is not installed (pip install phi3ref[crosscheck])")
    for encoding in tiktoken_vocab.ENCODINGS:
        assert tiktoken_vocab.rank_file(encoding).read_bytes() == (theirs / f"{encoding}.tiktoken.gz").read_bytes(), encoding


def test_vocab_file_is_made_once_and_kept(tmp_path, monkeypatch):
    """vocab_file() writes the vocabulary-only GGUF into the cache folder on first use and
    returns the same file after; phi3ref reads Phi-4's tokenizer from it."""
    from phi3ref.gguf_file import GGUFFile
    from phi3ref.tokenizer import Tokenizer

    monkeypatch.setenv("PHI3REF_CACHE", str(tmp_path))
    path = tiktoken_vocab.vocab_file("phi4")
    assert path.parent == tmp_path / "vocab" and path.name.startswith("phi4-") and path.suffix == ".gguf"
    stamp = path.stat().st_mtime_ns
    assert tiktoken_vocab.vocab_file("phi4") == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no partial file is left behind"
    stale = path.with_name("phi4-0123456789abcdef.gguf")  # an earlier phi3ref's: removed when a new one is made
    stale.write_bytes(path.read_bytes())
    path.unlink()
    assert tiktoken_vocab.vocab_file("phi4") == path and not stale.exists()
    with GGUFFile(path) as gf:
        assert gf.get("general.architecture") == "phi3" and "phi3" not in gf.get("general.name").lower()
        assert len(gf.get_array("tokenizer.ggml.merges")) == 100000 and not gf.tensors
    tok = Tokenizer.from_gguf(path)
    assert tok.n_vocab == 100352 and tok.encode("<|im_start|>user<|im_sep|>Hi<|im_end|>", special=True) == [100264, 882, 100266, 13347, 100265]
    with pytest.raises(ValueError, match="tokenizer.ggml.scores: a list is not a value write_vocab writes"):
        tiktoken_vocab.write_vocab(tmp_path / "bad.gguf", {"tokenizer.ggml.scores": [0.0]}, name="bad")
    with pytest.raises(ValueError, match="unknown vocabulary 'phi5'; choose one of phi4, phi4-mini"):
        tiktoken_vocab.vocab_file("phi5")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("PHI3REF_CACHE", str(tmp_path / "a-file"))  # a cache folder that cannot be made
    with pytest.raises(OSError, match="cannot write the phi4-mini vocabulary into .*a-file/vocab .*set PHI3REF_CACHE"):
        tiktoken_vocab.vocab_file("phi4-mini")
