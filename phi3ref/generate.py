"""Text generation: prompt or chat messages in, sampled text out, streamed if asked.

    >>> import phi3ref
    >>> result = phi3ref.generate("Write a haiku about ice hockey", model="model.gguf", seed=42)
    >>> for piece in phi3ref.generate(messages=[...], model=model, stream=True): print(piece, end="")
    >>> phi3ref.generate(tokens=[1, 450, 4799], model=model, temperature=0, logprobs=5).logprobs

A prompt is sent as the user's turn of the file's chat template; ``raw=True`` encodes it as
it is, and ``tokens=`` takes token ids, so that a completion can be held against another
runtime's.

The loop is the tutorial's: encode the prompt, run it through the model in one batched
pass, then sample a token, feed it back, and repeat until an end-of-generation token, a
stop string, ``max_tokens`` or the end of the context.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np

from .chat_template import render_chat
from .checks import flag, integer
from .jit import background_seconds
from .loading import load
from .model import Model
from .sampler import DEFAULT_MAX_TOKENS, DEFAULT_SAMPLING, SamplingParams, log_softmax, sample
from .tokenizer import Tokenizer

__all__ = ["Chat", "GenerationResult", "Timings", "TokenLogprob", "encode_chat", "generate", "get_model"]


@dataclass
class Timings:
    """Where a generation's time went; ``compile_seconds``: compiling (or loading from the
    cache) the model's kernels, kept out of the speeds: on a model's first generation, and
    on the first to decode a token when a helper compiled one token's kernels in the
    background (waiting for them)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    compile_seconds: float = 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else float("nan")

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else float("nan")

    def __str__(self) -> str:
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tokens_per_second:.2f} tok/s; "
            f"generation: {self.generated_tokens} tokens, {self.generation_tokens_per_second:.2f} tok/s"
            + (f"; compile {self.compile_seconds:.1f} s" if self.compile_seconds >= 0.05 else "")
        )


@dataclass
class TokenLogprob:
    """A token's log-probability under the model's own distribution: the log-softmax of the
    logits as the model computed them (in float64), before temperature, repeat penalty and
    filters, so that it can be held against another runtime's. ``top``: the most likely
    tokens at that position, ``(token_id, logprob)`` from the most likely (ties: lower id
    first). ``logprob`` is None for a prompt's first token, which nothing predicts."""

    token: int
    text: str
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class GenerationResult:
    """What :func:`generate` produced. ``finish_reason``: ``"eos"`` (an end-of-generation
    token), ``"stop"`` (a stop string), ``"length"`` (``max_tokens``), ``"context"``, or
    ``"cancelled"`` (a stream closed or left before it ended; ``text`` is then the text of
    the ``tokens`` it holds). ``logprobs``: one :class:`TokenLogprob` per token of
    ``tokens`` (with ``logprobs=N``); ``prompt_logprobs``: one per prompt token (``echo``)."""

    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str
    seed: int
    timings: Timings = field(default_factory=Timings)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    def __str__(self) -> str:
        return self.text


# ======================================================================================
# models by name, loaded once
# ======================================================================================

_MODELS: dict[tuple, Model] = {}


def get_model(model: Model | str | os.PathLike[str] | None = None, **load_args) -> Model:
    """A :class:`Model`, loaded once per (path, options): a Model is returned as is; a path
    or Hub repository id (default: the tutorial's Phi-3-mini q4) is loaded."""
    if isinstance(model, Model):
        return model
    from .hub import DEFAULT_REPO

    key = (str(model or DEFAULT_REPO), tuple(sorted(load_args.items())))
    if key not in _MODELS:
        _MODELS[key] = load(model or DEFAULT_REPO, **load_args)
    return _MODELS[key]


# ======================================================================================
# the generation loop
# ======================================================================================


