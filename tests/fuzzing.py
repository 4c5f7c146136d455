"""Fuzzing phi3ref: hostile files, template payloads and careless calls, each case in a
forked child with a timeout and a memory limit.

A case ends in one of these outcomes; only the first two are acceptable:

    ok                 the file or call worked
    library-error      a documented phi3ref error (GGUFError, ValueError, TypeError,
                       NonFiniteError, ModelBusyError, FileNotFoundError, HubError)
                       raised by phi3ref's own code
    foreign-exception  any other exception, or a documented type raised from inside numpy,
                       tokenizers, jinja2 ... (the message would not name the problem)
    wrong-result       a check of the result failed (streamed pieces that do not join to the
                       text; logits after an interrupted or concurrent pass that differ
                       from a clean run's)
    signal             the child died of a signal (a crash: SIGSEGV, SIGABRT ...)
    timeout            the child ran past its time limit (a hang)
    memory             MemoryError, or the child hit its address-space limit

Kinds of case: ``structural`` (truncations, byte flips, extreme integers and floats in
every header field, inserted and deleted bytes, non-finite tensor data), ``semantic``
(valid files whose metadata lie: wrong types, out-of-range values, inconsistent sizes),
``template`` (hostile chat templates in a model file and given directly), ``api``
(misuse of the Python API; interrupts and interleaved use checked for silent damage).

The parent writes the seed corpus (``write_model`` files of every preset, several weight
types, SentencePiece and GPT-2 vocabularies), runs each seed once so that the kernels are
compiled before it forks, and then forks one child per case: no case pays for a compile.

    python tests/fuzzing.py --cases 30000 --seed 7 --out fuzz-report.json   # a long campaign
    python tests/fuzzing.py --cases 500 --boundscheck                      # Numba bounds checks on

``--boundscheck`` runs the campaign in a child Python with ``NUMBA_BOUNDSCHECK=1`` and a Numba
cache of its own, so that a kernel indexing outside an array raises IndexError (a
foreign exception) instead of corrupting memory silently.
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import json
import os
import re
import resource
import select
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # craft.py

from craft import gpt2_vocab, rewrite_gguf, small_spm_vocab  # noqa: E402
from gguf import GGUFValueType as VT  # noqa: E402

import phi3ref  # noqa: E402
from phi3ref.errors import ModelBusyError, NonFiniteError  # noqa: E402
from phi3ref.gguf_file import GGUFError, GGUFFile  # noqa: E402
from phi3ref.hub import HubError  # noqa: E402
from phi3ref.synthetic import write_model  # noqa: E402

PACKAGE_DIR = Path(phi3ref.__file__).resolve().parent
DOCUMENTED = (GGUFError, ValueError, TypeError, NonFiniteError, ModelBusyError, FileNotFoundError, HubError)
ACCEPTED = ("ok", "library-error")
KINDS = {"structural": 0.72, "semantic": 0.14, "template": 0.07, "api": 0.07}
CASE_SECONDS = 20.0
MEMORY_LIMIT = 2 * 2**30  # address space a child may add to what it inherits
PROMPT = "Write a haiku about ice hockey"

# The seed corpus: (name, write_model arguments, vocabulary). "real" is the full Phi-3
# vocabulary (its tokenizer takes half a second to build: fewer cases use it).
SEEDS = [
    ("phi3-mini-spm-Q4_K_M", dict(preset="phi3-mini", quant="Q4_K_M"), "spm"),
    ("phi3-medium-spm-Q8_0", dict(preset="phi3-medium", quant="Q8_0"), "spm"),
    ("phi3.5-mini-spm-Q4_0", dict(preset="phi3.5-mini", quant="Q4_0"), "spm"),
    ("phi4-mini-gpt2-Q4_K_M", dict(preset="phi4-mini", quant="Q4_K_M"), "gpt2"),
    ("phi3-mini-gpt2-Q6_K-window", dict(preset="phi3-mini", quant="Q6_K", sliding_window=8), "gpt2"),
    ("phi3-medium-spm-F16", dict(preset="phi3-medium", quant="F16", pure=True), "spm"),
    ("phi3-mini-spm-Q5_1", dict(preset="phi3-mini", quant="Q5_1"), "spm"),
    ("phi3-mini-real-Q4_K_M", dict(preset="phi3-mini", quant="Q4_K_M"), "real"),
]
SEED_WEIGHTS = np.array([1.0] * (len(SEEDS) - 1) + [0.15])


# ======================================================================================
# the seed corpus and its header fields
# ======================================================================================


def write_corpus(folder: Path) -> list[Path]:
    """Write the seed files (once: an existing file is kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocabs = {"spm": folder / "vocab-spm.gguf", "gpt2": folder / "vocab-gpt2.gguf", "real": None}
    if not vocabs["spm"].exists():
        small_spm_vocab(vocabs["spm"])
    if not vocabs["gpt2"].exists():
        gpt2_vocab(vocabs["gpt2"])
    paths = []
    for name, args, vocab in SEEDS:
        path = folder / f"{name}.gguf"
        if not path.exists():
            write_model(path, vocab=vocabs[vocab], seed=3, **args)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Field:
    """A number in a GGUF header: where, its struct format, and what it is."""

    offset: int
    fmt: str
    label: str


_FORMATS = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
    VT.FLOAT32: "<f", VT.BOOL: "<B", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}


