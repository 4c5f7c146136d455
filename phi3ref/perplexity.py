"""Perplexity and KL divergence, computed as llama.cpp's ``llama-perplexity`` computes them.

The text is tokenized whole (with BOS if the file asks for one) and cut into chunks of
``n_ctx`` tokens (the last partial chunk is dropped); each chunk runs in a fresh context
with its first token replaced by BOS, and only its second half is scored: position i
(from ``n_ctx / 2`` to ``n_ctx - 2``) predicts token i + 1, so that every scored token
has at least half a context before it. Per scored token, ``-log p`` is ggml's
log-softmax: the largest logit in float32, ``sum(expf(logit - max))`` in double, then
``logit - max - log(sum)``. The estimate after each chunk is ``exp(mean nll)``; the final
error is ``ppl * sqrt(var(nll) / (count - 1))``, llama-perplexity's ``PPL = x +/- err``.

llama-perplexity runs several chunks as parallel sequences of one batch, each in a KV
cache of its own (padded to 256 cells); that is a fresh context per chunk here, with
logits asked for only for the scored half (so the last layer's feed-forward and the head
run on those rows, as there): in "ggml" numerics the logits are llama.cpp's, bit for bit,
when llama-perplexity runs without flash attention (``-fa off``).

**KL-divergence base files** (``llama-perplexity --kl-divergence-base FILE`` writes one,
``--kl-divergence`` reads it): ``_logits_``, n_ctx (uint32), n_vocab and n_chunk (int32),
the text's first n_chunk * n_ctx token ids (int32), then for every scored position of every
chunk a record of ``2 * ceil(n_vocab / 2) + 4`` uint16: two float32 (the scale and the
smallest log-probability kept, ``min = max(min logit, max logit - 16)`` below the top),
then each token's log-probability quantized to 16 bits above that minimum.
:func:`write_kld_base` writes them byte for byte as llama-perplexity does from the same
logits (so any llama.cpp build — CUDA, Metal, Vulkan — can be checked against phi3ref);
:func:`read_kld_base` reads them; :func:`kl_statistics` gives what ``--kl-divergence``
reports (mean / median / percentile KL, same top token, RMS Δp, both perplexities).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .ggml import log_sum_exp
from .model import Model
from .sampler import log_softmax
from .tokenizer import Tokenizer

__all__ = [
    "KLBase", "KLBaseWriter", "KLStatistics", "PerplexityResult", "chunk_bos", "chunk_logits", "chunks", "kl_statistics", "perplexity", "read_kld_base",
    "text_tokens", "token_nll", "write_kld_base",
]

_F32 = np.float32
KLD_MAGIC = b"_logits_"


@dataclass
class PerplexityResult:
    """``ppl`` +/- ``ppl_err`` over ``n_chunks`` chunks of ``n_ctx`` tokens (``tokens_scored``
    in all); ``running``: the estimate after each chunk (llama-perplexity's ``[1]x,[2]y``);
    ``nll``: every scored token's negative log-likelihood, chunk after chunk."""

    ppl: float
    ppl_err: float
    n_chunks: int
    n_ctx: int
    tokens_scored: int
    running: list[float] = field(default_factory=list)
    nll: np.ndarray = field(default_factory=lambda: np.empty(0))

    def as_json(self) -> dict:
        """The keys ``phi3ref perplexity --json`` prints."""
        return dict(ppl=self.ppl, ppl_err=self.ppl_err, n_chunks=self.n_chunks, n_ctx=self.n_ctx,
                    tokens_scored=self.tokens_scored, running=self.running)


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """``-log p(target)`` of each row of ``logits`` (m, n_vocab) float32, as
    llama-perplexity's log_softmax computes it: (m,) float64."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"token_nll takes logits (m, n_vocab) and m targets, m >= 1, got {logits.shape} and {targets.shape}")
    if ((targets < 0) | (targets >= logits.shape[1])).any():
        raise ValueError(f"token_nll: a target outside the vocabulary of {logits.shape[1]}")
    top, lse = log_sum_exp(logits)  # the largest logit (float32); log sum expf(logit - top), summed in double
    rows = np.arange(logits.shape[0])
    return -((logits[rows, targets] - top).astype(np.float64) - lse)


def text_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of a text file's content as llama-perplexity tokenizes it (``-f FILE``): one
    trailing newline dropped, BOS as the file says, special-token text left as text."""
    chunk_bos(tokenizer)  # refuses a vocabulary that appends EOS
    if text.endswith("\n"):
        text = text[:-1]
    return tokenizer.encode(text, special=False)


def chunks(tokens: Sequence[int], n_ctx: int, n_chunks: int | None, bos_id: int | None) -> list[list[int]]:
    """The chunks llama-perplexity evaluates: ``n_ctx`` tokens each, at most ``n_chunks``
    (None: every whole chunk), the first token of each replaced by ``bos_id`` (None: the
    file asks for no BOS)."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 4:
        raise ValueError(f"n_ctx must be an integer of at least 4, got {n_ctx!r}")
    if n_chunks is not None and (isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1):
        raise ValueError(f"n_chunks must be a positive integer or None, got {n_chunks!r}")
    tokens = list(tokens)
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"perplexity with a context of {n_ctx} needs at least {2 * n_ctx} tokens; "
                         f"the text tokenizes to only {len(tokens)}")
    count = len(tokens) // n_ctx if n_chunks is None else min(n_chunks, len(tokens) // n_ctx)
    out = []
    for c in range(count):
        chunk = tokens[c * n_ctx : (c + 1) * n_ctx]
        if bos_id is not None:
            chunk[0] = bos_id
        out.append(chunk)
    return out


def chunk_logits(model: Model, pieces: Sequence[Sequence[int]], first: int,
                 progress: Callable[[int, int], None] | None = None) -> Iterator[np.ndarray]:
    """Each chunk's logits of its scored positions, (len - 1 - first, n_vocab): the
    positions ``first`` .. len - 2, each predicting the token after it (llama-perplexity:
    ``first = n_ctx / 2``). ``progress(done, total)`` after each chunk."""
    if pieces and model.n_ctx < len(pieces[0]):
        raise ValueError(f"the model holds {model.n_ctx} positions, fewer than the chunks' {len(pieces[0])} "
                         f"(load it with n_ctx={len(pieces[0])})")
    for i, chunk in enumerate(pieces):
        yield model.logits(chunk, first=first)[:-1]  # the last position predicts nothing in the chunk
        if progress is not None:
            progress(i + 1, len(pieces))


def chunk_bos(tokenizer: Tokenizer) -> int | None:
    """The id llama-perplexity puts first in every chunk (None: the vocabulary asks for no
    BOS); ``ValueError`` for a vocabulary that appends EOS, which llama-perplexity refuses."""
    if tokenizer.add_eos:
        raise ValueError("this vocabulary appends EOS to every text, which llama-perplexity refuses")
    return tokenizer.bos_id if tokenizer.add_bos else None


def perplexity(model: Model, tokens: Sequence[int], n_ctx: int, n_chunks: int | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """llama-perplexity's number for ``tokens`` (the whole text's ids, BOS included as the
    file says) in chunks of ``n_ctx``; ``model`` must hold ``n_ctx`` positions (load it with
    ``n_ctx=n_ctx``, so that LongRoPE picks its factors as llama.cpp does for that
    context). ``progress(chunk, n_chunks, running_ppl)`` is called after each chunk."""
    pieces = chunks(tokens, n_ctx, n_chunks, chunk_bos(model.tokenizer))
    first = n_ctx // 2
    nll: list[np.ndarray] = []
    total = total2 = 0.0
    count = 0
    running = []
    for c, (chunk, logits) in enumerate(zip(pieces, chunk_logits(model, pieces, first))):
        v = token_nll(logits, chunk[first + 1 :])  # position i predicts token i + 1
        nll.append(v)
        total += float(v.sum())
        total2 += float((v * v).sum())
        count += v.size
        running.append(math.exp(total / count))
        if progress is not None:
            progress(c + 1, len(pieces), running[-1])
    mean = total / count
    var = total2 / count - mean * mean
    ppl = math.exp(mean)
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else float("nan")
    return PerplexityResult(ppl, err, len(pieces), n_ctx, count, running, np.concatenate(nll))


# ---- KL-divergence base files ---------------------------------------------------------------


def _record_size(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4  # uint16 per scored position: 2 float32, then the codes, padded even


@dataclass
class KLBase:
    """A KL-divergence base file: the chunks' token ids (n_chunk, n_ctx) as the text
    tokenized (BOS not yet put first), and per scored position its quantized
    log-probabilities: ``records`` (n_chunk, n_ctx - 1 - n_ctx / 2, record size) uint16."""

    n_ctx: int
    n_vocab: int
    tokens: np.ndarray
    records: np.ndarray

    @property
    def n_chunks(self) -> int:
        return self.tokens.shape[0]

    def log_probs(self, chunk: int) -> np.ndarray:
        """The chunk's log-probabilities as llama-perplexity decodes them: (positions, n_vocab) float32."""
        rec = self.records[chunk]
        head = np.ascontiguousarray(rec[:, :4]).view(_F32)  # (positions, 2): scale, min_log_prob
        return head[:, :1] * rec[:, 4 : 4 + self.n_vocab].astype(_F32) + head[:, 1:]


