"""Text <-> token ids, from a GGUF file's own vocabulary or a ``tokenizer.json``.

A ``tokenizers.Tokenizer`` does the work underneath. :meth:`Tokenizer.from_gguf` builds it
from the ``tokenizer.ggml.*`` metadata, as llama.cpp tokenizes:

* ``llama`` (SentencePiece-style, Phi-3 / Phi-3.5): a BPE whose merges are ranked by the
  score of the token they produce (llama.cpp's SPM tokenizer merges the highest-scoring
  pair first), spaces written as U+2581, a U+2581 prepended to every stretch of text
  (the first, and each after a special token, as llama.cpp does), bytes outside the
  vocabulary as ``<0xNN>`` tokens;
* ``gpt2`` (byte-level BPE, Phi-2, Phi-4, Phi-4-mini): the file's merges, split first by
  the regexes of the pre-tokenizer that ``tokenizer.ggml.pre`` names, with its flags
  (:data:`PRE_TOKENIZERS`), bytes mapped to printable characters as GPT-2 does.

Control tokens (``<|user|>``, ``<|end|>``, ...) are single ids when special-token parsing
is on; user-defined tokens always are.
"""

from __future__ import annotations

import json
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

from .checks import flag, integer
from .gguf_file import GGUFError, GGUFFile

__all__ = ["Tokenizer"]

SPACE = "\u2581"  # SentencePiece's visible space

# tokenizer.ggml.token_type (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens llama.cpp treats as end of generation when the vocabulary has them, making them
# control tokens whatever their type says (llama-vocab.cpp)
EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
)

