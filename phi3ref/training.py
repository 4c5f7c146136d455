"""Train the demo model: a small Phi-3 that has really learned something.

A model with random weights has attention patterns that are noise, a logit lens that
shows nothing and text that is gibberish; a learner needs one whose insides have
structure. This module trains one on a CPU, from a fixed seed, and exports it with
phi3ref's own writer — the file bundled as ``phi3ref/data/demo.gguf`` (``--model demo``,
``phi3ref.load("demo")``):

* **the architecture** is Phi-3's (a ``phi3`` GGUF: fused q|k|v and gate|up projections,
  RMSNorm, NEOX RoPE, SwiGLU), small (:data:`DEMO_SHAPE`: 4 layers, 128 wide, 4 heads of
  32, a context of 512: 5.2 million parameters, most of them the embedding);
* **the vocabulary and chat template** are the real Phi-3 ones (32,064 tokens), so every
  tool of phi3ref and llama.cpp runs on it;
* **the text** is Python's own documentation, which every Python ships under the PSF
  licence: the help topics of ``pydoc_data.topics`` (what ``help("for")`` prints) and the
  docstrings of the standard library's modules, classes and functions. Each is a chat turn
  (the user asks about it, the assistant answers with the text), so that a chat prompt is
  answered in the documentation's words and ends with ``<|end|>``; one document in
  :data:`Recipe.heldout_every` is held out;
* **a copying task** first, and then beside the text, which grows an induction head (a head
  that finds the previous occurrence of the current token and attends to what followed it:
  Olsson et al., 2022, "In-context learning and induction heads"): rows of a random
  sequence of 4-32 tokens — drawn from the text's most frequent ones — followed by the same
  sequence again, the second copy scored over those tokens (a previous-token head and an
  induction head form within 400 steps of it alone). The recipe's other options —
  text alone first (``lead_steps``), runs placed twice at a random distance
  (``copy_form="runs"``), text rows that repeat their own first part (``repeat_rows``) —
  are those of the search that docs/demo-model.md tells;
* **the training** is transformers' ``Phi3ForCausalLM`` in float32 (torch, from the
  ``crosscheck`` extra): AdamW, a linear warm-up and a cosine decay; the text's loss is the
  full softmax over the 32,064 tokens, the copying rows' over their pool;
* **the export** is :func:`phi3ref.synthetic.write_weights` — the same tensor layout and
  llama.cpp quant mix as every synthetic model (``Q4_K_M``).

    python -m phi3ref.training --out demo.gguf   # train and export (36 minutes on 2 cores)
    python -m phi3ref.training --evaluate demo.gguf     # held-out perplexity beside a unigram baseline

The documents come from the Python that runs the script, so another Python version trains
on slightly different text; torch's CPU kernels may sum in another order on another CPU.
The bundled file records the Python version and the recipe in ``general.description``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import re
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .checks import integer, number
from .generate import encode_chat
from .synthetic import ModelShape, QUANT_MIXES, check_output_path, vocab_path, write_weights
from .tokenizer import Tokenizer

__all__ = ["DEMO_SHAPE", "Document", "Recipe", "check_recipe", "documents", "evaluate", "export", "heldout_text", "split", "train", "unigram_perplexity"]

# The demo model's shape: Phi-3-mini's structure, scaled down so that it trains on a CPU.
# 128 wide: with the "repeat" copying rows an induction head forms within 400 steps at this
# width (4 heads of 32), where 256 wide (4 heads of 64) had not after 800 (docs/demo-model.md,
# "The search for an induction head"). Rows of 128 are too short for the K-quants (blocks of
# 256): the Q4_K_M mix stores those matrices in llama.cpp's fallback types (Q5_0, Q5_1,
# Q8_0), and ffn_down, whose rows are the MLP's 512, in Q4_K and Q6_K. The embeddings are
# tied (as Phi-4-mini's): with a 32,064-token vocabulary the embedding matrix is most of
# the model, and once is enough.
DEMO_SHAPE = ModelShape(n_layer=4, n_embd=128, n_ff=512, n_head=4, n_head_kv=4, n_rot=32, n_ctx=512, sliding_window=None,
                        tied_embeddings=True)


DEMO_NAME = "phi3ref demo (a small Phi-3 trained on Python's documentation)"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (with the Python's documentation)."""

    shape: ModelShape = DEMO_SHAPE
    # phase 0 (off by default): text alone, at text_lr after the warm-up — meant to form a
    # previous-token head first, which an induction head builds on
    lead_steps: int = 0
    # phase 1: the copying task alone — the induction head forms here (steps 200-400)
    copy_steps: int = 400
    copy_batch: int = 64
    copy_len: int = 64  # tokens in a copying row (BOS not counted)
    copy_run: tuple[int, int] = (4, 32)  # the run's length, from .. to
    # the copying rows: "runs" — random tokens, a run of them placed twice at a random
    # distance, its second copy's predictable tokens scored (a few per row); "repeat" — a
    # random sequence of a run's length, then the same sequence again (random tokens after
    # it), the whole second copy but its first token scored
    copy_form: str = "repeat"
    copy_pool: int = 500  # the rows' tokens: the text's most frequent ones
    # the copying rows' softmax: over the whole vocabulary ("vocab"), or over the pool alone
    # ("pool", the bundled model's: which of them comes next is the task; a softmax over the
    # vocabulary also teaches that only the pool's tokens exist, and after a phase of
    # copying alone the text starts far above a fresh model's loss: docs/demo-model.md)
    copy_softmax: str = "pool"
    # phase 2: the text, with the copying task beside it (so that the head stays)
    steps: int = 1400
    batch_size: int = 8  # rows of seq_len tokens of text per step
    seq_len: int = 512
    doc_start_rows: int = 2  # rows that start at a document's beginning (the chat header)
    # rows whose first part (repeat_min .. (seq_len + 1) // 2 tokens) comes again after it: text that
    # repeats, the natural copying task (the second copy costs little once a head copies)
    repeat_rows: int = 0
    repeat_min: int = 16
    text_copy_batch: int = 32
    text_copy_len: int = 64
    lr: float = 2e-3  # phase 1's, after a linear warm-up of warmup_steps
    # phase 2's: from lr up to text_lr in warmup_steps, then a cosine decay to min_lr (at
    # 1e-3 the text loss stalls near 6.5 nats, at 3e-3 it falls below 5 in a few hundred steps)
    text_lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    heldout_every: int = 20  # every 20th document (in a fixed hash order) is held out
    seed: int = 0
    quant: str = "Q4_K_M"
    threads: int = 2