def _record(tokenizer: Tokenizer, token: int, logp: np.ndarray | None, n_top: int) -> TokenLogprob:
    """The :class:`TokenLogprob` of ``token`` at a position whose log-probabilities are
    ``logp`` (None: nothing predicts it)."""
    text = tokenizer.decode([token], continuation=True)  # its piece as it reads inside a text
    if logp is None:
        return TokenLogprob(token, text, None, [])
    if n_top == 0:
        return TokenLogprob(token, text, float(logp[token]), [])
    # the n_top most likely (cut at a value, so ties at the cut are all candidates), then
    # ordered most likely first, lower ids first among ties
    cut = np.partition(logp, logp.size - n_top)[logp.size - n_top]
    candidates = np.flatnonzero(logp >= cut)
    best = candidates[np.lexsort((candidates, -logp[candidates]))][:n_top]
    return TokenLogprob(token, text, float(logp[token]), [(int(t), float(logp[t])) for t in best])


class _TextStream:
    """Turns a growing list of token ids into text pieces that never split a character:
    the text decoded so far is compared with what was already emitted, and a tail that is
    still an incomplete UTF-8 sequence (decoded as U+FFFD) or could begin a stop string is
    held back."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], continuation: bool = False):
        self.tokenizer = tokenizer
        self.continuation = continuation  # the ids continue a raw prompt: a leading space is part of the text
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text to emit, whether a stop string was hit)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special=True, continuation=self.continuation)
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                return self._emit(len(self.text)), True
        safe = len(self.text)
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                if self.text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        return self._emit(safe), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


def _run(
    model: Model,
    prompt_ids: list[int],
    start_pos: int,
    params: SamplingParams,
    rng: np.random.Generator,
    max_tokens: int,
    stop: Sequence[str],
    result: GenerationResult,
    version: int,
    logprobs: int | None = None,
    echo: bool = False,
    continuation: bool = False,
) -> Iterator[str]:
    """The loop itself; yields text pieces and keeps ``result`` current as it goes (until
    the loop ends, ``finish_reason`` says "cancelled": a stream left early is). ``version``:
    the model's context version that ``start_pos`` was computed from; every pass checks
    that no other caller has moved the context since (``ModelBusyError``). ``logprobs`` /
    ``echo``: as for :func:`generate` (with ``echo`` the prompt pass computes every
    position's logits, and the head's product runs on all of its rows). ``continuation``:
    the prompt is raw text or token ids, which the generated text continues (a leading
    space is kept); a chat reply's text starts at its first character."""
    tokenizer = model.tokenizer
    stream = _TextStream(tokenizer, stop, continuation)
    timings = result.timings
    n_top = logprobs or 0
    result.finish_reason = "cancelled"
    if logprobs is not None:
        result.logprobs = []
    timings.compile_seconds = model.warmup()  # 0 after the model's first pass
    waited = background_seconds()  # for one token's kernels, if a helper compiles them meanwhile: compile time
    t0 = time.perf_counter()
    t1 = None
    try:
        logits = model.forward(prompt_ids[start_pos:], start_pos, expect_version=version, all_logits=echo)
        version += 1
        if echo:
            # prompt token i is predicted by the logits of position i - 1
            logp = log_softmax(logits)
            result.prompt_logprobs = [_record(tokenizer, prompt_ids[0], None, n_top)] + [
                _record(tokenizer, prompt_ids[i], logp[i - 1], n_top) for i in range(1, len(prompt_ids))]
            logits = logits[-1]
        timings.prompt_tokens = len(prompt_ids) - start_pos
        late = background_seconds() - waited  # waited for in the prompt's pass
        timings.compile_seconds += late
        timings.prompt_seconds = time.perf_counter() - t0 - late
        waited += late
        history = list(prompt_ids)
        t1 = time.perf_counter()
        finish = "length"
        for step in range(max_tokens):
            pos = len(prompt_ids) + step  # where the next token will sit
            if pos >= model.n_ctx:
                finish = "context"
                break
            if step > 0:  # feed the previous token back (lazily: none is wasted at the end)
                logits = model.forward([history[-1]], pos - 1, expect_version=version)
                version += 1
            token = sample(logits, params, rng, history)
            history.append(token)
            if token in tokenizer.eog_ids:
                finish = "eos"
                break
            result.tokens.append(token)
            if logprobs is not None:
                result.logprobs.append(_record(tokenizer, token, log_softmax(logits), n_top))
            piece, stopped = stream.push(token)
            result.text = stream.text
            if stopped:
                finish = "stop"
                result.finish_reason = finish  # before the last piece: a stream closed after it has ended
            if piece:
                yield piece
            if stopped:
                break
        piece = stream.flush()
        result.text = stream.text
        result.finish_reason = finish
        if piece:
            yield piece
    finally:  # also when a stream is closed or dropped mid-way (GeneratorExit at a yield)
        if t1 is not None:
            late = background_seconds() - waited  # waited for in the first one-token pass
            timings.compile_seconds += late
            timings.generated_tokens = len(result.tokens)
            timings.generation_seconds = time.perf_counter() - t1 - late


