"""The ``phi3ref`` console script, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from craft import RawGGUF, phi3_metadata

from phi3ref.cli import main
from phi3ref.synthetic import vocab_path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phi3ref.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a child process
def test_inspect_model(tiny_model):
    path = tiny_model("phi4-mini", "Q4_K_M")
    out = run("inspect", str(path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "architecture  phi3" in text
    assert "grouped-query attention 4/2; partial rotary 48/64; LongRoPE from 256" in text
    assert "tied embeddings" in text
    assert "<|user|>" in text and "200064 tokens" in text
    assert "blk.1.ffn_down.weight" in text and "Q6_K" in text
    assert "phi3ref supports this model" in text


def test_inspect_json(tiny_model, capsys):
    path = tiny_model("phi3-mini", "Q4_K_M")
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["runnable"] is True and info["problems"] == []
    assert info["config"]["n_layer"] == 2
    names = [t["name"] for t in info["tensors"]]
    assert names[0] == "token_embd.weight" and names[-1] == "output.weight"
    totals = info["totals_by_type"]
    assert set(totals) == {"Q4_K", "Q5_K", "Q6_K", "F32"}
    assert sum(t["bytes"] for t in totals.values()) == info["total_tensor_bytes"]
    assert info["tokenizer"]["special"]["eos"] == {"id": 32000, "text": "<|endoftext|>"}


def test_inspect_json_of_metadata_of_the_wrong_kind(tiny_model, tmp_path, capsys):
    """Arrays (and non-finite numbers) where a scalar belongs are described, not dumped
    (numpy arrays once made json.dump raise)."""
    from craft import rewrite_gguf
    from gguf import GGUFValueType as VT

    path = rewrite_gguf(tiny_model("phi3-mini", "Q4_0"), tmp_path / "lie.gguf", set_kv={
        "general.name": (VT.ARRAY, [1, 2], VT.INT32), "tokenizer.ggml.add_bos_token": (VT.ARRAY, [True], VT.BOOL),
        "tokenizer.ggml.model": (VT.ARRAY, [1], VT.UINT8), "tokenizer.ggml.pre": (VT.ARRAY, [1.5], VT.FLOAT32),
        "general.file_type": (VT.FLOAT32, float("nan"))})
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "(array[int32] of 2)" and info["tokenizer"]["add_bos"] == "(array[bool] of 1)"
    assert info["tokenizer"]["model"] == "(array[uint8] of 1)" and info["file_type"] == "unknown (nan)"
    assert main(["inspect", str(path)]) == 0 and "phi3ref cannot run this file" in capsys.readouterr().out


def test_inspect_vocab_only(capsys):
    assert main(["inspect", str(vocab_path())]) == 0
    text = capsys.readouterr().out
    assert "vocab-only file" in text and "phi3ref cannot run this file" in text
    assert "n_embd                3072" in text


def test_inspect_other_architecture(tmp_path, capsys):
    path = RawGGUF(kvs=phi3_metadata(arch="llama")).write(tmp_path / "llama.gguf")
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["runnable"] is False
    assert any("architecture is 'llama'" in p for p in info["problems"])


@pytest.mark.parametrize("content", [b"not a gguf at all", b""])
@pytest.mark.slow  # a child process
def test_inspect_bad_file(tmp_path, content):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    out = run("inspect", str(path))
    assert out.returncode == 1
    assert out.stderr.startswith("phi3ref: error: ") and str(path) in out.stderr and "not a GGUF file" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow  # a child process
def test_inspect_missing_file(tmp_path):
    out = run("inspect", str(tmp_path / "missing.gguf"))
    assert out.returncode == 1 and "no such file" in out.stderr


@pytest.mark.slow  # a child process
def test_write_model_command(tmp_path):
    out = run("write-model", str(tmp_path / "m.gguf"), "--preset", "phi3-medium", "--quant", "Q8_0")
    assert out.returncode == 0, out.stderr
    assert "synthetic phi3-medium (tiny), Q8_0, random weights" in out.stdout
    assert run("inspect", str(tmp_path / "m.gguf")).returncode == 0


@pytest.mark.slow  # a child process
def test_logits_command(tiny_model, tmp_path):
    import numpy as np

    import phi3ref

    path = tiny_model("phi3-mini", "Q4_0")
    out = run("logits", "--model", str(path), "--tokens", "1,32010,1724,338", "-o", str(tmp_path / "l.logits"), "--numerics", "exact")
    assert out.returncode == 0, out.stderr
    assert f"wrote {tmp_path / 'l.logits'}:" in out.stderr and not (tmp_path / "l.logits.npy").exists()  # the name given
    saved = np.load(tmp_path / "l.logits")
    assert saved.shape == (4, 32064) and saved.dtype == np.float32
    assert np.array_equal(saved, phi3ref.load(path, numerics="exact").logits([1, 32010, 1724, 338]))
    assert "last position argmax" in out.stderr


@pytest.mark.parametrize("tokens,message", [("1,x,3", "comma-separated integer ids"), ("1,99999", "token id 99999 is outside the vocabulary")])
@pytest.mark.slow  # a child process
def test_logits_command_bad_tokens(tiny_model, tmp_path, tokens, message):
    out = run("logits", "--model", str(tiny_model("phi3-mini", "Q4_0")), "--tokens", tokens, "-o", str(tmp_path / "l.npy"))
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_warmup_command(tiny_model, capsys):
    """phi3ref warmup compiles (or finds cached) the kernels of the file's weight types and says which."""
    assert main(["warmup", str(tiny_model("phi3-mini", "Q4_K_M")), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weight_types"] == ["Q4_K", "Q5_K", "Q6_K"] and out["numerics"] == "ggml" and out["compile_seconds"] >= 0
    assert main(["warmup", str(tiny_model("phi3-mini", "Q8_0")), "--numerics", "exact"]) == 0
    assert "the kernels of Q8_0 weights in ExactNumerics() are ready" in capsys.readouterr().out


def test_flags_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """Bad flags once were reported only after a download, a compile or a load."""
    import time

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where --model demo would be written
    text = tmp_path / "t.txt"
    text.write_text("some text", encoding="utf-8")
    start = time.perf_counter()
    for args, message in [
        (("generate", "--max-tokens", "-5"), "--max-tokens must be >= 0"),
        (("generate", "--n-ctx", "0"), "--n-ctx must be a positive integer"),
        (("generate", "--seed", "-1"), "--seed must be >= 0"),
        (("generate", "--threads", "0"), "--threads must be from 1"),
        (("generate", "--model", "demo", "--file", "x.gguf"), "--model demo has none"),
        (("logits", "--model", str(tmp_path / "nope.gguf"), "--tokens", "1", "-o", str(tmp_path / "l.npy")), "no such file"),
        (("logits", "--model", str(tmp_path), "--tokens", "1", "-o", str(tmp_path / "l.npy")), "a folder"),
        (("logits", "--model", "/tmp/" + "a" * 5000 + ".gguf", "--tokens", "1", "-o", str(tmp_path / "l.npy")), "not a usable path"),
        (("logits", "--model", str(vocab_path()), "--tokens", "1", "-o", str(tmp_path)), "a folder, not a file name"),
        (("perplexity", str(vocab_path()), "--text", str(tmp_path)), "a folder, not a text file"),
        (("compare", str(vocab_path()), "--against", "llama.cpp", "--text", str(tmp_path)), "a folder, not a text file"),
        (("compare", str(vocab_path()), "--text", str(text), "--save-kld-base", str(tmp_path)), "a folder, not a file name"),
        (("compare", str(vocab_path()), "--against", "transformers", "--tokens", "1,2", "--level", "avx2"), "--level picks a llama.cpp build"),
        (("compare", str(vocab_path()), "--against", "llama.cpp", "--tokens", "1,2", "--level", "sse2"), "unknown level 'sse2'"),
        (("write-model", str(tmp_path)), "a folder, not a file name"),
        (("write-model", str(tmp_path / "m.gguf"), "--seed", "-1"), "--seed must be >= 0"),
        (("write-model", "/dev/null"), "not a regular file (a device or a pipe), not written"),
        (("logits", "--model", str(vocab_path()), "--tokens", "1", "-o", "/dev/null"), "not a regular file"),
        (("perplexity", str(vocab_path()), "--text", "/dev/zero"), "--text /dev/zero: not a regular file"),
        (("logits", "--model", str(vocab_path()), "--tokens", "1,\u0663", "-o", str(tmp_path / "l.npy")), "comma-separated integer ids"),
        (("inspect", ""), "the path is empty"),
        (("logits", "--model", str(vocab_path()), "--tokens", "1", "-o", str(tmp_path / "no" / "l.npy")), "does not exist"),
        (("logits", "--model", str(vocab_path()), "--tokens", "1,2,3", "--n-ctx", "2", "-o", str(tmp_path / "l.npy")), "less than the 3 tokens"),
        (("warmup", str(tmp_path / "nope.gguf")), "no such file"),
        (("warmup", str(vocab_path()), "--threads", "0"), "--threads must be from 1"),
        (("warmup", str(vocab_path()), "--isa", "sse2"), "isa must be one of avx2"),
    ]:
        code = main(list(args))
        assert code in (1, 2) and message in capsys.readouterr().err, args
    assert not (tmp_path / "cache").exists()
    assert time.perf_counter() - start < 30  # nothing was downloaded, written, compiled or loaded


def test_cli_names_its_own_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    assert main(["generate", "--model", str(tmp_path), "--max-tokens", "1"]) == 1
    assert "name one with --file" in capsys.readouterr().err
    assert main(["generate", "--model", "someone/some-repo", "--max-tokens", "1"]) == 2
    assert "name it with --file" in capsys.readouterr().err