# How llama.cpp splits text before byte-level BPE, for each tokenizer.ggml.pre name a Phi
# family file can carry (llama-vocab.cpp: the name -> type chain, the regexes of each type
# in llm_tokenizer_bpe, and the flags each name sets). Several regexes apply in turn, each
# to the pieces the one before left (unicode.cpp's unicode_regex_split).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# (llama.cpp's own code for this pattern, not a regex engine, splits it, and ends with the
# "\s+" that its regex text leaves out: the text here says what the code does)
_LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's adaptation of o200k's regex: \p{Lu}/\p{Ll} become "a letter but not a-z" /
# "a letter but not A-Z", as its std::regex sees text with every non-ASCII letter collapsed
# into one class — so a non-ASCII letter counts as both cases, and \p{M} marks are not letters
_GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?(?:(?=[\p{L}])(?:[^a-z]))*(?:(?=[\p{L}])(?:[^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|[^\r\n\p{L}\p{N}]?(?:(?=[\p{L}])(?:[^a-z]))+(?:(?=[\p{L}])(?:[^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer type: its regexes (applied in turn), whether a piece that
    is itself a token skips the merges (``ignore_merges``), and whether BOS is added when
    the file has no ``tokenizer.ggml.add_bos_token``."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2 = PreTokenizer((_GPT2_REGEX,))
_LLAMA3 = PreTokenizer((_LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_DBRX = PreTokenizer((_LLAMA3_REGEX,))  # llama3's regex, but its merges always apply
_GPT4O = PreTokenizer((_GPT4O_REGEX,))
PRE_TOKENIZERS = {
    "default": _DEFAULT,  # also a file without tokenizer.ggml.pre
    "gpt-2": _GPT2, "phi-2": _GPT2,  # Phi-2
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3,
    "dbrx": _DBRX, "smaug-bpe": _DBRX,  # Phi-4 (14B) and its reasoning variants: dbrx
    "gpt-4o": _GPT4O,  # Phi-4-mini
}


class Tokenizer:
    """Encode and decode text for one vocabulary.

    ``encode(text)`` adds BOS when the vocabulary asks for it and parses special tokens;
    ``decode(ids)`` is its inverse. ``eog_ids`` are the ids that end a generation.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        eog_ids: Iterable[int],
        add_bos: bool,
        add_eos: bool = False,
        chat_template: str | None = None,
        kind: str = "llama",
    ):
        self.backend = backend
        self.bos_id, self.eos_id = bos_id, eos_id
        self.eog_ids = frozenset(int(i) for i in eog_ids)
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        self.kind = kind
        # per id, the bytes decode() joins, for SentencePiece-style vocabularies (None: the
        # backend decodes)
        self._pieces: list[bytes] | None = _spm_pieces(backend)
        self._special_ids = frozenset(
            backend.token_to_id(t.content) for t in backend.get_added_tokens_decoder().values() if t.special
        )

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | GGUFFile) -> "Tokenizer":
        """Build the tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata (a model file
        or a vocab-only file such as llama.cpp's ``ggml-vocab-*.gguf``)."""
        if isinstance(source, GGUFFile):
            return cls._from_metadata(source)
        with GGUFFile(source) as gf:
            return cls._from_metadata(gf)

    @classmethod
    def _from_metadata(cls, gf: GGUFFile) -> "Tokenizer":
        if "tokenizer.ggml.model" not in gf:
            raise GGUFError(f"{gf.path}: no tokenizer in the file (tokenizer.ggml.model is missing)")
        kind = gf.get_str("tokenizer.ggml.model")
        tokens = _typed_array(gf, "tokenizer.ggml.tokens", "strings")
        if not tokens:
            raise GGUFError(f"{gf.path}: tokenizer.ggml.tokens is empty")
        n = len(tokens)
        first: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if len(t) > MAX_TOKEN_CHARS:
                raise GGUFError(f"{gf.path}: token {i} of tokenizer.ggml.tokens is {len(t):,} characters long; "
                                f"a token has at most {MAX_TOKEN_CHARS}")
            if first.setdefault(t, i) != i:
                # one text, two ids: text would map to one of them and the other could not be decoded
                raise GGUFError(f"{gf.path}: tokenizer.ggml.tokens holds {t!r:.60} twice (ids {first[t]} and {i})")
        types = np.full(n, NORMAL, np.int64)
        if "tokenizer.ggml.token_type" in gf:
            types = np.asarray(_typed_array(gf, "tokenizer.ggml.token_type", "integers"), np.int64)
        if types.shape != (n,):
            raise GGUFError(f"{gf.path}: tokenizer.ggml.token_type has {types.size} entries for {n} tokens")
        if ((types < 0) | (types > BYTE)).any():
            i = int(np.flatnonzero((types < 0) | (types > BYTE))[0])
            raise GGUFError(f"{gf.path}: tokenizer.ggml.token_type[{i}] = {types[i]} is not a token type (0 to {BYTE})")
        types = types.copy()
        eog_texts = [i for i, t in enumerate(tokens) if t in EOG_TEXTS]
        types[eog_texts] = CONTROL
        # special tokens are matched in text by an automaton whose size grows with their
        # characters (about 75 bytes each)
        special = sum(len(tokens[i]) for i in np.flatnonzero((types == CONTROL) | (types == USER_DEFINED) | (types == UNKNOWN)))
        if special > MAX_SPECIAL_CHARS:
            raise GGUFError(f"{gf.path}: the control, user-defined and unknown tokens of tokenizer.ggml.tokens hold "
                            f"{special:,} characters, more than the {MAX_SPECIAL_CHARS:,} a vocabulary is allowed")
        pre = None  # a gpt2 vocabulary's PreTokenizer
        if kind == "llama":
            scores = np.asarray(_typed_array(gf, "tokenizer.ggml.scores", "numbers"), dtype=np.float64)
            if scores.shape != (n,):
                raise GGUFError(f"{gf.path}: tokenizer.ggml.scores has {scores.size} entries for {n} tokens")
            backend = _backend(gf, _spm_backend, tokens, scores, types)
        elif kind == "gpt2":
            merges = _typed_array(gf, "tokenizer.ggml.merges", "strings")
            pre_name = gf.get_str("tokenizer.ggml.pre", "default") or "default"  # llama.cpp reads "" as missing
            if pre_name not in PRE_TOKENIZERS:
                raise GGUFError(
                    f"{gf.path}: pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported "
                    f"(supported: {', '.join(PRE_TOKENIZERS)})"
                )
            pre = PRE_TOKENIZERS[pre_name]
            backend = _backend(gf, _bpe_backend, tokens, merges, pre)
        else:
            raise GGUFError(f"{gf.path}: tokenizer model {kind!r} is not supported (phi3ref reads 'llama' and 'gpt2')")
        # llama.cpp strips the whitespace after Phi-3's special tokens (all but <unk>, <s>
        # and <|endoftext|>), for files whose general.name says phi-3 (llama-vocab.cpp)
        name = str(gf.get("general.name", "")).lower()
        rstrip = {"</s>"} if any(k in name for k in ("phi-3", "phi3")) else set()
        if rstrip:
            rstrip |= {tokens[i] for i in np.flatnonzero((types == CONTROL) | (types == USER_DEFINED) | (types == UNKNOWN))}
            rstrip -= {"<unk>", "<s>", "<|endoftext|>"}
        _add_special_tokens(backend, tokens, types, rstrip)

        def token_id(key: str) -> int | None:
            if key not in gf:
                return None
            value = gf.get_int(key)
            if not 0 <= value < n:
                raise GGUFError(f"{gf.path}: {key} = {value} is outside the vocabulary of {n} tokens")
            return int(value)

        bos, eos = token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id")
        eog = {i for i in (eos, token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id")) if i is not None}
        eog |= set(eog_texts)
        return cls(
            backend,
            bos_id=bos,
            eos_id=eos,
            eog_ids=eog,
            add_bos=gf.get_bool("tokenizer.ggml.add_bos_token", kind == "llama" or (pre is not None and pre.add_bos)),
            add_eos=gf.get_bool("tokenizer.ggml.add_eos_token", False),
            chat_template=gf.get_str("tokenizer.chat_template", None),
            kind=kind,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, gguf: str | os.PathLike[str] | GGUFFile | None = None) -> "Tokenizer":
        """Load a Hugging Face ``tokenizer.json``. Special ids, BOS policy and the chat
        template come from ``gguf`` when given (the model file), else from the JSON's
        added tokens."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"the tokenizer must be the path of a tokenizer.json, got {path!r:.60}")
        path = Path(path)
        if not path.is_file():  # (a folder, a device or a pipe would be read forever)
            raise FileNotFoundError(f"{path}: {'no such file' if not path.exists() else 'not a regular file'}, not a tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a tokenizer.json ({e})") from None
        if gguf is not None:
            ref = cls.from_gguf(gguf)
            # the same vocabulary: ids the file's tokens share with the JSON's spell alike
            # (its added tokens past them aside)
            n = min(ref.n_vocab, backend.get_vocab_size(with_added_tokens=True))
            differ = [i for i in range(n) if backend.id_to_token(i) not in (None, ref.token_text(i))]
            if len(differ) > n // 100:
                i = differ[0]
                raise ValueError(f"{path}: not the vocabulary of the model file ({len(differ)} of {n} tokens differ; "
                                 f"token {i} is {backend.id_to_token(i)!r} there, {ref.token_text(i)!r} in the file)")
            if n < ref.n_vocab:
                # the model's rows past the JSON's tokens (Phi-3: 32,064 rows, 32,011 entries;
                # the file names the rest [PAD32011] ...): added as the file names them, so that
                # every id the model can produce decodes
                backend.add_tokens([AddedToken(ref.token_text(i), special=True, normalized=False) for i in range(n, ref.n_vocab)])
                wrong = [i for i in range(n, ref.n_vocab) if backend.token_to_id(ref.token_text(i)) != i]
                if wrong:
                    raise ValueError(f"{path}: the model file's token {wrong[0]} ({ref.token_text(wrong[0])!r}) cannot be added "
                                     f"after the {n} tokens of the JSON at its own id")
            return cls(backend, bos_id=ref.bos_id, eos_id=ref.eos_id, eog_ids=ref.eog_ids, add_bos=ref.add_bos,
                       add_eos=ref.add_eos, chat_template=ref.chat_template, kind=ref.kind)
        added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        bos = added.get("<s>", added.get("<|begin_of_text|>"))
        eos = added.get("<|endoftext|>", added.get("</s>"))
        eog = {i for text, i in added.items() if text in EOG_TEXTS}
        return cls(backend, bos_id=bos, eos_id=eos, eog_ids=eog, add_bos=False, kind="json")

    # -- use ---------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        if self._pieces is not None:
            return len(self._pieces)
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_bos=None`` follows the vocabulary's metadata;
        ``special=False`` reads control-token texts such as ``<|user|>`` as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if add_bos is not None:
            flag("add_bos", add_bos)
        flag("special", special)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text cannot be encoded as UTF-8 ({e.reason} at index {e.start}: {text[e.start]!r})") from None
        self.backend.encode_special_tokens = not special
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if self.add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False, continuation: bool = False) -> str:
        """The text of ``ids`` (control tokens dropped with ``skip_special``). A SentencePiece
        vocabulary's text loses the space its encoding prefixes, unless ``continuation``: the
        ids follow other text (a completion of a raw prompt), and keep it, as llama.cpp's
        token pieces do. Bytes that are
        not valid UTF-8 become U+FFFD, one per maximal invalid sequence (the Unicode
        Standard's practice, as Python's ``errors="replace"``), and valid neighbours are kept:
        the text of a prefix of ``ids`` is a prefix of the text of ``ids``, up to a trailing
        U+FFFD that more bytes may complete."""
        flag("skip_special", skip_special)
        flag("continuation", continuation)
        try:
            ids = [operator.index(i) if not isinstance(i, (bool, np.bool_)) else None for i in ids]
            if None in ids:
                raise TypeError
        except TypeError:
            raise TypeError(f"decode() takes a sequence of integer token ids, got {ids!r:.80}") from None
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        if self._pieces is None:
            return self.backend.decode(ids, skip_special_tokens=skip_special)
        # SentencePiece vocabulary: each token's bytes (U+2581 as a space, <0xNN> as the
        # byte), joined and decoded once, so a character split over byte tokens survives
        # and an invalid byte costs only itself; the space prefixed at encoding is removed.
        skip = self._special_ids if skip_special else frozenset()
        text = b"".join(self._pieces[i] for i in ids if i not in skip).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") and not continuation else text

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of one id (as stored, e.g. '▁Hello' or '<0x0A>')."""
        i = self._id(token_id)
        text = self.backend.id_to_token(i)
        if text is None:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{self.n_vocab - 1})")
        return text

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a control token (``<|user|>``, ``<s>``, ...)."""
        return self._id(token_id) in self._special_ids

    def _id(self, token_id: object) -> int:
        i = integer("token_id", token_id)
        if not 0 <= i < self.n_vocab:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{self.n_vocab - 1})")
        return i

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind!r}, {self.n_vocab} tokens, bos={self.bos_id}, eog={sorted(self.eog_ids)})"


# ======================================================================================
# building the backends
# ======================================================================================


_INTEGERS = {f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)}
_ITEM_TYPES = {"strings": {"string"}, "integers": _INTEGERS, "numbers": _INTEGERS | {"float32", "float64"}}


def _typed_array(gf: GGUFFile, key: str, what: str) -> list | np.ndarray:
    """The array ``key``, refused (``GGUFError``) unless its items are ``what``: "strings",
    "integers" or "numbers"."""
    value = gf.get_array(key)
    vtype = gf.value_types[key]
    if vtype[len("array[") : -1] not in _ITEM_TYPES[what]:
        raise GGUFError(f"{gf.path}: metadata key {key!r} should be an array of {what}, but it is {vtype}")
    return value


def _backend(gf: GGUFFile, build, *args) -> tokenizers.Tokenizer:
    """``build(*args)``, with any failure of the tokenizers library (which raises bare
    ``Exception``) reported as the file's fault."""
    try:
        return build(*args)
    except GGUFError as e:
        raise GGUFError(f"{gf.path}: {e}") from None
    except Exception as e:
        raise GGUFError(f"{gf.path}: the vocabulary cannot be built ({e})") from None


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# Bounds of a vocabulary, far above real ones, so that a file's lie cannot make building
# take minutes or gigabytes: a token of at most MAX_TOKEN_CHARS characters (Phi-3's longest
# has 16); special tokens of MAX_SPECIAL_CHARS in all (Phi-3's: 689); a SentencePiece
# vocabulary's mergeable tokens of MAX_SPM_CHARS in all (Phi-3's: 160,477), whose every cut
# is looked up to derive the merges, and merges of MAX_SPM_MERGE_CHARS in all.
MAX_TOKEN_CHARS = 1024
MAX_SPECIAL_CHARS = 1_000_000
MAX_SPM_CHARS = 4_000_000
MAX_SPM_MERGE_CHARS = 32_000_000  # the merges' texts (Phi-3's: 329,061)


# The decoder chain of SentencePiece-style vocabularies: the one _spm_backend builds, and
# that of Hugging Face's Llama / Phi-3 tokenizer.json
_SPM_DECODER = [
    {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
]


def _spm_pieces(backend: tokenizers.Tokenizer) -> list[bytes] | None:
    """The bytes each token decodes to, when ``backend`` decodes with the SentencePiece
    chain (else None): ``<0xNN>`` the byte NN, anything else its UTF-8 with U+2581 as a
    space, as tokenizers' Replace and ByteFallback decoders do. decode() joins them before
    decoding UTF-8 once, where ByteFallback turns a whole run of byte tokens into U+FFFD
    when one of them is invalid."""
    decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    if decoder.get("type") != "Sequence" or decoder.get("decoders") != _SPM_DECODER:
        return None
    pieces = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        t = backend.id_to_token(i) or ""
        m = _BYTE_TOKEN.fullmatch(t)
        pieces.append(bytes([int(m.group(1), 16)]) if m else t.replace(SPACE, " ").encode("utf-8"))
    return pieces


def _spm_backend(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> tokenizers.Tokenizer:
    """llama.cpp's SPM tokenizer as a byte-fallback BPE: every token that splits into two
    vocabulary entries gives a merge, ranked by the merged token's score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = (types == NORMAL) | (types == USER_DEFINED) | (types == UNUSED)
    # every cut of every token is looked up (and its halves copied): bounded, so that a
    # file's token of a million characters cannot make building take minutes
    cuts = sum(len(tokens[i]) for i in np.flatnonzero(mergeable))
    if cuts > MAX_SPM_CHARS:
        raise GGUFError(f"the mergeable tokens of tokenizer.ggml.tokens hold {cuts:,} characters, "
                        f"more than the {MAX_SPM_CHARS:,} a SentencePiece vocabulary is allowed")
    ranked = []
    merged_chars = 0
    for token_id in np.flatnonzero(mergeable):
        token = tokens[token_id]
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, vocab[left], left, right))
                merged_chars += len(token)
        if merged_chars > MAX_SPM_MERGE_CHARS:
            raise GGUFError(f"tokenizer.ggml.tokens make merges of more than {MAX_SPM_MERGE_CHARS:,} characters in all "
                            "(tokens whose every cut is in the vocabulary): not a SentencePiece vocabulary")
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]
    unk = next((tokens[i] for i in np.flatnonzero(types == UNKNOWN) if tokens[i] == "<unk>"), None)
    if unk is None and "<unk>" in vocab:
        unk = "<unk>"
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True, ignore_merges=False)
    backend = tokenizers.Tokenizer(model)
    # llama.cpp writes spaces as U+2581 and prefixes one to every stretch of text, the
    # first and each one that follows a special token
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def _bpe_backend(tokens: list[str], merges: list[str] | None, pre: PreTokenizer) -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE from the file's tokens and merges, split first as
    llama.cpp splits for the file's pre-tokenizer ``pre``."""
    if not merges:
        raise GGUFError("a gpt2 vocabulary needs tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for i, m in enumerate(merges):
        left, sep, right = m.partition(" ")
        if not sep:
            raise GGUFError(f"malformed merge #{i} {m!r} in tokenizer.ggml.merges")
        for part in (left, right, left + right):
            if part not in vocab:
                raise GGUFError(f"merge #{i} {m!r} in tokenizer.ggml.merges names {part!r}, which is not in the vocabulary")
        pairs.append((left, right))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated", invert=False) for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_special_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: np.ndarray, rstrip: set[str]) -> None:
    """Control and unknown-type tokens become special added tokens (matched only while
    parsing specials, as llama.cpp does); user-defined tokens are matched always. Tokens in
    ``rstrip`` swallow the whitespace that follows them."""
    added = []
    for token_id in np.flatnonzero((types == CONTROL) | (types == USER_DEFINED) | (types == UNKNOWN)):
        text = tokens[token_id]
        if text:
            special = bool(types[token_id] != USER_DEFINED)
            added.append(AddedToken(text, special=special, normalized=False, single_word=False, lstrip=False, rstrip=text in rstrip))
    backend.add_tokens(added)