@dataclass(frozen=True)
class Document:
    """One training document: what it is, the user's question, the text that answers it."""

    title: str
    question: str
    text: str


# the standard library's folders that hold no documentation worth learning (tests, demos,
# the IDLE editor and vendored packages)
_SKIP = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages", "__pycache__"}
_MIN_DOCSTRING = 200  # characters: shorter docstrings are mostly one-line summaries

_QUESTIONS = (
    "What does the Python documentation say about {}?",
    "Explain {} in Python.",
    "Tell me about {}.",
    "How does {} work?",
    "help({!r})",
)


def _question(title: str) -> str:
    """A question about ``title``, picked by its hash (independent of any random state)."""
    pick = int(hashlib.sha256(title.encode()).hexdigest(), 16) % len(_QUESTIONS)
    return _QUESTIONS[pick].format(title)


def documents() -> list[Document]:
    """Python's documentation as documents, in a fixed order: the help topics, then the
    docstrings of at least :data:`_MIN_DOCSTRING` characters of every standard-library
    module (and its classes and functions), read with ``ast`` (nothing is imported);
    duplicate texts once."""
    from pydoc_data.topics import topics

    docs = [Document(f"the {key!r} topic", _question(key), topics[key].strip()) for key in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    seen = {d.text for d in docs}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP & set(rel.parts) or rel.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for title, text in _docstrings(tree, module):
            if len(text) >= _MIN_DOCSTRING and text not in seen:
                seen.add(text)
                docs.append(Document(title, _question(title), text))
    return docs


def _docstrings(tree: ast.Module, module: str):
    """(qualified name, docstring) of a module and the classes and functions in it."""
    yield module, ast.get_docstring(tree) or ""
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                yield name, ast.get_docstring(child) or ""
                stack.append((child, name))


def split(docs: Sequence[Document], every: int) -> tuple[list[Document], list[Document]]:
    """(training, held-out) documents: one in ``every``, chosen by a hash of the title, is held out."""
    every = integer("every", every, lo=2)
    held = [int(hashlib.sha256(d.title.encode()).hexdigest(), 16) % every == 0 for d in docs]
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def heldout_text(recipe: Recipe = Recipe(), docs: Sequence[Document] | None = None) -> str:
    """The held-out documents' texts (of ``docs``, by default :func:`documents`), one after
    another (blank lines between): the text the demo model's perplexity is measured on
    (``phi3ref perplexity --text``, llama-perplexity)."""
    docs = documents() if docs is None else docs
    return "\n\n".join(d.text for d in split(docs, recipe.heldout_every)[1]) + "\n"


def chat_ids(tokenizer: Tokenizer, doc: Document) -> list[int]:
    """A document as one chat exchange, rendered with the vocabulary's chat template and
    encoded as ``generate()`` encodes a prompt."""
    return encode_chat(tokenizer, [{"role": "user", "content": doc.question}, {"role": "assistant", "content": doc.text}])


def unigram_perplexity(train_ids: np.ndarray, targets: np.ndarray, n_vocab: int) -> float:
    """The perplexity of ``targets`` under the training text's token frequencies (add-one
    smoothed over the vocabulary): the baseline a model that ignores context reaches."""
    n_vocab = integer("n_vocab", n_vocab, lo=1)
    train_ids, targets = np.asarray(train_ids), np.asarray(targets)
    for name, ids in (("train_ids", train_ids), ("targets", targets)):
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= n_vocab:
            raise ValueError(f"{name} must be a non-empty 1-D array of token ids below n_vocab={n_vocab}")
    counts = np.bincount(train_ids, minlength=n_vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[targets].mean()))