def header_fields(data: bytes) -> tuple[list[Field], int]:
    """Every number of a (valid) GGUF header, and where the header ends. Long arrays
    contribute their first and last few items only."""
    fields: list[Field] = []
    pos = 0

    def take(fmt: str, label: str) -> int | float:
        nonlocal pos
        fields.append(Field(pos, fmt, label))
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string(label: str) -> str:
        nonlocal pos
        n = take("<Q", f"length of {label}")
        s = data[pos : pos + n].decode("utf-8", "replace")
        pos += n
        return s

    def value(vtype: int, label: str, record: bool = True) -> None:
        nonlocal pos
        if vtype == VT.STRING:
            string(label)
        elif vtype == VT.ARRAY:
            item = take("<I", f"item type of {label}")
            n = take("<Q", f"length of {label}")
            for i in range(n):
                keep = i < 3 or i >= n - 2
                if item == VT.STRING:
                    if keep:
                        string(f"{label}[{i}]")
                    else:
                        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
                elif item == VT.ARRAY:
                    value(VT.ARRAY, f"{label}[{i}]")
                elif keep:
                    take(_FORMATS[item], f"{label}[{i}]")
                else:
                    pos += struct.calcsize(_FORMATS[item])
        else:
            take(_FORMATS[vtype], label)

    pos = 4
    take("<I", "version")
    n_tensors = take("<Q", "tensor count")
    n_kv = take("<Q", "metadata count")
    for _ in range(n_kv):
        key = string("a key")
        vtype = take("<I", f"value type of {key}")
        value(vtype, key)
    for _ in range(n_tensors):
        name = string("a tensor name")
        n_dims = take("<I", f"dimension count of {name}")
        for d in range(n_dims):
            take("<Q", f"dimension {d} of {name}")
        take("<I", f"type of {name}")
        take("<Q", f"offset of {name}")
    return fields, pos


