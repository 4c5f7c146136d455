"""phi3ref.training and the demo model it made: the corpus, the split and the unigram
baseline; the export (against transformers, crosscheck tier: it needs torch); the bundled
demo model's insides (heads that a trained model grows) and its text."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import asdict, replace

import numpy as np
import pytest

import phi3ref
from phi3ref import training
from phi3ref.hub import demo_path
from phi3ref.lens import attention_patterns, previous_token_scores

NEEDS_TORCH = pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
                                 reason="training needs torch and transformers (pip install phi3ref[crosscheck])")


@pytest.fixture(scope="module")
def docs() -> list[training.Document]:
    return training.documents()


def test_the_corpus_is_python_s_documentation(docs):
    from pydoc_data.topics import topics

    assert len(docs) > 500 and len({d.title for d in docs}) == len(docs)
    assert [d.text for d in docs[: len(topics)]] == [topics[k].strip() for k in sorted(topics)]  # the help topics first
    docstrings = docs[len(topics):]  # then docstrings, each text once and none a topic's
    assert all(len(d.text) >= training._MIN_DOCSTRING for d in docstrings)
    assert len({d.text for d in docstrings} | {t.strip() for t in topics.values()}) == len(docstrings) + len({t.strip() for t in topics.values()})
    assert training.documents() == docs  # the same Python gives the same documents


def test_the_split_holds_out_one_in_twenty(docs):
    train, held = training.split(docs, 20)
    assert len(train) + len(held) == len(docs) and 0.03 < len(held) / len(docs) < 0.07
    assert not {d.title for d in train} & {d.title for d in held}
    assert training.split(list(reversed(docs)), 20)[1] == list(reversed(held))  # chosen by title, not by position
    assert training.heldout_text().startswith(held[0].text)


def test_copying_rows_hold_one_run_twice():
    """copy_form="runs": BOS, random tokens with one run of them placed twice at a random
    distance; labelled only where the second run follows from the first."""
    recipe = replace(training.Recipe(), copy_form="runs", copy_len=20, copy_run=(2, 6))
    pool = np.arange(1000, 3000)
    batches = training._Batches(np.arange(5000) % 300, np.array([0, 100]), pool, 1, recipe)
    ids, labels = batches.copies(64, recipe.copy_len)
    assert ids.shape == labels.shape == (64, recipe.copy_len + 1) and (ids[:, 0] == 1).all() and np.isin(ids[:, 1:], pool).all()
    distances, runs = set(), set()
    for row, lab in zip(ids, labels):
        scored = np.flatnonzero(lab != -100)
        assert recipe.copy_run[0] - 1 <= scored.size <= recipe.copy_run[1] - 1
        assert (lab[scored] == row[scored]).all() and (np.diff(scored) == 1).all()
        for i in scored:  # the token after the earlier occurrence of the token before
            earlier = [j for j in range(1, i - 1) if row[j] == row[i - 1] and row[j + 1] == row[i]]
            assert earlier, (row, lab)
        distances.add(int(scored[0] - earlier[-1]))
        runs.add(scored.size + 1)
    assert len(distances) > 5  # no fixed offset to learn instead
    assert min(runs) == recipe.copy_run[0] and max(runs) == recipe.copy_run[1]


def test_repeat_rows_hold_a_sequence_twice():
    """copy_form="repeat": BOS, a random sequence of a run's length, the same sequence
    again, random tokens after; the second copy but its first token is labelled."""
    recipe = replace(training.Recipe(), copy_form="repeat", copy_len=64, copy_run=(4, 32))
    pool = np.arange(1000, 3000)
    batches = training._Batches(np.arange(5000) % 300, np.array([0, 100]), pool, 1, recipe)
    ids, labels = batches.copies(64, recipe.copy_len)
    assert ids.shape == labels.shape == (64, 65) and (ids[:, 0] == 1).all() and np.isin(ids[:, 1:], pool).all()
    lengths = set()
    for row, lab in zip(ids, labels):
        scored = np.flatnonzero(lab != -100)
        n = scored.size + 1  # the sequence's length
        assert (row[1 : 1 + n] == row[1 + n : 1 + 2 * n]).all()
        assert scored.tolist() == list(range(2 + n, 1 + 2 * n)) and (lab[scored] == row[scored]).all()
        lengths.add(n)
    assert min(lengths) == 4 and max(lengths) == 32 and len(lengths) > 10


def test_text_rows_repeat_their_first_part():
    """The last repeat_rows rows of a text batch: a window's first part, then the window
    again from its start; `repeated` marks exactly the labels the first part gives away."""
    recipe = replace(training.Recipe(), batch_size=6, repeat_rows=4, doc_start_rows=1, seq_len=40, repeat_min=5)
    stream = np.arange(10_000)  # every token once: a repeat can only be the row's own
    batches = training._Batches(stream, np.array([0, 500, 900]), np.arange(10), 1, recipe)
    parts = set()
    for _ in range(20):
        ids, labels, repeated = batches.text()
        assert ids.shape == labels.shape == repeated.shape == (6, 41) and (labels == ids).all()
        assert not repeated[:2].any()  # plain text rows
        assert (np.diff(ids[:2], axis=1) == 1).all() and ids[0, 0] in (0, 500, 900)
        for row, rep in zip(ids[2:], repeated[2:]):
            part = int(np.flatnonzero(np.diff(row) != 1)[0]) + 1  # where the window starts again
            assert recipe.repeat_min <= part <= 41 // 2 and (row[part : 2 * part] == row[:part]).all() and (np.diff(row[part:]) == 1).all()
            assert (np.flatnonzero(rep) == np.arange(part + 1, 41)).all()
            parts.add(part)
    assert len(parts) > 5


def test_the_learning_rate_of_the_text_phase():
    """From phase 1's rate up to text_lr over the warm-up, then a cosine down to min_lr."""
    r = training.Recipe()
    rates = [training._learning_rate(step, r) for step in range(r.steps)]
    assert rates[0] == pytest.approx(r.lr + (r.text_lr - r.lr) / r.warmup_steps)
    assert rates[r.warmup_steps - 1] == pytest.approx(r.text_lr) and max(rates) == pytest.approx(r.text_lr)
    assert np.all(np.diff(rates[r.warmup_steps:]) <= 0) and rates[-1] == pytest.approx(r.min_lr, rel=1e-3)