# ---- training ----------------------------------------------------------------------------


class _Batches:
    """Each step's rows: :meth:`text` gives windows of ``seq_len + 1`` tokens of the text
    (some from a document's start; ``repeat_rows`` of them with their first part again
    after it); :meth:`copies` rows of the copying task (``copy_form``) — random tokens
    with one run of them placed twice at a random distance, or a random sequence followed
    by itself — labelled only where the second copy can be predicted from the first (its
    tokens but the first; -100 elsewhere). The distance (the run's length, for "repeat")
    varies from row to row, so a head cannot learn "attend d back": it has to find the
    earlier occurrence of the current token and read what came after it, which is what an
    induction head does."""

    def __init__(self, stream: np.ndarray, starts: np.ndarray, copy_tokens: np.ndarray, bos: int, recipe: Recipe):
        self.stream, self.copy_tokens, self.bos, self.r = stream, copy_tokens, bos, recipe
        self.starts = starts[starts + recipe.seq_len + 1 <= stream.size]
        self.rng = np.random.default_rng(recipe.seed)

    def text(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, labels, repeated)``: ``repeated`` marks the labels that a second copy
        makes predictable (the rows' own first parts told them), for the log."""
        r, n = self.r, self.r.seq_len + 1
        ids = np.empty((r.batch_size, n), np.int64)  # (batch_size, seq_len + 1)
        repeated = np.zeros(ids.shape, bool)
        for row in range(r.batch_size):
            start = int(self.rng.choice(self.starts)) if row < r.doc_start_rows else int(self.rng.integers(0, self.stream.size - n))
            window = self.stream[start : start + n]
            if row >= r.batch_size - r.repeat_rows:  # the window's first `part` tokens, then the window again
                part = int(self.rng.integers(r.repeat_min, n // 2 + 1))
                window = np.concatenate([window[:part], window[: n - part]])
                repeated[row, part + 1 :] = True
            ids[row] = window
        return ids, ids, repeated

    def copies(self, rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.r.copy_run
        ids = np.empty((rows, length + 1), np.int64)  # (rows, length + 1): BOS first
        labels = np.full_like(ids, -100)
        for row in range(rows):
            run = int(self.rng.integers(lo, hi + 1))
            tokens = self.rng.choice(self.copy_tokens, size=length)
            if self.r.copy_form == "repeat":
                first, second = 0, run
            else:
                first = int(self.rng.integers(0, length - 2 * run + 1))
                second = int(self.rng.integers(first + run, length - run + 1))
            tokens[second : second + run] = tokens[first : first + run]
            ids[row] = np.concatenate([[self.bos], tokens])
            labels[row, 2 + second : 1 + second + run] = tokens[second + 1 : second + run]
        return ids, labels


def check_recipe(recipe: Recipe) -> Recipe:
    """``recipe``, refused (``TypeError``/``ValueError`` naming the field) unless every
    field is of its kind and range: checked before an hour of training, not after it."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a phi3ref.training.Recipe, got {type(recipe).__name__}")
    if not isinstance(recipe.shape, ModelShape):
        raise TypeError(f"recipe.shape must be a phi3ref.synthetic.ModelShape, got {type(recipe.shape).__name__}")
    if recipe.copy_softmax not in ("vocab", "pool"):
        raise ValueError(f"recipe.copy_softmax must be 'vocab' or 'pool', got {recipe.copy_softmax!r}")
    if recipe.copy_form not in ("runs", "repeat"):
        raise ValueError(f"recipe.copy_form must be 'runs' or 'repeat', got {recipe.copy_form!r}")
    if recipe.quant not in QUANT_MIXES:
        raise ValueError(f"recipe.quant {recipe.quant!r} is not one of {', '.join(QUANT_MIXES)}")
    for name in ("lead_steps", "copy_steps", "seed"):
        integer(f"recipe.{name}", getattr(recipe, name), lo=0)
    for name in ("copy_batch", "steps", "batch_size", "warmup_steps", "copy_pool", "threads"):
        integer(f"recipe.{name}", getattr(recipe, name), lo=1)
    integer("recipe.heldout_every", recipe.heldout_every, lo=2)
    integer("recipe.seq_len", recipe.seq_len, lo=2, hi=recipe.shape.n_ctx)  # positions past n_ctx would be trained, not used
    integer("recipe.doc_start_rows", recipe.doc_start_rows, lo=0, hi=recipe.batch_size)
    integer("recipe.repeat_rows", recipe.repeat_rows, lo=0, hi=recipe.batch_size)
    integer("recipe.repeat_min", recipe.repeat_min, lo=1, hi=(recipe.seq_len + 1) // 2)
    integer("recipe.text_copy_batch", recipe.text_copy_batch, lo=0)
    lo, hi = (integer("recipe.copy_run[0]", recipe.copy_run[0], lo=2), integer("recipe.copy_run[1]", recipe.copy_run[1], lo=2))
    if lo > hi:
        raise ValueError(f"recipe.copy_run must be (shortest, longest), got {recipe.copy_run}")
    for name in ("copy_len", "text_copy_len"):  # room for the longest run twice
        integer(f"recipe.{name}", getattr(recipe, name), lo=2 * hi, hi=recipe.shape.n_ctx - 1)
    for name in ("lr", "text_lr", "min_lr", "weight_decay", "grad_clip"):
        if number(f"recipe.{name}", getattr(recipe, name)) < 0:
            raise ValueError(f"recipe.{name} must not be negative, got {getattr(recipe, name)}")
    return recipe


def train(recipe: Recipe, out: str | Path, *, log: Callable[[str], None] = print) -> dict:
    """Train a model by ``recipe`` and write it to ``out`` (and an F32 copy beside it, the
    suffix ``.f32.gguf`` in place of ``out``'s, when ``recipe.quant`` is not F32); return a
    report (losses, times, held-out loss, the recipe). Torch's global settings (threads,
    deterministic algorithms) are set for the training and put back after it."""
    check_recipe(recipe)
    out = check_output_path(out)
    check_output_path(out.with_suffix(".f32.gguf"))
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(recipe, out, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(recipe: Recipe, out: Path, log: Callable[[str], None]) -> dict:
    import torch
    import transformers

    from .crosscheck import transformers_config

    start_time = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = Tokenizer.from_gguf(vocab_path())
    train_docs, held_docs = split(documents(), recipe.heldout_every)
    encoded = [chat_ids(tokenizer, d) for d in train_docs]
    stream = np.concatenate([np.asarray(e, np.int64) for e in encoded])
    starts = np.cumsum([0] + [len(e) for e in encoded[:-1]])
    if not held_docs or not train_docs:
        raise ValueError(f"one document in {recipe.heldout_every} held out leaves {len(train_docs)} to train on and {len(held_docs)} to hold out")
    heldout = np.concatenate([np.asarray(chat_ids(tokenizer, d), np.int64) for d in held_docs])
    if heldout.size < recipe.seq_len + 1 or stream.size < recipe.seq_len + 1:
        raise ValueError(f"the text ({stream.size} tokens, {heldout.size} held out) is shorter than recipe.seq_len + 1 = {recipe.seq_len + 1}")
    # the copying task draws from the most frequent tokens of the text (so that the heads it
    # forms meet embeddings that the text trains too)
    freq = np.bincount(stream, minlength=tokenizer.n_vocab)
    copy_tokens = np.argsort(-freq, kind="stable")[: recipe.copy_pool]
    copy_tokens = copy_tokens[[not tokenizer.is_special(int(t)) for t in copy_tokens]]
    log(f"{len(train_docs)} training documents ({stream.size:,} tokens), {len(held_docs)} held out ({heldout.size:,} tokens)")

    config = recipe.shape.config(tokenizer.n_vocab)
    model = transformers.Phi3ForCausalLM(_training_config(transformers_config(config)))
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=recipe.lr, betas=(0.9, 0.95))
    batches = _Batches(stream, starts, copy_tokens, tokenizer.bos_id, recipe)
    losses = []  # (text, copying, repeated text) per step

    pool = torch.from_numpy(np.sort(copy_tokens)) if recipe.copy_softmax == "pool" else None

    def token_losses(ids: np.ndarray, labels: np.ndarray, among: torch.Tensor | None = None):
        """Cross-entropy at each labelled position (the head runs only there: a copying row
        has a few) over the whole vocabulary, or over the tokens ``among`` (sorted ids: the
        copying task's pool — which of them comes next is the task; how likely any token
        is, is the text's to teach), and where those positions are."""
        hidden = model.model(torch.from_numpy(ids[:, :-1])).last_hidden_state  # (rows, length, n_embd), normed
        targets = torch.from_numpy(labels[:, 1:])
        scored = targets != -100
        targets = targets[scored]
        if among is None:
            logits = model.lm_head(hidden[scored])  # (scored, n_vocab)
        else:
            logits = hidden[scored] @ model.lm_head.weight[among].T  # (scored, pool)
            targets = torch.searchsorted(among, targets)
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none"), scored.numpy()

    def loss_of(ids: np.ndarray, labels: np.ndarray, among: torch.Tensor | None = None):
        return token_losses(ids, labels, among)[0].mean()

    def step_with(loss, lr: float, decay: bool) -> None:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.param_groups[0]["weight_decay"] = recipe.weight_decay if decay else 0.0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()

    for step in range(recipe.lead_steps):  # phase 0: text alone (previous-token heads form)
        loss = loss_of(*batches.text()[:2])
        step_with(loss, recipe.text_lr * min(1.0, (step + 1) / recipe.warmup_steps), decay=True)
        losses.append((loss.item(), float("nan"), float("nan")))
        if step % 50 == 0 or step == recipe.lead_steps - 1:
            log(f"lead text step {step:5d}  loss {np.mean([t for t, _, _ in losses[-min(50, step + 1):]]):.3f}  {time.perf_counter() - start_time:7.1f} s")
    for step in range(recipe.copy_steps):  # phase 1: copying
        loss = loss_of(*batches.copies(recipe.copy_batch, recipe.copy_len), pool)
        step_with(loss, recipe.lr * min(1.0, (step + 1) / recipe.warmup_steps), decay=False)
        losses.append((float("nan"), loss.item(), float("nan")))
        if step % 100 == 0 or step == recipe.copy_steps - 1:
            log(f"copying step {step:5d}  loss {np.mean([c for _, c, _ in losses[-min(100, step + 1):]]):.3f}  {time.perf_counter() - start_time:7.1f} s")
    for step in range(recipe.steps):  # phase 2: text, and copying beside it
        ids, labels, repeated = batches.text()
        per_token, scored = token_losses(ids, labels)
        repeated = torch.from_numpy(repeated[:, 1:][scored])  # (scored,): which losses a second copy made predictable
        loss = per_token.mean()
        if recipe.text_copy_batch:
            copy_loss = loss_of(*batches.copies(recipe.text_copy_batch, recipe.text_copy_len), pool)
            loss = loss + copy_loss
        step_with(loss, _learning_rate(step, recipe), decay=True)
        losses.append((per_token[~repeated].mean().item(), copy_loss.item() if recipe.text_copy_batch else float("nan"),
                       per_token[repeated].mean().item() if recipe.repeat_rows else float("nan")))
        if step % 50 == 0 or step == recipe.steps - 1:
            text, copying, second = np.mean(losses[-min(50, step + 1):], axis=0)
            log(f"text step {step:5d}  text loss {text:.3f}" + (f"  repeated text {second:.3f}" if recipe.repeat_rows else "")
                + (f"  copying loss {copying:.3f}" if recipe.text_copy_batch else "") + f"  {time.perf_counter() - start_time:7.1f} s")
    model.eval()
    with torch.no_grad():  # held-out loss, in windows of seq_len, a batch at a time
        n = recipe.seq_len + 1
        rows = np.stack([heldout[s : s + n] for s in range(0, heldout.size - n + 1, n)])  # (windows, seq_len + 1)
        batches = [rows[b : b + recipe.batch_size] for b in range(0, len(rows), recipe.batch_size)]
        heldout_loss = float(np.average([loss_of(b, b).item() for b in batches], weights=[len(b) for b in batches]))
    train_seconds = time.perf_counter() - start_time
    log(f"held-out loss {heldout_loss:.3f} (perplexity {math.exp(heldout_loss):.2f}) after {train_seconds:.0f} s")

    description = (f"phi3ref's demo model: trained by phi3ref.training on Python {sys.version.split()[0]}'s documentation "
                   f"(pydoc topics and standard-library docstrings, PSF licence) and a copying task; recipe "
                   f"{json.dumps(asdict(recipe))}")
    written = [export(model, recipe.shape, out, quant=recipe.quant, name=DEMO_NAME, description=description)]
    if recipe.quant != "F32":
        written.append(export(model, recipe.shape, out.with_suffix(".f32.gguf"), quant="F32", name=DEMO_NAME, description=description))
    last = [float(np.mean(column[~np.isnan(column)])) if (~np.isnan(column)).any() else None  # the last 50 steps' means
            for column in np.asarray(losses[-50:]).T]  # (3, steps): text, copying, repeated text
    return dict(
        recipe=asdict(recipe), python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__,
        train_documents=len(train_docs), train_tokens=int(stream.size), heldout_documents=len(held_docs),
        heldout_tokens=int(heldout.size), final_loss=last[0], final_copying_loss=last[1], final_repeated_loss=last[2], heldout_loss=heldout_loss,
        train_seconds=round(train_seconds, 1), files=[str(p) for p in written],
    )


def export(model, shape: ModelShape, out: str | Path, *, quant: str, name: str, description: str | None = None) -> Path:
    """Write transformers' ``Phi3ForCausalLM`` ``model`` (of ``shape``, the bundled Phi-3
    vocabulary) as a ``phi3`` GGUF at ``out``, its matrices stored in ``quant``'s types."""
    config = shape.config(model.config.vocab_size)
    state = model.state_dict()
    weights = {gguf: state[hf].detach().float().numpy() for hf, gguf in config.transformers_names().items()}
    return write_weights(out, shape, weights, quant=quant, name=name, description=description)


def _training_config(hf_config):
    """transformers' config of the model, set up for training (torch's fused attention)."""
    hf_config._attn_implementation = "sdpa"
    return hf_config


def _learning_rate(step: int, r: Recipe) -> float:
    """Phase 2's learning rate at ``step``: from phase 1's ``lr`` up to ``text_lr`` over
    ``warmup_steps``, then a cosine decay to ``min_lr`` at the last step."""
    if step < r.warmup_steps:
        return r.lr + (r.text_lr - r.lr) * (step + 1) / r.warmup_steps
    decayed = (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps)
    return r.min_lr + 0.5 * (r.text_lr - r.min_lr) * (1 + math.cos(math.pi * decayed))


# ---- evaluation -------------------------------------------------------------------------------


def evaluate(path: str | Path, *, n_ctx: int = 512, recipe: Recipe = Recipe(), numerics: str = "ggml",
             llama_perplexity: str | Path | None = None) -> dict:
    """The held-out perplexity of the model at ``path`` as llama-perplexity computes it
    (chunks of ``n_ctx``, their second halves scored) beside the unigram baseline on the
    same scored tokens (the training text's token frequencies); with ``llama_perplexity``
    (the tool's path: :func:`phi3ref.llama_builds.build_tool`), the tool's own estimate of
    the same text (``-fa off``, the attention phi3ref follows)."""
    import subprocess
    import tempfile

    from .loading import load
    from .perplexity import chunk_bos, chunks, perplexity, text_tokens

    model = load(path, numerics=numerics, n_ctx=n_ctx)
    tokenizer = model.tokenizer
    docs = documents()  # (parses the standard library: once)
    text = heldout_text(recipe, docs)
    ids = text_tokens(tokenizer, text)
    result = perplexity(model, ids, n_ctx)
    pieces = chunks(ids, n_ctx, None, chunk_bos(tokenizer))
    targets = np.concatenate([np.asarray(p[n_ctx // 2 + 1 :]) for p in pieces])
    train_docs = split(docs, recipe.heldout_every)[0]
    train_ids = np.concatenate([np.asarray(chat_ids(tokenizer, d), np.int64) for d in train_docs])
    report = dict(path=str(path), numerics=model.numerics.name, n_ctx=n_ctx, chunks=result.n_chunks,
                  tokens_scored=result.tokens_scored, ppl=f"{result.ppl:.4f} +/- {result.ppl_err:.5f}",
                  unigram_ppl=round(unigram_perplexity(train_ids, targets, tokenizer.n_vocab), 2))
    if llama_perplexity is not None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "heldout.txt").write_text(text, encoding="utf-8")
            done = subprocess.run([str(llama_perplexity), "-m", str(path), "-f", str(Path(tmp) / "heldout.txt"), "-c", str(n_ctx),
                                   "-fa", "off", "-t", "2"], capture_output=True, text=True)
        found = re.search(r"Final estimate: PPL = ([0-9.]+ \+/- [0-9.]+)", done.stdout + done.stderr)
        if done.returncode != 0 or not found:
            raise RuntimeError(f"{llama_perplexity} failed (exit status {done.returncode}): {done.stderr[-2000:]}")
        report["llama_perplexity_ppl"] = found.group(1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi3ref.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="train, and write the model here (and an F32 copy beside it)")
    parser.add_argument("--steps", type=int, default=Recipe.steps, help=f"steps of text (default {Recipe.steps})")
    parser.add_argument("--copy-steps", type=int, default=Recipe.copy_steps,
                        help=f"steps of the copying task first (default {Recipe.copy_steps})")
    parser.add_argument("--threads", type=int, default=Recipe.threads, help=f"torch's threads (default {Recipe.threads})")
    parser.add_argument("--evaluate", metavar="GGUF", help="print the held-out perplexity of this model (a path, or 'demo') "
                        "and the unigram baseline")
    parser.add_argument("--llama-perplexity", action="store_true",
                        help="with --evaluate: also llama.cpp's llama-perplexity on the same text (built once at this CPU's level)")
    parser.add_argument("--heldout-text", metavar="FILE", help="write the held-out text here (for llama-perplexity -f)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not (args.out or args.evaluate or args.heldout_text):
        parser.error("give --out, --evaluate or --heldout-text")
    if args.llama_perplexity and not args.evaluate:
        parser.error("--llama-perplexity goes with --evaluate")
    if args.evaluate:
        from .hub import resolve_model

        try:
            args.evaluate = str(resolve_model(args.evaluate))  # a path, or "demo"
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"--evaluate {args.evaluate}: {e}")
    if args.out:
        try:
            check_output_path(Path(args.out).with_suffix(".f32.gguf"))
            check_output_path(args.out)
        except ValueError as e:
            parser.error(f"--out: {e}")
    recipe = replace(Recipe(), steps=args.steps, copy_steps=args.copy_steps, threads=args.threads)
    try:
        check_recipe(recipe)
    except (TypeError, ValueError) as e:
        parser.error(str(e).replace("recipe.copy_steps", "--copy-steps").replace("recipe.steps", "--steps").replace("recipe.threads", "--threads"))
    report: dict = {}
    if args.heldout_text:
        Path(args.heldout_text).write_text(heldout_text(recipe), encoding="utf-8")
    if args.out:
        report["training"] = train(recipe, args.out, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.evaluate:
        tool = None
        if args.llama_perplexity:
            from .isa import resolve
            from .llama_builds import build_tool

            tool = build_tool("llama-perplexity", resolve())
        report["evaluation"] = evaluate(args.evaluate, recipe=recipe, llama_perplexity=tool)
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for part in report.values() for k, v in part.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