def _extremes(fmt: str, old: int | float, rng: np.random.Generator) -> list:
    if fmt in ("<f", "<d"):
        return [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, -1.0, 1e38, 1e-45, -old, old * 1e6]
    bits = 8 * struct.calcsize(fmt)
    signed = fmt.islower() and fmt != "<?"
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    candidates = [0, 1, 2, 3, hi, hi - 1, lo, 2 ** (bits // 2), old + 1, old - 1, old * 2, old * 1000, int(rng.integers(0, 2**31))]
    if signed:
        candidates += [-1, -5]
    else:
        candidates += [2 ** (bits - 1), 2 ** (bits - 1) + 1]
    return [c for c in candidates if lo <= c <= hi]


# ======================================================================================
# cases
# ======================================================================================


@dataclass
class Case:
    """One fuzz case: ``run(workdir)`` is called in the child."""

    kind: str
    label: str
    run: Callable[[Path], Any]
    extra: dict = field(default_factory=dict)


def exercise_file(path: Path, numerics: str = "ggml") -> None:
    """What a user does with a downloaded file: inspect it, load it, tokenize, run logits,
    generate a few tokens streaming (the pieces must join to the text)."""
    from phi3ref.generate import generate
    from phi3ref.file_report import describe
    from phi3ref.file_report import format_report as inspect_report
    from phi3ref.loading import model_from_file

    json.dumps(describe(path))
    inspect_report(describe(path))
    gguf = GGUFFile(path)
    try:
        model = model_from_file(gguf, n_ctx=64, numerics=numerics)
        tok = model.tokenizer
        ids = tok.encode(PROMPT)
        if ids:
            model.logits(ids[:8])
        tok.decode(list(range(min(tok.n_vocab, 400))))
        stream = generate(PROMPT, model=model, max_tokens=5, seed=1, stream=True)
        pieces = list(stream)
        if "".join(pieces) != stream.result.text:
            raise WrongResult(f"streamed pieces {pieces!r} do not join to the text {stream.result.text!r}")
    finally:
        gguf.close()


class WrongResult(Exception):
    """A result that a check found wrong (a silent error, had nobody looked)."""


def structural_case(seed_path: Path, data: bytes, fields: list[Field], header_end: int, rng: np.random.Generator, numerics: str) -> Case:
    mutated = bytearray(data)
    what = rng.choice(["truncate", "flip", "field", "field", "field", "insert", "delete", "tensor-data"])
    if what == "truncate":
        at = int(rng.integers(0, header_end + 64)) if rng.random() < 0.8 else int(rng.integers(0, len(data)))
        mutated = mutated[:at]
        label = f"truncated at {at}"
    elif what == "flip":
        n = int(rng.integers(1, 9))
        region = header_end if rng.random() < 0.85 else len(data)
        spots = rng.integers(0, region, n)
        for s in spots:
            mutated[s] ^= 1 << int(rng.integers(0, 8))
        label = f"bits flipped at {sorted(int(s) for s in spots)}"
    elif what == "field":
        f = fields[int(rng.integers(0, len(fields)))]
        (old,) = struct.unpack_from(f.fmt, data, f.offset)
        options = _extremes(f.fmt, old, rng)
        new = options[int(rng.integers(0, len(options)))]
        struct.pack_into(f.fmt, mutated, f.offset, new)
        label = f"{f.label}: {old} -> {new}"
    elif what == "insert":
        at = int(rng.integers(0, header_end))
        junk = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        mutated[at:at] = junk
        label = f"{len(junk)} bytes inserted at {at}"
    elif what == "delete":
        at = int(rng.integers(0, header_end))
        n = int(rng.integers(1, 16))
        del mutated[at : at + n]
        label = f"{n} bytes deleted at {at}"
    else:  # non-finite or huge values in a float tensor's data (norm weights are F32)
        with GGUFFile(seed_path) as gf:
            floats = [t for t in gf.tensors.values() if t.type_name in ("F32", "F16")]
            t = floats[int(rng.integers(0, len(floats)))]
            start, n = t.offset, t.n_bytes
        value = [b"\x00\x00\x80\x7f", b"\x00\x00\xc0\x7f", b"\xff\xff\x7f\x7f"][int(rng.integers(0, 3))]
        if t.type_name == "F16":
            value = [b"\x00\x7c", b"\x00\x7e", b"\xff\x7b"][int(rng.integers(0, 3))]
        at = start + int(rng.integers(0, n // len(value))) * len(value)
        mutated[at : at + len(value)] = value
        label = f"tensor {t.name} ({t.type_name}): {value.hex()} at byte {at - start}"
    payload = bytes(mutated)

    def run(work: Path) -> None:
        path = work / "case.gguf"
        path.write_bytes(payload)
        exercise_file(path, numerics)

    return Case("structural", f"{seed_path.stem}: {label}", run, {"numerics": numerics})


def _semantic_lies(gf: GGUFFile) -> list[tuple[str, dict, tuple]]:
    """(label, set_kv, drop) lies about one key of a valid file."""
    n_tokens = len(gf.get_array("tokenizer.ggml.tokens"))
    ints = [k for k, t in gf.value_types.items() if k.startswith("phi3.") and "int" in t]
    floats = [k for k, t in gf.value_types.items() if k.startswith("phi3.") and "float" in t]
    lies = []
    for key in ints + ["phi3.attention.sliding_window", "phi3.rope.scaling.original_context_length", "phi3.vocab_size",
                       "phi3.attention.key_length", "phi3.attention.value_length"]:
        for vtype, value in [(VT.INT32, -1), (VT.INT32, -5), (VT.UINT32, 0), (VT.UINT32, 1), (VT.UINT32, 2**31 - 1),
                             (VT.UINT64, 2**63), (VT.UINT64, 2**64 - 1), (VT.UINT64, 10**7), (VT.FLOAT32, float("inf")),
                             (VT.STRING, "12"), (VT.UINT32, n_tokens + 2), (VT.UINT32, n_tokens - 2), (VT.BOOL, True)]:
            lies.append((f"{key} = {value!r} as {vtype.name}", {key: (vtype, value)}, ()))
        lies.append((f"{key} dropped", {}, (key,)))
    for key in floats + ["phi3.rope.scaling.attn_factor", "phi3.rope.freq_base", "phi3.attention.layer_norm_rms_epsilon"]:
        for value in [float("inf"), float("nan"), 0.0, -1.0, 1e-45, 3.4e38]:
            lies.append((f"{key} = {value}", {key: (VT.FLOAT32, value)}, ()))
        for value in [1e300, 1e-300, 5e-324]:  # finite as float64, inf or 0 as float32
            lies.append((f"{key} = {value} (FLOAT64)", {key: (VT.FLOAT64, value)}, ()))
        lies.append((f"{key} as string", {key: (VT.STRING, "1e-5")}, ()))
    for key in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"]:
        for spec in [(VT.FLOAT32, float("inf")), (VT.INT32, -1), (VT.UINT32, n_tokens), (VT.UINT64, 2**64 - 1),
                     (VT.ARRAY, [1, 2], VT.INT32), (VT.STRING, "<s>"), (VT.FLOAT64, 1.5)]:
            lies.append((f"{key} = {spec[1]!r}", {key: spec}, ()))
    tokens = list(gf.get_array("tokenizer.ggml.tokens"))
    n_ints = lambda value: (VT.ARRAY, [value] * n_tokens, VT.INT32)  # noqa: E731
    for label, changed in [
        ("a token twice", tokens[:20] + [tokens[19]] + tokens[21:]),
        ("a token of 400,000 characters", tokens[:20] + ["x" * 400_000] + tokens[21:]),
        ("a token of 5,000 characters", tokens[:20] + ["y" * 5_000] + tokens[21:]),
        ("an empty token", tokens[:20] + [""] + tokens[21:]),
        ("a token with NUL", tokens[:20] + ["a\x00b"] + tokens[21:]),
        ("tokens whose every cut is a token", tokens + ["\ua66e" * k for k in range(1, 700)]),
    ]:
        lies.append((f"tokenizer.ggml.tokens: {label}", {"tokenizer.ggml.tokens": (VT.ARRAY, changed, VT.STRING),
                                                         **({} if len(changed) == n_tokens else {"tokenizer.ggml.token_type": (VT.ARRAY, [1] * len(changed), VT.INT32),
                                                                                                 "tokenizer.ggml.scores": (VT.ARRAY, [0.0] * len(changed), VT.FLOAT32)})}, ()))
    lies.append(("every token a control token", {"tokenizer.ggml.token_type": n_ints(3)}, ()))
    lies.append(("every token unused", {"tokenizer.ggml.token_type": n_ints(5)}, ()))
    for key, specs in {
        "tokenizer.ggml.pre": [(VT.ARRAY, ["gpt2"], VT.STRING), (VT.STRING, "nonsense"), (VT.UINT32, 3)],
        "tokenizer.ggml.model": [(VT.STRING, "bert"), (VT.ARRAY, ["llama"], VT.STRING), (VT.UINT32, 1), (VT.STRING, "gpt2"), (VT.STRING, "llama")],
        "tokenizer.chat_template": [(VT.UINT32, 7), (VT.ARRAY, ["{{ x }}"], VT.STRING), (VT.STRING, "{% for %}"), (VT.STRING, "")],
        "tokenizer.ggml.add_bos_token": [(VT.UINT32, 2), (VT.STRING, "yes")],
        "tokenizer.ggml.tokens": [(VT.ARRAY, list(range(n_tokens)), VT.INT32), (VT.ARRAY, ["a"] * n_tokens, VT.STRING),
                                  (VT.ARRAY, [], VT.STRING), (VT.STRING, "abc"), (VT.ARRAY, ["x"] * (n_tokens - 3), VT.STRING)],
        "tokenizer.ggml.token_type": [(VT.ARRAY, [1] * (n_tokens - 1), VT.INT32), (VT.ARRAY, [99] * n_tokens, VT.INT32),
                                      (VT.ARRAY, ["1"] * n_tokens, VT.STRING), (VT.ARRAY, [6] * n_tokens, VT.INT32),
                                      (VT.ARRAY, [1.0] * n_tokens, VT.FLOAT32)],
        "tokenizer.ggml.scores": [(VT.ARRAY, [0.0] * (n_tokens + 1), VT.FLOAT32), (VT.ARRAY, [float("nan")] * n_tokens, VT.FLOAT32),
                                  (VT.ARRAY, ["0"] * n_tokens, VT.STRING)],
        "tokenizer.ggml.merges": [(VT.ARRAY, ["Ġ zzzz", "a b"], VT.STRING), (VT.ARRAY, ["nospace"], VT.STRING), (VT.ARRAY, [], VT.STRING),
                                  (VT.ARRAY, [1, 2], VT.INT32)],
        "general.architecture": [(VT.STRING, "llama"), (VT.UINT32, 3), (VT.STRING, "")],
        "general.alignment": [(VT.UINT32, 0), (VT.UINT32, 3), (VT.UINT64, 32), (VT.UINT32, 1 << 31)],
        "general.name": [(VT.UINT32, 5), (VT.STRING, "phi3 " * 1000)],
    }.items():
        for spec in specs:
            lies.append((f"{key} = {str(spec[1])[:40]} ({spec[0].name})", {key: spec}, ()))
        lies.append((f"{key} dropped", {}, (key,)))
    return lies


def semantic_case(seed_path: Path, rng: np.random.Generator, numerics: str) -> Case:
    with GGUFFile(seed_path) as gf:
        lies = _semantic_lies(gf)
        tensor_lies = [t.name for t in gf.tensors.values() if t.type_name == "F32" and len(t.shape) == 1]
    if rng.random() < 0.1:  # a norm or rope-factor vector full of one bad value
        name = tensor_lies[int(rng.integers(0, len(tensor_lies)))]
        value = [np.inf, -np.inf, np.nan, 0.0, -1.0, 3e38][int(rng.integers(0, 6))]
        with GGUFFile(seed_path) as gf:
            n = gf.tensors[name].n_bytes
        label, set_kv, drop, data = f"{name} all {value}", {}, (), {name: np.full(n // 4, value, np.float32).tobytes()}
    else:
        label, set_kv, drop = lies[int(rng.integers(0, len(lies)))]
        data = None

    def run(work: Path) -> None:
        path = rewrite_gguf(seed_path, work / "case.gguf", set_kv=set_kv, drop=drop, tensor_data=data)
        exercise_file(path, numerics)

    return Case("semantic", f"{seed_path.stem}: {label}", run, {"numerics": numerics})


TEMPLATE_PAYLOADS = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ lipsum(n=10**7) }}", "{{ lipsum(n=100000) }}", "{{ 'a' * 10**10 }}", "{{ '%10000000000s' | format('x') }}",
    "{{ '%*s' | format(10**9, 'x') }}", "{{ '{:>9999999999}'.format(1) }}", "{{ 'x'.ljust(10**9) }}", "{{ 'x'.center(10**9) }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "{% include 'x' %}", "{% extends 'x' %}", "{% import 'x' as y %}",
    "{% from 'x' import y %}", "{{ messages[99]['content'] }}", "{{ 1 / 0 }}", "{{ 10 ** 10 ** 10 }}", "{{ 2 ** 100000 }}",
    "{% set ns = namespace(x='a') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x | length }}",
    "{{ [1] * 10**9 }}", "{{ ().__class__.__base__.__subclasses__() }}", "{{ cycler.__init__.__globals__ }}",
    "{{ self.__init__.__globals__.__builtins__ }}", "{{ 'a' | center(10**9) }}", "{{ 'a' | indent(10**9) }}",
    "{{ range(100000) | list | join(',') * 100 }}", "{{ 'ab' | batch(10**9) | list }}", "{{ 'x' | wordwrap(10**9) }}",
    "{% for i in range(100000) %}{{ 'a' * 1000000 }}{% endfor %}", "{{ (2 ** 4096) * (2 ** 4096) }}",
    "{{ '{:{}}'.format(1, 10**9) }}", "{{ raise_exception('bad template') }}", "{{ 'a' ~ 1 }}{% ", "{{ x | nosuchfilter }}",
    "{{ messages | map(attribute='role') | join * 10**8 }}", "{% for m in messages %}{{ m.content.__class__ }}{% endfor %}",
    "{{ '\\ud800' }}", "{{ bos_token * 10**7 }}", "{% set x = [] %}{{ x.append(1) }}", "{{ {}.update(a=1) }}",
    "{{ dict(a=1).pop('a') }}", "{{ 9 ** 9 ** 9 }}", "{% for i in range(10**6) %}x{% endfor %}", "{{ joiner()() * 10**9 }}",
    "{{ ''.join(['a'] * 100) * 10**6 }}", "{{ '%s' % ('a' * 10**6,) * 100 }}", "{{ [0] * 10**6 + [0] * 10**6 + [0] * 10**6 }}",
    "{{ 'x' | truncate(10**12) }}", "{{ 'a'.zfill(10**9) }}", "{{ 'a\\tb'.expandtabs(10**9) }}",
    "{{ '{0:{1}}'.format('a', '9' * 9) }}", "{{ '%-99999999999d' % 1 }}",
    # one call that allocates gigabytes, or runs for minutes inside C (no trace function sees it)
    "{{ ('a' * 999999).replace('a', 'a' * 2400) | length }}", "{{ (('%999999s' * 2400) % ((1,) * 2400)) | length }}",
    "{{ ('\t' * 2400).expandtabs(999999) | length }}", "{{ ('x' * 999999).join(('a' * 2000) | list) | length }}",
    "{{ (([[1, 2, 3]] * 100000) | sum(start=[])) | length }}", "{{ ('a' * 999999).translate({97: 'b' * 999}) | length }}",
    "{{ ('\n' * 999999) | indent(999) | length }}", "{{ ('a' * 999999) | wordwrap(1, wrapstring='b' * 999) | length }}",
    "{{ range(999999) | list | tojson(indent=999) | length }}", "{{ ('{:999999}' * 2000).format(*range(2000)) | length }}",
]


def template_case(seed_path: Path, rng: np.random.Generator) -> Case:
    payload = TEMPLATE_PAYLOADS[int(rng.integers(0, len(TEMPLATE_PAYLOADS)))]
    direct = rng.random() < 0.5

    def run(work: Path) -> None:
        if direct:
            from phi3ref.chat_template import render_chat

            render_chat([{"role": "user", "content": PROMPT}], payload)
        else:
            path = rewrite_gguf(seed_path, work / "case.gguf", set_kv={"tokenizer.chat_template": (VT.STRING, payload)})
            exercise_file(path)

    return Case("template", f"{'render_chat' if direct else seed_path.stem}: {payload[:60]}", run)


# -- API misuse -------------------------------------------------------------------------


def _misuse_calls() -> list[tuple[str, Callable]]:
    """(label, f(model_path)) calls a careless user makes."""
    from phi3ref import Chat, generate, load
    from phi3ref.sampler import SamplingParams, sample

    def with_model(f: Callable) -> Callable:
        return lambda path: f(load(path, n_ctx=64))

    calls = [
        ("logits([2**63])", with_model(lambda m: m.logits([2**63]))),
        ("logits([-1])", with_model(lambda m: m.logits([-1]))),
        ("logits([])", with_model(lambda m: m.logits([]))),
        ("logits('abc')", with_model(lambda m: m.logits("abc"))),
        ("logits([[1, 2]])", with_model(lambda m: m.logits([[1, 2]]))),
        ("logits([1.5])", with_model(lambda m: m.logits([1.5]))),
        ("logits(None)", with_model(lambda m: m.logits(None))),
        ("logits(100 tokens, n_ctx 64)", with_model(lambda m: m.logits([1] * 100))),
        ("forward(start_pos=-1)", with_model(lambda m: m.forward([1], -1))),
        ("forward(start_pos=5) on empty", with_model(lambda m: m.forward([1], 5))),
        ("forward(start_pos=2**70)", with_model(lambda m: m.forward([1], 2**70))),
        ("forward(start_pos='0')", with_model(lambda m: m.forward([1], "0"))),
        ("trace(1000 tokens)", with_model(lambda m: m.trace([1] * 1000))),
        ("generate(stop=None)", with_model(lambda m: generate("hi", model=m, stop=None, max_tokens=2))),
        ("generate(stop=[5])", with_model(lambda m: generate("hi", model=m, stop=[5], max_tokens=2))),
        ("generate(stop=5)", with_model(lambda m: generate("hi", model=m, stop=5, max_tokens=2))),
        ("generate(max_tokens=-5)", with_model(lambda m: generate("hi", model=m, max_tokens=-5))),
        ("generate(max_tokens=2.5)", with_model(lambda m: generate("hi", model=m, max_tokens=2.5))),
        ("generate(temperature=nan)", with_model(lambda m: generate("hi", model=m, temperature=float("nan")))),
        ("generate(temperature=-1)", with_model(lambda m: generate("hi", model=m, temperature=-1))),
        ("generate(top_k=0)", with_model(lambda m: generate("hi", model=m, top_k=0))),
        ("generate(top_p=2)", with_model(lambda m: generate("hi", model=m, top_p=2))),
        ("generate(min_p=-1)", with_model(lambda m: generate("hi", model=m, min_p=-1))),
        ("generate(repeat_last_n=-1)", with_model(lambda m: generate("hi", model=m, repeat_last_n=-1))),
        ("generate(seed=-1)", with_model(lambda m: generate("hi", model=m, seed=-1))),
        ("generate(seed='x')", with_model(lambda m: generate("hi", model=m, seed="x"))),
        ("generate(prompt=5)", with_model(lambda m: generate(5, model=m))),
        ("generate(prompt and messages)", with_model(lambda m: generate("hi", messages=[{"role": "user", "content": "x"}], model=m))),
        ("generate(lone surrogate)", with_model(lambda m: generate("hi \ud800 there", model=m, max_tokens=2))),
        ("generate(messages=[{'role': 'robot'}])", with_model(lambda m: generate(messages=[{"role": "robot", "content": "x"}], model=m))),
        ("generate(messages='hi')", with_model(lambda m: generate(messages="hi", model=m))),
        ("generate(messages=[{'role': 'user', 'content': 5}])", with_model(lambda m: generate(messages=[{"role": "user", "content": 5}], model=m))),
        ("generate(prompt too long)", with_model(lambda m: generate("hockey " * 500, model=m))),
        ("generate(system=5)", with_model(lambda m: generate("hi", model=m, system=5))),
        ("Chat(temperature=-1)", with_model(lambda m: Chat(m, temperature=-1))),
        ("Chat(bogus=1)", with_model(lambda m: Chat(m, bogus=1))),
        ("Chat(max_tokens=-1)", with_model(lambda m: Chat(m, max_tokens=-1))),
        ("Chat.send(None)", with_model(lambda m: Chat(m, max_tokens=2).send(None))),
        ("tokenizer.decode([2**63])", with_model(lambda m: m.tokenizer.decode([2**63]))),
        ("tokenizer.decode(['a'])", with_model(lambda m: m.tokenizer.decode(["a"]))),
        ("tokenizer.encode(b'x')", with_model(lambda m: m.tokenizer.encode(b"x"))),
        ("tokenizer.encode(surrogate)", with_model(lambda m: m.tokenizer.encode("\udfff"))),
        ("load(n_ctx=10**12)", lambda path: load(path, n_ctx=10**12)),
        ("load(n_ctx=0)", lambda path: load(path, n_ctx=0)),
        ("load(n_ctx=True)", lambda path: load(path, n_ctx=True)),
        ("load(n_ctx=10**5)", lambda path: load(path, n_ctx=10**5).logits([1, 2])),
        ("load(numerics='fast')", lambda path: load(path, numerics="fast")),
        ("load(threads=0)", lambda path: load(path, threads=0)),
        ("load(threads=10**6)", lambda path: load(path, threads=10**6)),
        ("load(n_ubatch=0)", lambda path: load(path, n_ubatch=0)),
        ("load(isa='avx9000')", lambda path: load(path, isa="avx9000")),
        ("load(folder)", lambda path: load(path.parent)),
        ("load(missing)", lambda path: load(path.parent / "missing.gguf")),
        ("load(5)", lambda path: load(5)),
        ("load(tokenizer='nope.json')", lambda path: load(path, tokenizer=path.parent / "nope.json")),
        ("run_with_hooks(unknown point)", with_model(lambda m: m.run_with_hooks([1, 2], {"l_out-99": lambda v, n: None}))),
        ("run_with_hooks(wrong shape)", with_model(lambda m: m.run_with_hooks([1, 2], {"kq-*": lambda v, n: v[..., :1]}))),
        ("run_with_hooks(NaN)", with_model(lambda m: m.run_with_hooks([1, 2], {"Kcur-0": lambda v, n: v * np.nan}))),
        ("run_with_hooks(a str)", with_model(lambda m: m.run_with_hooks([1, 2], {"Qcur-1": lambda v, n: "x"}))),
        ("run_with_hooks(a list)", with_model(lambda m: m.run_with_hooks([1, 2], [("l_out-0", print)]))),
        ("run_with_hooks(a pass inside)", with_model(lambda m: m.run_with_hooks([1, 2], {"l_out-0": lambda v, n: m.logits([3])}))),
        ("run_with_cache(names=5)", with_model(lambda m: m.run_with_cache([1, 2], 5))),
        ("forward(hooks=[])", with_model(lambda m: m.forward([1, 2], 0, hooks=[]))),
        ("SamplingParams(top_k=True)", lambda path: SamplingParams(top_k=True)),
        ("sample(2-D logits)", lambda path: sample(np.zeros((2, 3)), SamplingParams(), np.random.default_rng(0))),
        ("sample(NaN logits)", lambda path: sample(np.full(5, np.nan, np.float32), SamplingParams(), np.random.default_rng(0))),
        ("sample(all -inf)", lambda path: sample(np.full(5, -np.inf, np.float32), SamplingParams(), np.random.default_rng(0))),
        ("sample(recent out of range)", lambda path: sample(np.zeros(5, np.float32), SamplingParams(repeat_penalty=1.3), np.random.default_rng(0), [99])),
        ("sample(rng=None)", lambda path: sample(np.zeros(5, np.float32), SamplingParams(), None)),
        ("sample(recent=None)", lambda path: sample(np.zeros(5, np.float32), SamplingParams(repeat_penalty=1.3), np.random.default_rng(0), None)),
        ("sample(recent=['a'])", lambda path: sample(np.zeros(5, np.float32), SamplingParams(repeat_penalty=1.3), np.random.default_rng(0), ["a"])),
        ("sample(temperature=1e-50, logits < 0)", lambda path: sample(-np.arange(1, 6, dtype=np.float32), SamplingParams(temperature=1e-50), np.random.default_rng(0))),
        ("SamplingParams(temperature=10**400)", lambda path: SamplingParams(temperature=10**400)),
        ("SamplingParams(top_p='0.5')", lambda path: SamplingParams(top_p="0.5")),
        ("generate(temperature=10**400)", with_model(lambda m: generate("hi", model=m, temperature=10**400))),
        ("generate('', raw=True)", with_model(lambda m: generate("", model=m, raw=True, max_tokens=2))),
        ("generate(tokens=np.array(5))", with_model(lambda m: generate(tokens=np.array(5), model=m))),
        ("generate(tokens=[True])", with_model(lambda m: generate(tokens=[True], model=m))),
        ("generate(stream='yes')", with_model(lambda m: generate("hi", model=m, stream="yes"))),
        ("Chat(seed=-1)", with_model(lambda m: Chat(m, seed=-1))),
        ("Chat(seed='x')", with_model(lambda m: Chat(m, seed="x"))),
        ("Chat(system=5)", with_model(lambda m: Chat(m, system=5))),
        ("Chat(missing, temperature=-1)", lambda path: Chat(path.parent / "missing.gguf", temperature=-1)),
        ("logits([True, False])", with_model(lambda m: m.logits([True, False]))),
        ("logits({1, 2})", with_model(lambda m: m.logits({1, 2}))),
        ("logits({1: 2})", with_model(lambda m: m.logits({1: 2}))),
        ("forward(all_logits='yes')", with_model(lambda m: m.forward([1], 0, all_logits="yes"))),
        ("forward(expect_version='x')", with_model(lambda m: m.forward([1], 0, expect_version="x"))),
        ("run_with_hooks(complex)", with_model(lambda m: m.run_with_hooks([1, 2], {"l_out-0": lambda v, n: v + 1j}))),
        ("run_with_hooks(digit strings)", with_model(lambda m: m.run_with_hooks([1, 2], {"l_out-0": lambda v, n: v.astype(str)}))),
        ("tokenizer.token_text(-1)", with_model(lambda m: m.tokenizer.token_text(-1))),
        ("tokenizer.token_text(2**64)", with_model(lambda m: m.tokenizer.token_text(2**64))),
        ("tokenizer.token_text(1.7)", with_model(lambda m: m.tokenizer.token_text(1.7))),
        ("tokenizer.is_special('x')", with_model(lambda m: m.tokenizer.is_special("x"))),
        ("load(a name too long)", lambda path: load("/tmp/" + "a" * 5000 + ".gguf")),
        ("load('/dev/zero')", lambda path: load("/dev/zero")),
        ("load(tokenizer=5)", lambda path: load(path, tokenizer=5)),
    ]
    return calls


def check_interrupt(path: Path, rng: np.random.Generator) -> None:
    """Ctrl-C at a random moment of a pass, then the model must go on exactly as a model
    that never saw the interrupted call (its tokens say what the cache holds)."""
    from phi3ref import load

    numerics = ["ggml", "exact"][int(rng.integers(0, 2))]
    model, clean = load(path, n_ctx=64, numerics=numerics), load(path, n_ctx=64, numerics=numerics)
    n_vocab = model.config.n_vocab
    a = rng.integers(0, n_vocab, int(rng.integers(2, 20))).tolist()
    b = rng.integers(0, n_vocab, int(rng.integers(1, 20))).tolist()
    c = rng.integers(0, n_vocab, 3).tolist()
    start = int(rng.integers(0, len(a) + 1))  # an overwrite (start < len(a)) or an append
    model.forward(a, 0)
    clean.forward(a, 0)
    t0 = time.perf_counter()
    model.forward(b, start)  # how long the pass takes, to aim the interrupt inside it
    duration = time.perf_counter() - t0
    model.reset()
    model.forward(a, 0)
    armed = [True]

    def ctrl_c(*_: object) -> None:
        if armed[0]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, ctrl_c)
    try:
        try:
            # (armed inside the try: a short timer may ring before the pass begins)
            signal.setitimer(signal.ITIMER_REAL, max(1e-5, float(rng.random()) * duration * 1.2))
            model.forward(b, start)
        finally:
            armed[0] = False  # (an interrupt here is caught below too)
            signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:
        pass
    kept = list(model.tokens)
    if kept == a[:start] + b:
        clean.forward(b, start)
    elif kept != a[:start] and kept != a:  # (the old context: the interrupt came before the pass began)
        raise WrongResult(f"after the interrupt the model holds {len(kept)} tokens that are neither the old context nor the new one")
    clean.tokens = list(kept)  # the clean model holds the same positions, computed cleanly
    ours, theirs = model.forward(c, len(kept)), clean.forward(c, len(kept))
    if not np.array_equal(ours, theirs):
        raise WrongResult(f"logits after an interrupt differ from a clean run's by {np.abs(ours - theirs).max()}")


def check_interleaved_streams(path: Path, rng: np.random.Generator) -> None:
    """Two streaming generations on one model, read in turns: the later one must be right
    and the earlier one must stop with ModelBusyError, never go on wrong."""
    from phi3ref import generate, load

    model = load(path, n_ctx=64)
    alone = generate("one", model=model, max_tokens=4, seed=1, temperature=0)
    first = generate("two", model=model, max_tokens=4, seed=2, stream=True)
    second = generate("one", model=model, max_tokens=4, seed=1, temperature=0, stream=True)
    got_busy = False
    try:
        next(first, None)
        out = list(second)
        next(first, None)
        next(first, None)
    except ModelBusyError:
        got_busy = True
        out = list(second)
    if "".join(out) != alone.text:
        raise WrongResult(f"the second stream gave {''.join(out)!r}, alone it gives {alone.text!r}")
    if not got_busy and first.result.tokens:
        raise WrongResult("the first stream went on after another stream moved the model")


def check_threads(path: Path, rng: np.random.Generator) -> None:
    """Two threads generating on one model take turns: each gets what it gets alone."""
    from phi3ref import generate, load

    model = load(path, n_ctx=64)
    alone = [generate(p, model=model, max_tokens=6, seed=s).tokens for p, s in (("one", 1), ("two", 2))]
    results: dict[int, Any] = {}

    def worker(i: int, prompt: str, seed: int) -> None:
        try:
            results[i] = generate(prompt, model=model, max_tokens=6, seed=seed).tokens
        except BaseException as e:  # noqa: BLE001 (reported below)
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i, p, s)) for i, (p, s) in enumerate((("one", 1), ("two", 2)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        if isinstance(results[i], BaseException):
            raise results[i]
        if results[i] != alone[i]:
            raise WrongResult(f"thread {i} generated {results[i]}, alone {alone[i]}")


def api_case(seed_path: Path, rng: np.random.Generator) -> Case:
    checks = [("interrupt mid-pass", check_interrupt)] * 6 + [("interleaved streams", check_interleaved_streams),
                                                              ("two threads", check_threads)]
    calls = _misuse_calls()
    if rng.random() < 0.35:
        label, check = checks[int(rng.integers(0, len(checks)))]
        sub = np.random.default_rng(int(rng.integers(0, 2**63)))
        return Case("api", f"{seed_path.stem}: {label}", lambda work: check(seed_path, sub))
    label, call = calls[int(rng.integers(0, len(calls)))]
    return Case("api", f"{seed_path.stem}: {label}", lambda work: call(seed_path))


def make_case(index: int, seed: int, seeds: list[Path], blobs: dict, kinds: dict[str, float]) -> Case:
    """Case ``index`` of the campaign ``seed``: the same pair gives the same case."""
    rng = np.random.default_rng([seed, index])
    names = list(kinds)
    p = np.array([kinds[k] for k in names])
    kind = names[int(rng.choice(len(names), p=p / p.sum()))]
    w = SEED_WEIGHTS / SEED_WEIGHTS.sum()
    seed_path = seeds[int(rng.choice(len(seeds), p=w))]
    numerics = ["ggml", "ggml", "ggml", "exact", "numpy"][int(rng.integers(0, 5))]
    if kind == "structural":
        data, fields, end = blobs[seed_path]
        return structural_case(seed_path, data, fields, end, rng, numerics)
    if kind == "semantic":
        return semantic_case(seed_path, rng, numerics)
    if kind == "template":
        return template_case(seed_path, rng)
    return api_case(seed_path, rng)


# ======================================================================================
# running cases in children
# ======================================================================================


def _raised_by_phi3ref(e: BaseException) -> bool:
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def _classify(e: BaseException) -> str:
    if isinstance(e, WrongResult):
        return "wrong-result"
    if isinstance(e, MemoryError):
        return "memory"
    if isinstance(e, DOCUMENTED) and _raised_by_phi3ref(e):
        return "library-error"
    return "foreign-exception"


def _vm_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def run_case(case: Case, work: Path, seconds: float = CASE_SECONDS) -> dict:
    """Run ``case`` in a forked child; its outcome, with the exception if there was one."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        report: dict[str, Any] = {"outcome": "ok"}
        faulthandler.disable()  # a crash is the parent's to report, not a traceback on the terminal
        try:
            limit = _vm_bytes() + MEMORY_LIMIT
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            sys.stderr = sys.stdout = io.StringIO()  # chatty libraries stay quiet
            case_dir = work / f"case-{os.getpid()}"
            case_dir.mkdir()
            case.run(case_dir)
        except BaseException as e:  # noqa: BLE001 (every outcome is reported)
            report = {"outcome": _classify(e), "error": f"{type(e).__name__}: {str(e)[:300]}",
                      "where": "".join(traceback.format_tb(e.__traceback__)[-2:])[-600:]}
        try:
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, deadline, timed_out = [], time.monotonic() + seconds, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_end], [], [], left)
        if ready:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read_end)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    for leftover in work.glob(f"case-{pid}"):
        for f in leftover.iterdir():
            f.unlink()
        leftover.rmdir()
    if timed_out:
        return {"outcome": "timeout"}
    if os.WIFSIGNALED(status):
        return {"outcome": "signal", "error": signal.Signals(os.WTERMSIG(status)).name}
    if not chunks:
        return {"outcome": "signal", "error": f"the child exited with status {os.WEXITSTATUS(status)} without a report"}
    return json.loads(b"".join(chunks))


def warm_up(seeds: list[Path]) -> float:
    """Compile, before any fork, the kernels that the seeds' weight types use in every
    numerics (a child that compiles would pay seconds for each case)."""
    from phi3ref import load

    t0 = time.perf_counter()
    for path in seeds:
        for numerics in ("ggml", "exact"):
            m = load(path, n_ctx=64, numerics=numerics)
            m.logits([1, 2, 3])
            m.forward([4], 3)
    return time.perf_counter() - t0


def campaign(n_cases: int, seed: int = 0, *, kinds: dict[str, float] | None = None, folder: Path | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """Run ``n_cases`` cases of campaign ``seed``; a report of outcomes by kind and every
    case whose outcome is not acceptable (its index reproduces it)."""
    if sys.platform != "linux":
        raise RuntimeError("the fuzz harness forks children and reads /proc: it runs on Linux")
    kinds = kinds or KINDS
    with tempfile.TemporaryDirectory(prefix="phi3ref-fuzz-") as tmp:
        folder = folder or Path(tmp) / "corpus"
        seeds = write_corpus(folder)
        blobs = {}
        for path in seeds:
            data = path.read_bytes()
            fields, end = header_fields(data)
            blobs[path] = (data, fields, end)
        compile_s = warm_up(seeds)
        work = Path(tmp) / "work"
        work.mkdir()
        counts: Counter = Counter()
        messages: Counter = Counter()
        failures = []
        t0 = time.perf_counter()
        for i in range(n_cases):
            case = make_case(i, seed, seeds, blobs, kinds)
            result = run_case(case, work)
            counts[(case.kind, result["outcome"])] += 1
            if result["outcome"] == "library-error":
                # the gist of the message: its words, without the file's path and numbers
                gist = re.sub(r"\S*/\S*|[-+]?\d[\d.e+-]*|'[^']*'", "_", result["error"].split(":", 1)[0] + ":" + result["error"].split(": ", 2)[-1])
                messages[gist[:90]] += 1
            if result["outcome"] not in ACCEPTED:
                failures.append({"index": i, "kind": case.kind, "case": case.label, **case.extra, **result})
            if progress and (i + 1) % 500 == 0:
                progress(f"{i + 1}/{n_cases} cases, {len(failures)} unacceptable, {time.perf_counter() - t0:.0f} s")
        seconds = time.perf_counter() - t0
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, outcome), n in sorted(counts.items()):
        by_kind.setdefault(kind, {})[outcome] = n
    return {"cases": n_cases, "seed": seed, "seconds": round(seconds, 1), "compile_seconds": round(compile_s, 1),
            "by_kind": by_kind, "failures": failures, "library_errors": dict(messages.most_common())}


def format_report(report: dict) -> str:
    lines = [f"{report['cases']} cases (campaign seed {report['seed']}) in {report['seconds']} s "
             f"(kernels compiled first in {report['compile_seconds']} s)"]
    for kind, outcomes in report["by_kind"].items():
        lines.append(f"  {kind:<11} " + ", ".join(f"{o} {n}" for o, n in outcomes.items()))
    lines.append(f"library errors, the {min(15, len(report['library_errors']))} most common of {len(report['library_errors'])} kinds:")
    lines += [f"  {n:6d}  {gist}" for gist, n in list(report["library_errors"].items())[:15]]
    lines.append(f"{len(report['failures'])} unacceptable outcomes")
    for f in report["failures"][:50]:
        lines.append(f"  #{f['index']} [{f['kind']}] {f['outcome']}: {f['case']}\n      {f.get('error', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="campaign seed: the same seed runs the same cases")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--boundscheck", action="store_true", help="run with NUMBA_BOUNDSCHECK=1 and a fresh Numba cache")
    args = parser.parse_args(argv)
    if args.boundscheck and os.environ.get("NUMBA_BOUNDSCHECK") != "1":
        import subprocess

        with tempfile.TemporaryDirectory(prefix="phi3ref-boundscheck-cache-") as cache:
            env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": cache}
            rest = [a for a in (argv if argv is not None else sys.argv[1:])]
            return subprocess.call([sys.executable, __file__, *rest], env=env)
    unknown = set(args.kinds.split(",")) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    kinds = {k: KINDS[k] for k in args.kinds.split(",")}
    report = campaign(args.cases, args.seed, kinds=kinds, progress=lambda s: print(s, file=sys.stderr, flush=True))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return 0 if not report["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