def test_unigram_perplexity():
    train = np.array([0, 0, 1, 2])  # counts + 1 over 4 tokens: 3, 2, 2, 1 of 8
    p = np.array([3, 2, 2, 1]) / 8
    targets = np.array([0, 3, 1])
    assert training.unigram_perplexity(train, targets, 4) == pytest.approx(np.exp(-np.log(p[targets]).mean()))


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="every must be an integer >= 2, got 0"):
        training.split([], 0)
    with pytest.raises(ValueError, match="targets must be a non-empty 1-D array of token ids below n_vocab=3"):
        training.unigram_perplexity(np.array([0, 1]), np.array([5]), 3)
    for change, message in [(dict(quant="Q4_KM"), "recipe.quant 'Q4_KM' is not one of"),
                            (dict(warmup_steps=0), "recipe.warmup_steps must be an integer >= 1, got 0"),
                            (dict(seq_len=513), "recipe.seq_len must be an integer from 2 to 512, got 513"),
                            (dict(copy_len=10), "recipe.copy_len must be an integer from 64 to 511, got 10"),
                            (dict(repeat_rows=9), "recipe.repeat_rows must be an integer from 0 to 8, got 9"),
                            (dict(repeat_min=300), "recipe.repeat_min must be an integer from 1 to 256, got 300"),
                            (dict(copy_run=(5, 3)), "recipe.copy_run must be .shortest, longest."),
                            (dict(copy_softmax="pooled"), "recipe.copy_softmax must be 'vocab' or 'pool', got 'pooled'"),
                            (dict(copy_form="twice"), "recipe.copy_form must be 'runs' or 'repeat', got 'twice'"),
                            (dict(lr=float("nan")), "recipe.lr must be a finite number")]:
        with pytest.raises(ValueError, match=message):
            training.check_recipe(replace(training.Recipe(), **change))
    with pytest.raises(TypeError, match="recipe.steps must be an integer, got 1.5"):
        training.check_recipe(replace(training.Recipe(), steps=1.5))
    with pytest.raises(ValueError, match="a folder; a model is written to a file name"):
        training.train(training.Recipe(), tmp_path)  # before torch trains anything
    with pytest.raises(ValueError, match="does not exist"):
        training.train(training.Recipe(), tmp_path / "missing" / "demo.gguf")
    with pytest.raises(SystemExit):
        training.main(["--out", str(tmp_path)])


def test_a_document_is_a_chat_exchange(docs):
    tok = phi3ref.Tokenizer.from_gguf(phi3ref.synthetic.vocab_path())
    ids = training.chat_ids(tok, docs[0])
    text = tok.decode(ids)
    assert text.startswith("<s><|user|>") and "<|assistant|>" in text and text.rstrip().endswith("<|end|>")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


# -- the export, against transformers -------------------------------------------------------------


@pytest.mark.crosscheck
@NEEDS_TORCH
@pytest.mark.parametrize("tied", [True, False])
def test_the_export_computes_what_transformers_computes(tied, tmp_path):
    """A transformers Phi3ForCausalLM exported by phi3ref's writer: phi3ref's exact numerics
    on the F32 file give transformers' logits (float32 rounding), and Q8_0 close to them."""
    import torch
    import transformers

    from phi3ref.crosscheck import transformers_config

    torch.manual_seed(0)
    shape = replace(training.DEMO_SHAPE, n_layer=2, tied_embeddings=tied)
    model = transformers.Phi3ForCausalLM(transformers_config(shape.config(32064))).eval()
    with torch.no_grad():  # weights of a trained model's scale, not init's 0.02
        for p in model.parameters():
            p.normal_(0, 0.5 / np.sqrt(p.shape[-1])) if p.ndim == 2 else p.uniform_(0.8, 1.2)
    tokens = [1, 32010, 14350, 263, 447, 18282, 1048, 14890, 18881, 32007, 32001]
    with torch.no_grad():
        theirs = model(torch.tensor([tokens])).logits[0].numpy()
    f32 = training.export(model, shape, tmp_path / "m.f32.gguf", quant="F32", name="test")
    ours = phi3ref.load(f32, numerics="exact").logits(tokens)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    assert phi3ref.load(f32).config.tied_embeddings == tied
    q8 = training.export(model, shape, tmp_path / "m.q8.gguf", quant="Q8_0", name="test")
    assert np.abs(phi3ref.load(q8, numerics="exact").logits(tokens) - theirs).max() <= 0.05 * np.abs(theirs).max()


