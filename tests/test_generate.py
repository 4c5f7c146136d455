"""generate(), streaming, chat templates, sessions, the Hub and the console app."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import phi3ref
from phi3ref.chat_template import PHI3_TEMPLATE, render_chat
from phi3ref.generate import _TextStream
from phi3ref.hub import HubError, resolve_model


@pytest.fixture(scope="module")
def model(tiny_model):
    return phi3ref.load(tiny_model("phi3-mini", "Q4_K_M"))


def test_same_seed_same_text(model):
    a = phi3ref.generate("Write a haiku about ice hockey", model=model, seed=11, max_tokens=16)
    b = phi3ref.generate("Write a haiku about ice hockey", model=model, seed=11, max_tokens=16)
    c = phi3ref.generate("Write a haiku about ice hockey", model=model, seed=12, max_tokens=16)
    assert a.tokens == b.tokens and a.text == b.text and a.seed == 11
    assert c.tokens != a.tokens
    assert a.finish_reason == "length" and len(a.tokens) == 16
    assert a.timings.prompt_tokens == len(a.prompt_tokens) and a.timings.generated_tokens == 16


def test_prompt_uses_the_chat_template(model):
    r = phi3ref.generate("Write a haiku about ice hockey", model=model, max_tokens=0)
    assert r.prompt_tokens == [1, 32010, 14350, 263, 447, 18282, 1048, 14890, 18881, 32007, 32001]
    assert r.text == "" and r.tokens == []


def test_stream_pieces_join_to_the_text(model):
    stream = phi3ref.generate(messages=[{"role": "user", "content": "Hi"}], model=model, seed=3, max_tokens=24, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text and stream.result.text


def test_greedy_is_argmax(model):
    r = phi3ref.generate("Hello", model=model, temperature=0, max_tokens=5, repeat_penalty=1.0)
    model.reset()
    logits = model.forward(r.prompt_tokens, 0)
    assert r.tokens[0] == int(np.argmax(logits))


def test_stream_never_breaks_characters(model):
    """Byte-fallback tokens carry one byte of a multi-byte character: feed emoji and CJK
    byte by byte and check that no piece holds a broken character."""
    tok = model.tokenizer
    text = "Ice 🏒 hockey: 氷上のパック 😀👍🏽 fin"
    ids = tok.encode(text, add_bos=False)
    assert any(tok.token_text(i).startswith("<0x") for i in ids)
    stream = _TextStream(tok, stop=())
    pieces = [stream.push(i)[0] for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings(model):
    tok = model.tokenizer
    ids = tok.encode("one two three four", add_bos=False)
    stream = _TextStream(tok, stop=["three"])
    out = []
    for i in ids:
        piece, stopped = stream.push(i)
        out.append(piece)
        if stopped:
            break
    assert stopped and "".join(out) == "one two " and stream.text == "one two "


def test_eos_ends_generation(model, monkeypatch):
    """Make <|end|> the only possible token: generation ends at once with reason eos."""
    real = model.forward

    def forced(tokens, start_pos, **kw):
        logits = real(tokens, start_pos, **kw)
        logits[:] = -1e9
        logits[32007] = 0
        return logits

    monkeypatch.setattr(model, "forward", forced)
    r = phi3ref.generate("Hi", model=model, max_tokens=10)
    assert r.finish_reason == "eos" and r.tokens == [] and r.text == ""


def test_prompt_longer_than_context(tiny_model):
    small = phi3ref.load(tiny_model("phi3-mini", "Q4_K_M"), n_ctx=16)
    with pytest.raises(ValueError, match="the prompt is .* tokens, which leaves no room in the context of 16"):
        phi3ref.generate("word " * 40, model=small)
    r = phi3ref.generate("Hi", model=small, max_tokens=100, seed=1)
    assert r.finish_reason in ("context", "eos")
    assert len(r.prompt_tokens) + len(r.tokens) <= 16


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="give one of prompt, messages or tokens"):
        phi3ref.generate(model=model)
    with pytest.raises(ValueError, match="top_p"):
        phi3ref.generate("x", model=model, top_p=2)
    with pytest.raises(ValueError, match="max_tokens"):
        phi3ref.generate("x", model=model, max_tokens=-1)
    with pytest.raises(ValueError, match=r"messages\[0\] has role 'robot'"):
        phi3ref.generate(messages=[{"role": "robot", "content": "x"}], model=model)


def test_chat_session_reuses_the_cache(model):
    chat = phi3ref.Chat(model, seed=5, temperature=0.7, max_tokens=6)
    first = chat.send("Hello there")
    n_cached = len(model.tokens)
    second = chat.send("And again")
    assert second.timings.prompt_tokens < len(second.prompt_tokens)  # only the new turn was run
    assert second.prompt_tokens[:n_cached - 1] == model.tokens[:n_cached - 1]
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == first.text


def test_render_with_the_file_template(model):
    text = render_chat([{"role": "user", "content": "Hi"}], model.tokenizer.chat_template, bos_token="<s>")
    assert text == "<s><|user|>\nHi<|end|>\n<|assistant|>\n"


def test_builtin_phi3_format():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert render_chat(msgs, None) == "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\n"
    assert PHI3_TEMPLATE


def test_template_is_sandboxed():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="the chat template failed"):
        render_chat([{"role": "user", "content": "x"}], evil)
    with pytest.raises(ValueError, match="the chat template failed: nope"):
        render_chat([{"role": "user", "content": "x"}], "{{ raise_exception('nope') }}")


@pytest.mark.slow  # huggingface_hub's offline lookup took 23 s in a CI-like run
def test_hub_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(HubError) as info:
        resolve_model("microsoft/Phi-3-mini-4k-instruct-gguf")
    msg = str(info.value)
    assert "Phi-3-mini-4k-instruct-q4.gguf" in msg and "microsoft/Phi-3-mini-4k-instruct-gguf" in msg
    assert "pass its local path" in msg and "HF_HUB_OFFLINE=1" in msg and "--model demo" in msg
    with pytest.raises(ValueError, match="which .gguf file"):
        resolve_model("someone/some-repo")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_model(tmp_path / "missing.gguf")


def test_local_paths_that_are_no_model_file(tmp_path):
    (tmp_path / "x.gguf").mkdir()  # a folder named like a model file is not one
    with pytest.raises(FileNotFoundError, match="a folder with 0 .gguf files: name one with --file"):
        resolve_model(tmp_path, file_flag="--file")
    with pytest.raises(FileNotFoundError, match="x.gguf: a folder, not a .gguf file"):
        resolve_model(tmp_path, filename="x.gguf")
    with pytest.raises(FileNotFoundError, match="not a usable path .File name too long."):
        resolve_model("/tmp/" + "a" * 5000 + ".gguf")
    with pytest.raises(FileNotFoundError, match="/dev/zero: not a regular file"):
        resolve_model("/dev/zero")
    with pytest.raises(FileNotFoundError, match="not a usable path"):
        phi3ref.GGUFFile("/tmp/" + "a" * 5000 + ".gguf")
    with pytest.raises(TypeError, match="tokenizer must be None, 'hub' or the path of a tokenizer.json"):
        phi3ref.load(tmp_path / "missing.gguf", tokenizer=5)
    with pytest.raises(FileNotFoundError, match="the model path is empty"):
        phi3ref.load("")
    with pytest.raises(TypeError, match="revision must be a str"):
        resolve_model(tmp_path, revision=5)
    with pytest.raises(ValueError, match="a folder; a model is written to a file name"):
        phi3ref.synthetic.write_model(tmp_path)
    assert resolve_model("demo") == phi3ref.hub.demo_path() and phi3ref.hub.demo_path().is_file()
    with pytest.raises(ValueError, match="the demo model has none"):
        resolve_model("demo", filename="x.gguf")


def run_cli(*args, env_extra=None, stdin=None, tmp_path=None):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "phi3ref.cli", *args], capture_output=True, text=True, timeout=300, env=env, input=stdin)


@pytest.mark.slow  # a child process
def test_cli_generate_with_a_local_model(tiny_model):
    out = run_cli("generate", "--model", str(tiny_model("phi3-mini", "Q4_K_M")), "--seed", "9", "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert "seed 9" in out.stderr and "tok/s" in out.stderr and out.stdout.strip()
    again = run_cli("generate", "--model", str(tiny_model("phi3-mini", "Q4_K_M")), "--seed", "9", "--max-tokens", "8")
    assert again.stdout == out.stdout


@pytest.mark.slow  # a child process
def test_cli_demo_and_chat(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    out = run_cli("generate", "--model", "demo", "--max-tokens", "4", env_extra=env)
    assert out.returncode == 0 and "trained on Python's documentation" in out.stderr
    chat = run_cli("chat", "--model", "demo", "--max-tokens", "3", "--seed", "2", env_extra=env, stdin="Hello\nAgain\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr.count("generation:") == 2  # one timing line per turn


@pytest.mark.slow  # a child process
def test_cli_errors(tmp_path):
    offline = run_cli("generate", "--max-tokens", "1", env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert offline.returncode == 1 and "pass its local path" in offline.stderr and "Traceback" not in offline.stderr
    bad = run_cli("generate", "--model", "demo", "--top-p", "3", env_extra={"XDG_CACHE_HOME": str(tmp_path)})
    assert bad.returncode == 2 and "top_p" in bad.stderr
    missing = run_cli("generate", "--model", str(tmp_path / "nope.gguf"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_careless_generation_arguments(model):
    with pytest.raises(TypeError, match="stop must be a string or a list of strings"):
        phi3ref.generate("x", model=model, stop=None)
    with pytest.raises(TypeError, match="stop must be a string or a list of strings"):
        phi3ref.generate("x", model=model, stop=[5])
    with pytest.raises(ValueError, match="cannot be encoded as UTF-8"):
        phi3ref.generate("hi \ud800", model=model)
    with pytest.raises(TypeError, match="unknown sampling parameter"):
        phi3ref.Chat(model, bogus=1)
    with pytest.raises(ValueError, match="max_tokens"):
        phi3ref.Chat(model, max_tokens=-1)


def test_a_failed_turn_leaves_the_conversation_as_it_was(model, monkeypatch):
    chat = phi3ref.Chat(model, seed=3, max_tokens=3)
    chat.send("Hello")
    before = [dict(m) for m in chat.messages]

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(KeyboardInterrupt):
        chat.send("Again")
    assert chat.messages == before
    monkeypatch.undo()
    stream = chat.send("Again", stream=True)
    assert chat.messages == before  # a stream's turn counts once it is read to the end
    text = "".join(stream)
    assert chat.messages[-1] == {"role": "assistant", "content": text} and len(chat.messages) == 4


def test_invalid_bytes_stream_as_they_decode(model):
    """Streaming once emitted '世' and then decoded the text as four U+FFFD."""
    tok = model.tokenizer
    ids = [tok.backend.token_to_id(t) for t in ("<0xE4>", "<0xB8>", "<0x96>", "<0xFF>", "▁a", "<0xE4>")]
    stream = _TextStream(tok, [])
    pieces = [stream.push(i)[0] for i in ids] + [stream.flush()]
    assert "".join(pieces) == stream.text == "世\ufffd a\ufffd"


def test_generate_chat_and_the_command_line_share_their_defaults(model):
    """One set of defaults (phi3ref.sampler.DEFAULT_SAMPLING / DEFAULT_MAX_TOKENS, the
    tutorial's): generate()'s signature, a Chat with nothing set and the CLI's flags."""
    import inspect

    from phi3ref.cli import build_parser

    defaults = {k: p.default for k, p in inspect.signature(phi3ref.generate).parameters.items()}
    wanted = {"max_tokens": 100, "temperature": 1.0, "top_p": None, "top_k": None, "min_p": None,
              "repeat_penalty": 1.2, "repeat_last_n": 64}
    assert {k: defaults[k] for k in wanted} == wanted
    chat = phi3ref.Chat(model)
    assert {**chat.sampling, "max_tokens": chat.max_tokens} == wanted
    args = vars(build_parser().parse_args(["generate", "hello"]))
    assert {k: args[k] for k in wanted} == wanted


# ---- generation for cross-checkers: token ids or raw text in, log-probabilities out


def test_tokens_and_raw_prompts_skip_the_template(model):
    ids = [1, 15043, 3186]
    by_ids = phi3ref.generate(tokens=ids, model=model, temperature=0, max_tokens=4)
    assert by_ids.prompt_tokens == ids and len(by_ids.tokens) == 4
    # a continuation keeps its first token's space, as llama.cpp's completions do
    assert by_ids.text == model.tokenizer.decode(by_ids.tokens, skip_special=True, continuation=True)
    hello = model.tokenizer.encode("Hello", add_bos=False)
    assert model.tokenizer.decode(hello, continuation=True) == " Hello" and model.tokenizer.decode(hello) == "Hello"
    raw = phi3ref.generate("Hello world", raw=True, model=model, temperature=0, max_tokens=4)
    assert raw.prompt_tokens == model.tokenizer.encode("Hello world") and raw.prompt_tokens[0] == model.tokenizer.bos_id
    assert raw.tokens == phi3ref.generate(tokens=raw.prompt_tokens, model=model, temperature=0, max_tokens=4).tokens
    numpy_ids = phi3ref.generate(tokens=np.array(ids), model=model, temperature=0, max_tokens=4)
    assert numpy_ids.tokens == by_ids.tokens


def log_softmax_reference(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


def test_logprobs_are_the_unmodified_distribution(model):
    """logprobs=N: each generated token's log-probability under the model's raw logits (not
    the sampler's tempered, penalised distribution), and the N most likely tokens; echo
    gives the prompt's, each predicted by the position before it."""
    ids = [1, 450, 4799, 338]
    r = phi3ref.generate(tokens=ids, model=model, temperature=0.7, repeat_penalty=1.3, seed=5, max_tokens=6, logprobs=4, echo=True)
    assert [x.token for x in r.logprobs] == r.tokens and [x.token for x in r.prompt_logprobs] == ids
    model.reset()  # the same passes again: the prompt (every position), then one token at a time
    every = model.forward(ids, 0, all_logits=True)  # (n, n_vocab): position i predicts token i + 1
    steps = [every[-1]] + [model.forward([t], len(ids) + i) for i, t in enumerate(r.tokens[:-1])]
    for record, logits in zip(r.logprobs, steps):
        expected = log_softmax_reference(logits)
        assert abs(record.logprob - expected[record.token]) < 1e-9
        assert [t for t, _ in record.top] == list(np.argsort(-expected, kind="stable")[:4])
        assert record.top[0][1] >= record.top[-1][1] and record.text == model.tokenizer.decode([record.token], continuation=True)
    assert r.prompt_logprobs[0].logprob is None and r.prompt_logprobs[0].top == []
    for i in range(1, len(ids)):
        assert abs(r.prompt_logprobs[i].logprob - log_softmax_reference(every[i - 1])[ids[i]]) < 1e-9
    assert phi3ref.generate(tokens=ids, model=model, max_tokens=2, seed=5).logprobs is None
    assert phi3ref.generate(tokens=ids, model=model, max_tokens=2, seed=5, logprobs=0).logprobs[0].top == []


def test_greedy_logprobs_are_the_most_likely(model):
    r = phi3ref.generate(tokens=[1, 450], model=model, temperature=0, repeat_penalty=1.0, max_tokens=5, logprobs=1)
    assert all(x.top[0][0] == x.token and x.top[0][1] == x.logprob for x in r.logprobs)


def test_a_stream_closed_early_says_cancelled(model):
    stream = phi3ref.generate(tokens=[1, 450], model=model, seed=2, max_tokens=30, stream=True, logprobs=1)
    pieces = [next(stream) for _ in range(4)]
    stream.close()
    r = stream.result
    assert r.finish_reason == "cancelled" and r.timings.generated_tokens == len(r.tokens) == len(r.logprobs)
    assert r.text == model.tokenizer.decode(r.tokens, skip_special=True, continuation=True) and r.text.startswith("".join(pieces))
    with pytest.raises(StopIteration):
        next(stream)
    with phi3ref.generate(tokens=[1, 450], model=model, seed=2, max_tokens=30, stream=True) as left:
        for i, _ in enumerate(left):
            if i == 3:
                break
    assert left.result.finish_reason == "cancelled" and left.result.text == model.tokenizer.decode(left.result.tokens, skip_special=True, continuation=True)
    whole = phi3ref.generate(tokens=[1, 450], model=model, seed=2, max_tokens=30, stream=True)
    assert "".join(whole) == whole.result.text and whole.result.finish_reason in ("length", "eos")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(tokens=[]), ValueError, "tokens is empty"),
    (dict(tokens=[40000]), ValueError, "token id 40000 is outside the vocabulary"),
    (dict(tokens=[1, 2.5]), TypeError, "integer token ids"),
    (dict(tokens="1,2"), TypeError, "list of integer token ids"),
    (dict(tokens=[1], prompt="x"), ValueError, "one of prompt, messages or tokens"),
    (dict(tokens=[1], raw=True), ValueError, "raw=True encodes a prompt string"),
    (dict(messages=[{"role": "user", "content": "x"}], raw=True), ValueError, "raw=True encodes a prompt string"),
    (dict(prompt="x", raw=True, system="s"), ValueError, "a system message goes through the chat template"),
    (dict(prompt="x", raw="yes"), TypeError, "raw must be True or False"),
    (dict(prompt="x", logprobs=-1), ValueError, "logprobs must be an integer >= 0"),
    (dict(prompt="x", logprobs=10**6), ValueError, "logprobs must be at most the vocabulary's 32064 tokens"),
    (dict(prompt="x", logprobs=2.5), TypeError, "logprobs must be an integer"),
    (dict(prompt="x", seed=-1), ValueError, "seed must be an integer >= 0"),
    (dict(prompt="x", seed="x"), TypeError, "seed must be an integer"),
    (dict(prompt="x", max_tokens=np.int64(-1)), ValueError, "max_tokens must be an integer >= 0"),
    (dict(prompt="x", stream="yes"), TypeError, "stream must be True or False"),
    (dict(tokens=np.array(5)), TypeError, "list of integer token ids, got ndarray of 0 dimensions"),
    (dict(prompt="", raw=True), None, None),
    (dict(prompt="x", echo="yes"), TypeError, "echo must be True or False"),
])
def test_cross_checking_arguments(model, kwargs, error, message):
    if error is None:  # (an empty raw prompt: BOS alone, as the vocabulary adds one)
        assert phi3ref.generate(model=model, max_tokens=1, **kwargs).prompt_tokens == [model.tokenizer.bos_id]
        return
    with pytest.raises(error, match=message):
        phi3ref.generate(model=model, **kwargs)


