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

The rank files come from a package, never from the network: ``bpe-openai`` (MIT licence)
bundles both encodings; :func:`bundled_ranks` reads its data files without importing its
compiled extension. The vocabularies this module makes serve the tests and are made by
them, not shipped.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

__all__ = ["PHI4", "PHI4_MINI", "SpecialTokens", "bundled_ranks", "byte_alphabet", "read_ranks", "tokens_and_merges", "vocabulary"]

# Token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type)
NORMAL, CONTROL = 1, 3


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
    """The ranks of ``encoding`` ("cl100k_base" or "o200k_base") from the ``bpe-openai``
    package's data files (``pip install phi3ref[crosscheck]``)."""
    from importlib import resources

    if encoding not in ("cl100k_base", "o200k_base"):
        raise ValueError(f"encoding must be 'cl100k_base' or 'o200k_base', got {encoding!r}")
    try:
        data = resources.files("bpe_openai.data")
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the tiktoken ranks come from the bpe-openai package: pip install bpe-openai "
                                  "(or phi3ref[crosscheck])") from None
    with resources.as_file(data / f"{encoding}.tiktoken.gz") as path:
        return read_ranks(path)


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


# Phi-4-mini-style: o200k's 199,998 ranks, then special tokens up to 200,064. The named ids
# are those of the model's tokenizer that its chat template and stop tokens use (and
# tiktoken's own two); the other ids here are placeholders (the model has its tool-calling
# tokens among them), not yet checked against its added tokens — matched only as special
# tokens, they leave ordinary text alone
PHI4_MINI = SpecialTokens(
    n_vocab=200064,
    named={199999: "<|endoftext|>", 200018: "<|endofprompt|>", 200019: "<|assistant|>", 200020: "<|end|>",
           200021: "<|user|>", 200022: "<|system|>", 200023: "<|tool|>"},
    bos="<|endoftext|>",
    eos="<|endoftext|>",
    template=("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"),
    pre="gpt-4o",
)


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