@pytest.mark.crosscheck
@pytest.mark.slow
@NEEDS_TORCH
def test_a_few_training_steps(tmp_path, monkeypatch, docs):
    """train() end to end on a few documents, every phase and option on: the loss falls,
    and both files load."""
    monkeypatch.setattr(training, "documents", lambda: docs[:40])
    recipe = replace(training.Recipe(), lead_steps=3, copy_steps=6, copy_batch=8, steps=12, batch_size=4, seq_len=64,
                     copy_len=20, copy_run=(2, 8), text_copy_batch=4, text_copy_len=32, repeat_rows=2, repeat_min=8, warmup_steps=2, lr=3e-3)
    lines = []
    report = training.train(recipe, tmp_path / "demo.gguf", log=lines.append)
    assert report["final_loss"] < 10.2 and np.isfinite(report["heldout_loss"]) and np.isfinite(report["final_copying_loss"])
    assert np.isfinite(report["final_repeated_loss"])
    assert report["final_copying_loss"] < np.log(recipe.copy_pool) + 0.5  # scored over the pool: near its entropy, not the vocabulary's
    assert [sum(line.startswith(kind) for line in lines) for kind in ("lead text step", "copying step", "text step")] == [2, 2, 2]
    for path in report["files"]:
        model = phi3ref.load(path)
        assert model.config.n_layer == recipe.shape.n_layer and np.isfinite(model.logits([1, 2, 3])).all()

@pytest.fixture(scope="module")
def demo():
    return phi3ref.load("demo")


def test_the_demo_model_is_the_one_described(demo):
    assert demo.gguf.path == demo_path() and demo.config.n_layer == training.DEMO_SHAPE.n_layer
    assert demo.config.n_embd == training.DEMO_SHAPE.n_embd and demo.config.tied_embeddings
    description = demo.gguf.get_str("general.description")
    assert "phi3ref.training" in description
    # the bundled file was made by today's defaults: `python -m phi3ref.training --out` remakes it
    recipe = json.loads(description[description.index("recipe ") + len("recipe "):])
    assert recipe == json.loads(json.dumps(asdict(training.Recipe())))


def test_the_demo_model_writes_english(demo, docs):
    """The tutorial's prompt gets text whose words are mostly the documentation's, in ASCII
    as the documentation is (a random model's text mixes every script of the vocabulary)."""
    vocabulary = {w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d.text)}
    texts = [phi3ref.generate("Write a haiku about ice hockey", model=demo, seed=seed, max_tokens=60).text for seed in range(1, 7)]
    words = [w for text in texts for w in re.findall(r"[A-Za-z]+", text)]
    assert len(words) >= 60, texts
    assert sum(w.lower() in vocabulary for w in words) / len(words) >= 0.75, texts
    assert sum(len(re.findall(r"[^\x00-\x7f\u2018\u2019\u201c\u201d]", text)) for text in texts) <= 3, texts


def test_the_demo_model_has_grown_a_previous_token_head(demo):
    """The head the walkthrough shows: one that attends to the token before the query (on
    a random model no head's score gets near)."""
    text = demo.tokenizer.encode("The for statement is used to iterate over the elements of a sequence (such as a string, tuple or list).")
    prev = previous_token_scores(attention_patterns(demo, text))
    assert prev.max() > 0.5, prev


def test_the_demo_model_has_grown_an_induction_head(demo):
    """On a run of the documentation's words repeated twice, heads above the first layer
    attend from each token of the second copy to the token after its twin (a random
    model's scores stay near 1/position), and the second copy costs far less than the
    first: the model continues what its context has shown it."""
    from pydoc_data.topics import topics

    from phi3ref.lens import induction_scores, repeated_tokens
    from phi3ref.sampler import log_softmax

    period = 10
    probe = repeated_tokens(demo.tokenizer, period, seed=1, candidates=demo.tokenizer.encode(topics["for"]))
    scores = induction_scores(attention_patterns(demo, probe), period)
    assert scores[1:].max() > 0.35 and scores[0].max() < 0.2, scores  # layer 0 cannot: it sees no previous tokens' contents yet
    logits = demo.logits(probe)
    nll = -np.array([log_softmax(logits[i])[probe[i + 1]] for i in range(len(probe) - 1)])
    assert nll[period + 1 :].mean() < nll[1:period].mean() - 4, nll