def quantize_log_probs(logits: np.ndarray) -> np.ndarray:
    """llama-perplexity's base records of logits (m, n_vocab): (m, record size) uint16,
    float32 arithmetic as its C code (the log-sum-exp from :func:`phi3ref.ggml.log_sum_exp`)."""
    logits = np.ascontiguousarray(logits, dtype=_F32)
    m, n_vocab = logits.shape
    top, lse64 = log_sum_exp(logits)
    low = np.maximum(logits.min(axis=1), top - _F32(16))
    lse = lse64.astype(_F32)
    min_log_prob = (low - top) - lse
    scale = (top - low) / _F32(65535)
    out = np.zeros((m, _record_size(n_vocab)), dtype=np.uint16)
    out[:, :4] = np.stack([scale, min_log_prob], axis=1).astype(_F32).view(np.uint16)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(scale != 0, _F32(1) / scale, _F32(0)).astype(_F32)
        # nearest_int: float32 + 1.5 * 2^23 rounds to an integer, ties to even
        codes = ((inv[:, None] * (logits - low[:, None])).astype(_F32) + _F32(12582912)) - _F32(12582912)
    codes = np.where((logits > low[:, None]) & (scale[:, None] != 0), codes, 0)
    out[:, 4 : 4 + n_vocab] = codes.astype(np.uint16)
    return out