def _prompt_ids(
    tokenizer: Tokenizer, prompt: str | None, messages: Sequence[Mapping[str, str]] | None, system: str | None,
    raw: bool = False, tokens: Sequence[int] | None = None, n_vocab: int | None = None,
) -> list[int]:
    """The prompt's token ids: ``tokens`` as given (checked against ``n_vocab``), ``prompt``
    encoded as it is (``raw``; BOS as the file says), or ``prompt`` / ``messages`` rendered
    with the file's chat template."""
    _check_prompt(prompt, messages, system, raw, tokens)
    if tokens is not None:
        assert n_vocab is not None, "token ids are checked against the model's vocabulary"
        return _checked_ids(tokens, n_vocab)
    if raw:
        return tokenizer.encode(prompt)
    if messages is None:
        # a plain prompt is sent as the user's turn of a chat, as the tutorial does
        messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return encode_chat(tokenizer, messages)


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """``messages`` rendered with the vocabulary's chat template (the Phi-3 format if it has
    none; the assistant's turn opened after the last one) and encoded: the ids a chat
    prompt becomes."""
    bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    text = render_chat(messages, tokenizer.chat_template, bos_token=bos, eos_token=eos)
    # the template writes BOS itself when the model wants one
    return tokenizer.encode(text, add_bos=False if bos and text.startswith(bos) else None)


def _check_prompt(prompt: object, messages: object, system: object, raw: object, tokens: object) -> None:
    """The prompt arguments that need no model, checked before one is loaded."""
    if sum(x is not None for x in (prompt, messages, tokens)) != 1:
        raise ValueError("give one of prompt, messages or tokens")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    flag("raw", raw)
    if raw and prompt is None:
        raise ValueError("raw=True encodes a prompt string as it is; messages and tokens take no raw")
    if system is not None and (raw or tokens is not None):
        raise ValueError("a system message goes through the chat template: give messages or a prompt without raw=True")
    if tokens is not None:
        _check_token_list(tokens)


def _check_token_list(tokens: object) -> None:
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (Sequence, np.ndarray)) or np.ndim(tokens) != 1:
        raise TypeError(f"tokens must be a list of integer token ids, got {type(tokens).__name__}"
                        f"{f' of {np.ndim(tokens)} dimensions' if isinstance(tokens, np.ndarray) else ''}")


def _checked_ids(tokens: object, n_vocab: int) -> list[int]:
    _check_token_list(tokens)
    ids = []
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"tokens must be a list of integer token ids, got {t!r:.40} in it")
        if not 0 <= t < n_vocab:
            raise ValueError(f"token id {int(t)} is outside the vocabulary (0..{n_vocab - 1})")
        ids.append(int(t))
    if not ids:
        raise ValueError("tokens is empty")
    return ids


