"""Byte-level BPE vocabularies from tiktoken's rank files, laid out as GGUF files store them.

Phi-4 (14B) tokenizes with OpenAI's ``cl100k_base`` encoding and Phi-4-mini with
``o200k_base``, each with the model's own special tokens after the ranks. A tiktoken
encoding is a list of byte strings in merge order — its *ranks* — and writes no merges
down. They are recovered as llama.cpp's converter does for tiktoken vocabularies
(``QwenModel.bpe``): the merge that makes a token is the last step of byte-pair encoding
the token's bytes with the lower ranks only. Tokens are written in GPT-2's alphabet, one
printable character per byte. (Phi-4's GGUF files copy their merges from the model's
``tokenizer.json``; the vocabularies made here tokenize as those do — the tests hold
them to llama.cpp and to tiktoken's own encoder — without being those files.)

The rank files ship with phi3ref (``phi3ref/data/*.tiktoken.gz``, 2.4 MB compressed: copies
of those the ``bpe-openai`` package bundles, MIT licence); nothing comes from the network.
A vocabulary is made from them on first use — about a second for cl100k and two for o200k,
most of it recovering the merges — and kept as a vocabulary-only GGUF file in phi3ref's cache
folder (:func:`vocab_file`): that is what the ``phi4`` and ``phi4-mini`` presets of
:func:`phi3ref.synthetic.write_model` write their tokenizer from.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping

from gguf import GGUFValueType

__all__ = ["ENCODINGS", "PHI4", "PHI4_MINI", "VOCABULARIES", "SpecialTokens", "bundled_ranks", "byte_alphabet", "rank_file", "read_ranks",
           "tokens_and_merges", "vocab_file", "vocabulary", "write_vocab"]

# Token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type)
NORMAL, CONTROL = 1, 3
ENCODINGS = ("cl100k_base", "o200k_base")


def read_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """A tiktoken rank file (``<base64 bytes> <rank>`` per line, blank lines skipped,
    gzip-compressed or not) as ``{bytes: rank}``; ``ValueError`` naming the file (and line)
    unless every line parses, no token comes twice, the ranks are 0..n-1 each once, and the
    256 single bytes are among the tokens."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    ranks: dict[bytes, int] = {}
    lines: dict[bytes, int] = {}
    try:
        with opener(path, "rt", encoding="ascii") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text, rank = line.split()
                    token = base64.b64decode(text, validate=True)
                    ranks[token] = int(rank)
                except (ValueError, binascii.Error):
                    raise ValueError(f"{path}: line {number} is not '<base64 token> <rank>': {line.strip()[:60]!r}") from None
                if token in lines:
                    raise ValueError(f"{path}: line {number} repeats the token of line {lines[token]} ({token!r})")
                lines[token] = number
    except (UnicodeDecodeError, OSError, EOFError) as e:  # not text, not gzip, truncated
        raise ValueError(f"{path}: not a tiktoken rank file ({e})") from None
    _check_ranks(ranks, str(path))
    return ranks


def _check_ranks(ranks: Mapping[bytes, int], where: str) -> None:
    """Ranks 0..n-1, each once, the 256 single bytes among the tokens (``ValueError``)."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{where}: the ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{where}: {len(missing)} single bytes are not tokens (the first: 0x{missing[0]:02x})")


def bundled_ranks(encoding: str) -> dict[bytes, int]:
    """The ranks of ``encoding`` ("cl100k_base" or "o200k_base"), from the copies of
    tiktoken's rank files that phi3ref ships (``phi3ref/data/<encoding>.tiktoken.gz``)."""
    return read_ranks(rank_file(encoding))