class KLBaseWriter:
    """Writes a KL-divergence base file as llama-perplexity does, a chunk at a time:
    ``tokens`` the text's ids (its first ``n_chunks * n_ctx`` are stored, as tokenized),
    then :meth:`add` each chunk's logits of its scored positions (:func:`chunk_logits`);
    :meth:`close` checks that every chunk came (else the file is removed)."""

    def __init__(self, path: str | os.PathLike[str], tokens: Sequence[int], n_ctx: int, n_chunks: int, n_vocab: int):
        self.path = Path(path)
        stored = np.asarray(tokens, dtype=np.int32)[: n_chunks * n_ctx]
        if stored.size != n_chunks * n_ctx:
            raise ValueError(f"{n_chunks} chunks of {n_ctx} need {n_chunks * n_ctx} tokens, got {stored.size}")
        self.shape = (n_ctx - 1 - n_ctx // 2, n_vocab)
        self.n_chunks, self.written = n_chunks, 0
        self._file = open(self.path, "wb")
        self._file.write(KLD_MAGIC + np.uint32(n_ctx).tobytes() + np.int32(n_vocab).tobytes() + np.int32(n_chunks).tobytes())
        self._file.write(stored.tobytes())

    def add(self, logits: np.ndarray) -> None:
        if np.shape(logits) != self.shape or self.written >= self.n_chunks:
            self.abort()
            raise ValueError(f"chunk {self.written}: logits of shape {np.shape(logits)}, expected {self.shape} "
                             f"for {self.n_chunks} chunks")
        self._file.write(quantize_log_probs(logits).tobytes())
        self.written += 1

    def passing(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """``blocks``, each written on its way through."""
        for block in blocks:
            self.add(block)
            yield block

    def close(self) -> Path:
        if self.written != self.n_chunks:
            self.abort()
            raise ValueError(f"{self.written} chunks of logits for a base file of {self.n_chunks}")
        self._file.close()
        return self.path

    def abort(self) -> None:
        """Close and remove the partial file (after an error)."""
        self._file.close()
        self.path.unlink(missing_ok=True)


def write_kld_base(path: str | os.PathLike[str], tokens: Sequence[int], n_ctx: int, n_chunks: int, n_vocab: int,
                   logits: Iterable[np.ndarray]) -> Path:
    """Write a KL-divergence base file (:class:`KLBaseWriter`) from each chunk's logits in turn."""
    writer = KLBaseWriter(path, tokens, n_ctx, n_chunks, n_vocab)
    try:
        for block in logits:
            writer.add(block)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def read_kld_base(path: str | os.PathLike[str]) -> KLBase:
    """A KL-divergence base file, checked against its own header (``ValueError`` naming the
    file and what is wrong)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    if data.size < 20 or bytes(data[:8]) != KLD_MAGIC:
        raise ValueError(f"{path}: not a llama-perplexity KL-divergence base file (no '_logits_' header)")
    n_ctx = int(data[8:12].view(np.uint32)[0])
    n_vocab, n_chunk = (int(v) for v in data[12:20].view(np.int32))
    if not 4 <= n_ctx <= 1 << 24 or not 1 <= n_vocab <= 1 << 24 or not 1 <= n_chunk <= 1 << 24:
        raise ValueError(f"{path}: header says n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}")
    scored = n_ctx - 1 - n_ctx // 2
    need = 20 + 4 * n_ctx * n_chunk + 2 * n_chunk * scored * _record_size(n_vocab)
    if data.size != need:
        raise ValueError(f"{path}: {data.size} bytes, but its header (n_ctx {n_ctx}, n_vocab {n_vocab}, "
                         f"{n_chunk} chunks) means {need}")
    end = 20 + 4 * n_ctx * n_chunk
    tokens = np.array(data[20:end].view(np.int32)).reshape(n_chunk, n_ctx)
    if (tokens < 0).any() or (tokens >= n_vocab).any():
        raise ValueError(f"{path}: token ids outside its vocabulary of {n_vocab}")
    records = data[end:].view(np.uint16).reshape(n_chunk, scored, _record_size(n_vocab))
    return KLBase(n_ctx, n_vocab, tokens, records)


# ---- KL statistics ----------------------------------------------------------------------


@dataclass
class KLStatistics:
    """What ``llama-perplexity --kl-divergence`` reports for a model Q against a base, over
    ``count`` scored positions (KL(base || Q) in nats; Δp = p_Q - p_base of the true
    token), plus the largest |Δlogit| and the first position whose top token differs when
    both sides' logits are known."""

    count: int
    kl_mean: float
    kl_mean_err: float
    kl_median: float
    kl_p99: float
    kl_p999: float
    kl_max: float
    top1: float  # share of positions with the same top token ("Same top p")
    rms_dp: float
    ppl_model: float
    ppl_against: float
    max_abs: float | None = None
    first_top1_diff: int | None = None  # index among the scored positions

    def as_json(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        lines = [
            f"positions scored : {self.count}",
            f"PPL(model)       : {self.ppl_model:.6f}",
            f"PPL(against)     : {self.ppl_against:.6f}",
            f"Mean KLD         : {self.kl_mean:.6f} +/- {self.kl_mean_err:.6f}",
            f"Median KLD       : {self.kl_median:.6f}",
            f"99.0% KLD        : {self.kl_p99:.6f}",
            f"99.9% KLD        : {self.kl_p999:.6f}",
            f"Maximum KLD      : {self.kl_max:.6f}",
            f"RMS Δp           : {100 * self.rms_dp:.3f} %",
            f"Same top p       : {100 * self.top1:.3f} %",
        ]
        if self.max_abs is not None:
            lines.append(f"max |Δlogit|     : {self.max_abs:.6g}")
            lines.append("first top-1 diff : " + ("none" if self.first_top1_diff is None else f"scored position {self.first_top1_diff}"))
        return "\n".join(lines)


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    # llama-perplexity's: linear between the two nearest ranks
    p = fraction * (sorted_values.size - 1)
    i = int(p)
    return float((1 - (p - i)) * sorted_values[i] + (p - i) * sorted_values[min(i + 1, sorted_values.size - 1)])


def kl_statistics(blocks: Iterable[tuple[np.ndarray, np.ndarray, Sequence[int], np.ndarray | None]]) -> KLStatistics:
    """KL statistics over ``blocks`` of scored positions, taken one at a time (so that a
    long text needs memory for one chunk): each ``(model_logits, base_log_probs, targets,
    against_logits)`` — the model's logits (m, n_vocab), the base's log-probabilities
    (from a base file, :meth:`KLBase.log_probs`, or the log-softmax of the other side's
    logits), the true next token of each position, and the other side's raw logits where
    known (None: from a base file; for max |Δlogit|). Terms with base log-probability -16
    or less are left out of the KL sum, as llama-perplexity does."""
    kls, nll, nll_base, p_diff, same = [], [], [], [], []
    max_abs, known, first_diff, offset = 0.0, True, None, 0
    for i, (q, base, tok, other) in enumerate(blocks):
        q = np.asarray(q, dtype=np.float64)
        base = np.asarray(base, dtype=np.float64)
        tok = np.asarray(tok, dtype=np.int64)
        if q.ndim != 2 or q.shape != base.shape or tok.shape != (q.shape[0],) or q.shape[0] == 0:
            raise ValueError(f"block {i}: logits {q.shape}, base {base.shape}, targets {tok.shape} do not match "
                             "(or hold no position)")
        log_q = log_softmax(q)
        rows = np.arange(q.shape[0])
        kls.append(np.where(base > -16, np.exp(base) * (base - log_q), 0.0).sum(axis=1))
        nll.append(-log_q[rows, tok])
        nll_base.append(-base[rows, tok])
        p_diff.append(np.exp(log_q[rows, tok]) - np.exp(base[rows, tok]))
        agree = q.argmax(axis=1) == base.argmax(axis=1)
        same.append(agree)
        if other is None:
            known = False
        else:
            max_abs = max(max_abs, float(np.abs(q - np.asarray(other, dtype=np.float64)).max()))
        if first_diff is None and not agree.all():
            first_diff = offset + int(np.argmin(agree))
        offset += q.shape[0]
    if not kls:
        raise ValueError("no positions to compare")
    kl, nll_, nll_base_, dp = (np.concatenate(v) for v in (kls, nll, nll_base, p_diff))
    n = kl.size
    kl_sorted = np.sort(kl)
    err = math.sqrt(max(float(np.mean(kl * kl) - np.mean(kl) ** 2), 0.0) / (n - 1)) if n > 10 else 0.0
    return KLStatistics(
        count=n, kl_mean=float(kl.mean()), kl_mean_err=err,
        kl_median=float(np.median(kl_sorted)), kl_p99=_percentile(kl_sorted, 0.99), kl_p999=_percentile(kl_sorted, 0.999),
        kl_max=float(kl_sorted[-1]), top1=float(np.concatenate(same).mean()), rms_dp=float(math.sqrt(np.mean(dp * dp))),
        ppl_model=math.exp(float(nll_.mean())), ppl_against=math.exp(float(nll_base_.mean())),
        max_abs=max_abs if known else None, first_top1_diff=first_diff,
    )