def _check_logprobs(logprobs: object, echo: object, n_vocab: int | None = None) -> None:
    """``logprobs`` and ``echo``; the bound on ``logprobs`` once the model (``n_vocab``) is known."""
    if logprobs is not None:
        integer("logprobs", logprobs, lo=0)
    if logprobs is not None and n_vocab is not None and logprobs > n_vocab:
        raise ValueError(f"logprobs must be at most the vocabulary's {n_vocab} tokens, got {logprobs!r}")
    flag("echo", echo)


def _check_fits(model: Model, n_prompt: int) -> None:
    if n_prompt == 0:
        raise ValueError("the prompt encodes to no tokens (it is empty, and the vocabulary adds no BOS)")
    if n_prompt >= model.n_ctx:
        raise ValueError(
            f"the prompt is {n_prompt} tokens, which leaves no room in the context of {model.n_ctx} "
            f"(shorten it, or load the model with a larger n_ctx, up to {model.config.n_ctx_train})"
        )


def generate(
    prompt: str | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | None = None,
    model: Model | str | os.PathLike[str] | None = None,
    system: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = DEFAULT_SAMPLING.temperature,
    top_p: float | None = DEFAULT_SAMPLING.top_p,
    top_k: int | None = DEFAULT_SAMPLING.top_k,
    min_p: float | None = DEFAULT_SAMPLING.min_p,
    repeat_penalty: float = DEFAULT_SAMPLING.repeat_penalty,
    repeat_last_n: int = DEFAULT_SAMPLING.repeat_last_n,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stream: bool = False,
    raw: bool = False,
    tokens: Sequence[int] | None = None,
    logprobs: int | None = None,
    echo: bool = False,
) -> GenerationResult | Iterator[str]:
    """Generate a reply to ``prompt`` (sent as a user turn) or to chat ``messages``; or a
    continuation of ``prompt`` encoded as it is (``raw=True``, no template; BOS as the file
    says) or of token ids (``tokens=[...]``).

    ``model``: a loaded :class:`Model`, a local .gguf path or a Hub repository id (default:
    ``microsoft/Phi-3-mini-4k-instruct-gguf``). Sampling defaults are the tutorial's:
    temperature 1.0, repeat penalty 1.2 over the last 64 tokens, a random seed (reported in
    the result so a run can be repeated). Returns a :class:`GenerationResult`; with
    ``stream=True`` an iterator of text pieces whose concatenation is the final text (the
    iterator's ``result`` attribute holds the :class:`GenerationResult`, complete once it
    is done; ``close()`` it, or use it as a context manager, to stop early: the result then
    says "cancelled").

    A continuation of a raw prompt or of token ids keeps the leading space of its first
    token (``"The cat"`` continues with ``" sat"``), as llama.cpp's completions do; a reply
    to a chat turn starts at its first character.

    ``logprobs=N``: ``result.logprobs`` gives each generated token's log-probability under
    the model's unmodified distribution and the N most likely tokens there
    (:class:`TokenLogprob`); ``echo=True``: ``result.prompt_logprobs`` the same for the
    prompt's tokens (the prompt pass then computes every position's logits, as
    llama-cpp-python's ``logits_all`` does).
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
    max_tokens = _check_max_tokens(max_tokens)
    stop = _check_stop(stop)
    seed = _check_seed(seed)
    flag("stream", stream)
    _check_prompt(prompt, messages, system, raw, tokens)
    _check_logprobs(logprobs, echo)
    m = get_model(model)
    _check_logprobs(logprobs, echo, m.config.n_vocab)
    ids = _prompt_ids(m.tokenizer, prompt, messages, system, raw=raw, tokens=tokens, n_vocab=m.config.n_vocab)
    _check_fits(m, len(ids))
    result = GenerationResult(text="", tokens=[], prompt_tokens=ids, finish_reason="cancelled", seed=seed)
    rng = np.random.default_rng(seed)
    extra = dict(logprobs=logprobs, echo=echo, continuation=raw or tokens is not None)
    if stream:
        # A stream may be read in steps, interleaved with other work: it holds no lock,
        # and stops with ModelBusyError if another call moves the model's context.
        m.reset()
        return _Stream(_run(m, ids, 0, params, rng, max_tokens, stop, result, m.cached()[1], **extra), result)
    with m.generation_lock:  # threads generating on one model take turns
        m.reset()
        for _ in _run(m, ids, 0, params, rng, max_tokens, stop, result, m.cached()[1], **extra):
            pass
    return result


def _check_max_tokens(max_tokens: object) -> int:
    return integer("max_tokens", max_tokens, lo=0)


def _check_seed(seed: object) -> int:
    """The seed to use: ``seed``, or a random one when None (reported so a run can be repeated)."""
    return secrets.randbits(63) if seed is None else integer("seed", seed, lo=0)


def _check_stop(stop: object) -> list[str]:
    """``stop`` as a list of strings: one string, or a sequence of them."""
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop must be a string or a list of strings, got {stop!r:.80}")
    return list(stop)


class _Stream:
    """An iterator of text pieces; ``result`` is complete once it is exhausted. ``close()``
    (or leaving a ``with`` block) ends it early: ``result.finish_reason`` is then
    "cancelled" and ``result.text`` the text of the tokens generated so far."""

    def __init__(self, pieces: Iterator[str], result: GenerationResult):
        self._pieces = pieces
        self.result = result

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating; the model's context keeps what was computed."""
        self._pieces.close()

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Chat:
    """A conversation that keeps the model's KV cache between turns: each turn processes
    only the tokens the cache does not hold yet.

        >>> chat = phi3ref.Chat(model, system="You are terse.", temperature=0.7, seed=1)
        >>> chat.send("Write a haiku about ice hockey").text
    """

    def __init__(self, model: Model | str | os.PathLike[str] | None = None, *, system: str | None = None, seed: int | None = None, **sampling):
        # every argument is checked before a model is loaded
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a str, got {type(system).__name__}")
        self.seed = _check_seed(seed)
        self.sampling = {**asdict(DEFAULT_SAMPLING), **sampling}
        self.max_tokens = _check_max_tokens(self.sampling.pop("max_tokens", DEFAULT_MAX_TOKENS))
        self.stop = _check_stop(self.sampling.pop("stop", ()))
        unknown = sorted(set(self.sampling) - set(asdict(DEFAULT_SAMPLING)))
        if unknown:
            raise TypeError(f"Chat() got an unknown sampling parameter {unknown[0]!r}")
        SamplingParams(**self.sampling)  # validate now
        self.rng = np.random.default_rng(self.seed)
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.model = get_model(model)

    def send(self, text: str, *, stream: bool = False) -> GenerationResult | Iterator[str]:
        """Add a user message and generate the assistant's reply; both are kept in
        ``messages`` once the reply is complete (a turn that fails or is interrupted
        leaves the conversation as it was)."""
        if not isinstance(text, str):
            raise TypeError(f"send() takes a str, got {type(text).__name__}")
        turn = [{"role": "user", "content": text}]
        ids = _prompt_ids(self.model.tokenizer, None, self.messages + turn, None)
        _check_fits(self.model, len(ids))
        result = GenerationResult(text="", tokens=[], prompt_tokens=ids, finish_reason="cancelled", seed=self.seed)
        params = SamplingParams(**self.sampling)

        def turn_pieces() -> Iterator[str]:
            cached, version = self.model.cached()
            common = 0  # the prompt's prefix that the cache already holds
            while common < min(len(cached), len(ids) - 1) and cached[common] == ids[common]:
                common += 1
            yield from _run(self.model, ids, common, params, self.rng, self.max_tokens, self.stop, result, version)
            self.messages += [*turn, {"role": "assistant", "content": result.text}]

        if stream:
            return _Stream(turn_pieces(), result)
        with self.model.generation_lock:
            for _ in turn_pieces():
                pass
        return result