def test_numpy_integers_are_integers(model):
    result = phi3ref.generate("x", model=model, max_tokens=np.int64(2), seed=np.uint32(3), logprobs=np.int16(2))
    assert result.seed == 3 and len(result.tokens) <= 2 and len(result.logprobs) == len(result.tokens)


def test_chat_checks_its_arguments_before_loading(tmp_path):
    missing = tmp_path / "missing.gguf"  # never opened: every check comes first
    for kwargs, error, message in [
        (dict(seed=-1), ValueError, "seed must be an integer >= 0"),
        (dict(seed="x"), TypeError, "seed must be an integer"),
        (dict(seed=1.5), TypeError, "seed must be an integer"),
        (dict(temperature=-1), ValueError, "temperature"),
        (dict(system=5), TypeError, "system must be a str"),
        (dict(bogus=1), TypeError, "unknown sampling parameter 'bogus'"),
    ]:
        with pytest.raises(error, match=message):
            phi3ref.Chat(missing, **kwargs)
    with pytest.raises(FileNotFoundError):
        phi3ref.Chat(missing)


@pytest.mark.slow  # child processes
def test_cli_raw_tokens_logprobs_and_json(tmp_path):
    import json

    env = {"XDG_CACHE_HOME": str(tmp_path)}
    out = run_cli("generate", "--model", "demo", "--tokens", "1,450,4799", "--temperature", "0", "--max-tokens", "3",
                  "--logprobs", "2", "--echo", "--json", env_extra=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["prompt_tokens"] == [1, 450, 4799] and len(result["logprobs"]) == len(result["tokens"]) == 3
    assert [len(r["top"]) for r in result["logprobs"]] == [2, 2, 2] and result["prompt_logprobs"][0]["logprob"] is None
    shown = run_cli("generate", "--model", "demo", "--raw", "Hello", "--max-tokens", "2", "--logprobs", "1", env_extra=env)
    assert shown.returncode == 0 and "log-probabilities of the generated tokens" in shown.stderr
    logits = run_cli("logits", "--model", "demo", "--text", "Hello world", "-o", str(tmp_path / "l.npy"), env_extra=env)
    assert logits.returncode == 0, logits.stderr
    assert np.load(tmp_path / "l.npy").shape[0] == 3  # BOS, Hello, world
    for args, message in [(("--tokens", "1,2", "text"), "--tokens is the prompt"), (("--logprobs", "-1"), "--logprobs must be >= 0"),
                          (("--echo",), "--echo shows the prompt")]:
        bad = run_cli("generate", "--model", "demo", *args, env_extra=env)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    neither = run_cli("logits", "--model", "demo", "-o", str(tmp_path / "x.npy"), env_extra=env)
    assert neither.returncode == 2 and "give --tokens or --text" in neither.stderr


def _bigram_model(path, preset: str, n_vocab: int, chain: list[int]):
    """A model of ``preset``'s shape and vocabulary that says ``chain[1:]`` after
    ``chain[0]``: the attention and MLP write nothing (zero projections), so the last
    position's logits depend on its own token only; each chain token's embedding is a random
    vector and the output row of the token after it is that same vector (about 256 logits
    above every other: sampling at temperature 1 picks it every time). Each token of
    ``chain`` but the last comes once."""
    from dataclasses import replace

    from phi3ref.synthetic import preset_shape, preset_vocab, tensor_plan, write_weights

    shape = replace(preset_shape(preset), tied_embeddings=False)  # an output head of its own
    rng = np.random.default_rng(0)
    weights = {p.name: (np.ones if p.kind in ("norm", "rope_long", "rope_short") else np.zeros)(p.shape, np.float32)
               for p in tensor_plan(shape, n_vocab, "Q8_0")}
    for token, after in zip(chain, chain[1:]):
        weights["token_embd.weight"][token] = rng.standard_normal(shape.n_embd)
        weights["output.weight"][after] = weights["token_embd.weight"][token]
    return write_weights(path, shape, weights, quant="Q8_0", name=f"{preset} bigram", vocab=preset_vocab(preset))


@pytest.mark.slow  # a child process
@pytest.mark.parametrize("preset,end", [("phi4", "<|im_end|>"), ("phi4-mini", "<|end|>")])
def test_phi4_generation_stops_on_its_end_of_turn_token(tmp_path, preset, end):
    """Phi-4 ends a turn with <|im_end|>, Phi-4-mini with <|end|>: `phi3ref generate` on a
    model that says "Hello" and then that token prints "Hello" and stops (reason eos) — on
    the models' own vocabularies and chat templates (the prompt ends with the template's
    generation prompt: <|im_sep|> for Phi-4, <|assistant|> for Phi-4-mini)."""
    from phi3ref.synthetic import preset_vocab
    from phi3ref.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(preset_vocab(preset))
    (start,) = tok.encode({"phi4": "<|im_sep|>", "phi4-mini": "<|assistant|>"}[preset], special=True)
    (hello,), (world,), (stop,) = tok.encode("Hello"), tok.encode(" world"), tok.encode(end, special=True)
    assert stop in tok.eog_ids
    path = _bigram_model(tmp_path / "bigram.gguf", preset, tok.n_vocab, [start, hello, stop, world])  # past the stop: " world"
    r = phi3ref.generate("Hi", model=phi3ref.load(path), max_tokens=10, seed=1)
    assert (r.tokens, r.text, r.finish_reason) == ([hello], "Hello", "eos")  # the end-of-turn token ends, unprinted
    assert r.prompt_tokens[-1] == start
    out = run_cli("generate", "--model", str(path), "--seed", "1", "--max-tokens", "10", "Hi")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Hello" and "[eos]" in out.stderr