def rank_file(encoding: str) -> Path:
    """The bundled rank file of ``encoding`` (gzip-compressed, as bpe-openai 0.1.4 ships it)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    return Path(str(resources.files("phi3ref") / "data" / f"{encoding}.tiktoken.gz"))


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map: printable bytes stand for themselves, the others
    (controls, space, ...) for the characters from U+0100 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, map(chr, printable)))
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return chars


def tokens_and_merges(ranks: Mapping[bytes, int]) -> tuple[list[str], list[str]]:
    """The tokens in rank order and the merges ("left right", in the rank order of what they
    make), both in GPT-2's alphabet. Each merge is the last step of BPE on the token's bytes
    with only the ranks below its own — the pair that BPE on those bytes joins last (llama.cpp's
    converter for tiktoken vocabularies, ``QwenModel.bpe``)."""
    _check_ranks(ranks, "ranks")
    alphabet = byte_alphabet()
    text = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    by_rank = sorted(ranks, key=ranks.__getitem__)
    merges = []
    for token in by_rank:
        if len(token) > 1:
            left, right = _last_merge(token, ranks)
            merges.append(f"{text(left)} {text(right)}")
    return [text(t) for t in by_rank], merges


def _last_merge(token: bytes, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes]:
    """BPE on ``token``'s bytes with the ranks below ``ranks[token]``, until two parts are
    left: the pair whose merge makes the token."""
    limit, parts = ranks[token], [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = None  # (rank, where) of the lowest-ranked adjacent pair
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"the token {token!r} (rank {limit}) is not made by merging two lower-ranked tokens")
    return parts[0], parts[1]


@dataclass(frozen=True)
class SpecialTokens:
    """A model's tokens after the ranks: ``named`` maps an id to its text; every other id up
    to ``n_vocab`` is ``dummy.format(i)``, i counting the dummies from 0. All are control
    tokens (their texts are matched only while parsing special tokens)."""

    n_vocab: int
    named: Mapping[int, str]
    dummy: str = "<|dummy_{}|>"
    bos: str | None = None
    eos: str | None = None
    template: str | None = None
    pre: str = "default"  # tokenizer.ggml.pre


# Phi-4 (14B) and its reasoning variants: cl100k's 100,256 ranks, then 96 special tokens
# (ids as in the model's tokenizer: <|dummy_0|> at 100256, <|endofprompt|> at 100276, the
# other dummies counted up around the named ones), the ChatML-style template with <|im_sep|>
PHI4 = SpecialTokens(
    n_vocab=100352,
    named={100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>", 100260: "<|fim_suffix|>",
           100264: "<|im_start|>", 100265: "<|im_end|>", 100266: "<|im_sep|>", 100276: "<|endofprompt|>"},
    bos="<|endoftext|>",
    eos="<|im_end|>",
    template=("{% for message in messages %}{% if (message['role'] == 'system') %}"
              "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
              "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
              "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"),
    pre="dbrx",
)


# Phi-4-mini: o200k's 199,998 ranks, then special tokens up to 200,064. Named: tiktoken's own
# two and the tokens of the model's chat template and tool calling (ids as in its
# tokenizer); the other ids are placeholders (<|dummy_i|>): the model's file names them as
# its converter does, and as control tokens matched only while parsing special tokens they
# leave the tokenization of ordinary text alone
PHI4_MINI = SpecialTokens(
    n_vocab=200064,
    named={199999: "<|endoftext|>", 200018: "<|endofprompt|>", 200019: "<|assistant|>", 200020: "<|end|>",
           200021: "<|user|>", 200022: "<|system|>", 200023: "<|tool|>", 200024: "<|/tool|>", 200025: "<|tool_call|>",
           200026: "<|/tool_call|>", 200027: "<|tool_response|>", 200028: "<|tag|>"},
    bos="<|endoftext|>",
    eos="<|endoftext|>",
    # Phi-4-mini: a system message may carry the tools' descriptions, between <|tool|> and <|/tool|>
    template=("{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
              "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
              "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"),
    pre="gpt-4o",
)

# the vocabularies of the Phi-4 generation: the rank file each starts from, its special tokens
VOCABULARIES: dict[str, tuple[str, SpecialTokens]] = {"phi4": ("cl100k_base", PHI4), "phi4-mini": ("o200k_base", PHI4_MINI)}


def vocabulary(ranks: Mapping[bytes, int], special: SpecialTokens) -> dict:
    """The ``tokenizer.ggml.*`` metadata of a GGUF file with these ranks and special
    tokens: ``{key: value}``, arrays as lists (tokens, token_type, merges). ``special`` is
    checked (``ValueError``) before the merges are recovered."""
    n = len(ranks)
    ids = list(special.named)
    if not isinstance(special.n_vocab, int) or special.n_vocab < n:
        raise ValueError(f"n_vocab must be an integer of at least the {n} ranks, got {special.n_vocab!r}")
    if any(not isinstance(i, int) or not n <= i < special.n_vocab for i in ids):
        raise ValueError(f"the special tokens' ids must lie from {n} (after the ranks) to n_vocab - 1 = {special.n_vocab - 1}, got {ids}")
    try:
        dummies = [special.dummy.format(k) for k in range(special.n_vocab - n - len(ids))]
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"dummy {special.dummy!r} must be a format string with one {{}} for the dummy's number ({e})") from None
    texts = list(special.named.values()) + dummies
    if len(set(texts)) != len(texts) or len(set(dummies)) != len(dummies):
        raise ValueError("the special tokens' texts (named and dummies) must differ from each other")
    for key, text in (("bos", special.bos), ("eos", special.eos)):
        if text is not None and text not in special.named.values():
            raise ValueError(f"{key} {text!r} is not one of the named special tokens")
    tokens, merges = tokens_and_merges(ranks)
    clash = set(tokens) & set(texts)
    if clash:
        raise ValueError(f"special token texts are also ordinary tokens: {sorted(clash)[:3]}")
    fill = iter(dummies)
    tokens += [special.named[i] if i in special.named else next(fill) for i in range(n, special.n_vocab)]
    types = [NORMAL] * n + [CONTROL] * (special.n_vocab - n)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": special.pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges, "tokenizer.ggml.add_bos_token": False}
    for key, text in (("bos", special.bos), ("eos", special.eos)):
        if text is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = tokens.index(text, n)
    if special.template is not None:
        meta["tokenizer.chat_template"] = special.template
    return meta


# GGUF value types of the tokenizer keys that vocabulary() writes: arrays by key, scalars by
# their Python type
_ARRAY_TYPES = {"tokenizer.ggml.tokens": GGUFValueType.STRING, "tokenizer.ggml.merges": GGUFValueType.STRING,
                "tokenizer.ggml.token_type": GGUFValueType.INT32}
_SCALAR_TYPES = {bool: GGUFValueType.BOOL, int: GGUFValueType.UINT32, str: GGUFValueType.STRING}


def write_vocab(path: str | os.PathLike[str], meta: Mapping[str, object], *, name: str) -> Path:
    """Write ``meta`` (:func:`vocabulary`'s keys) as a vocabulary-only GGUF file of
    architecture ``phi3`` (no tensors, no hyperparameters): what
    :func:`phi3ref.synthetic.write_model` copies a tokenizer from. (A ``name`` holding
    "phi3" or "phi-3" makes llama.cpp treat the special tokens as Phi-3's.) Written to a
    ``.partial`` file of its own renamed at the end, so that a reader — or another writer
    of the same file — never sees half a file."""
    from gguf import GGUFWriter

    from .config import ARCHITECTURE

    path = Path(path)
    for key, value in meta.items():
        if key not in _ARRAY_TYPES and type(value) not in _SCALAR_TYPES:
            raise ValueError(f"{key}: a {type(value).__name__} is not a value write_vocab writes (bool, int, str, or one of the arrays)")
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp_name)
    writer = GGUFWriter(tmp, ARCHITECTURE)
    try:
        writer.add_name(name)
        for key, value in meta.items():
            if key in _ARRAY_TYPES:
                writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=_ARRAY_TYPES[key])
            else:
                writer.add_key_value(key, value, _SCALAR_TYPES[type(value)])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return path


@functools.cache
def _digest(model: str) -> str:
    """The cache name's hash for ``model``: its rank file, its special tokens and this
    module's source — read once per process, not at every model written."""
    encoding, special = VOCABULARIES[model]
    digest = hashlib.sha256(rank_file(encoding).read_bytes())
    digest.update(repr(special).encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def vocab_file(model: str) -> Path:
    """The vocabulary-only GGUF file of ``model`` (a key of :data:`VOCABULARIES`: "phi4",
    "phi4-mini"), made from the bundled ranks on first use (1-3 s) and kept in phi3ref's
    cache folder (:func:`phi3ref.user_cache.cache_root`) under a name hashed from the rank
    file, the special tokens and this module's source (so that an edit of how vocabularies
    are made remakes them); the files of earlier names are removed."""
    from .user_cache import cache_root

    if model not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {model!r}; choose one of {', '.join(VOCABULARIES)}")
    encoding, special = VOCABULARIES[model]
    path = cache_root() / "vocab" / f"{model}-{_digest(model)}.gguf"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_vocab(path, vocabulary(bundled_ranks(encoding), special), name=f"{model} vocabulary ({encoding})")
        except OSError as e:  # not writable, a file in the way, a full disk
            raise OSError(f"cannot write the {model} vocabulary into {path.parent} ({e.strerror or e}); "
                          "set PHI3REF_CACHE to a folder phi3ref may write to") from None
        for stale in path.parent.glob(f"{model}-*.gguf"):  # made by an earlier phi3ref
            if stale != path and re.fullmatch(rf"{re.escape(model)}-[0-9a-f]{{16}}", stale.stem):
                stale.unlink(missing_ok=True)
    return path

