"""``phi3ref inspect``: what a GGUF file holds and what phi3ref can do with it."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import numpy as np
from gguf import LlamaFileType

from .config import ARCHITECTURE, Phi3Config
from .gguf_file import GGUFError, GGUFFile
from .tokenizer import Tokenizer

__all__ = ["describe", "format_report"]

_MIB = 1024 * 1024

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_TOKEN_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}


def _token_text(tokens: list[str] | None, token_id: int | None) -> str | None:
    if tokens is None or token_id is None or not 0 <= token_id < len(tokens):
        return None
    return tokens[token_id]


def _plain(gf: GGUFFile, key: str) -> Any:
    """The value of ``key`` as JSON can hold it: a scalar as it is (a float that is not
    finite as its repr), anything else as a description of what is stored."""
    value = gf.get(key)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if np.isfinite(value) else repr(value)
    return f"({gf.value_types[key]} of {len(value)})" if gf.value_types[key].startswith("array") else repr(value)[:80]


def _tokenizer_summary(gf: GGUFFile) -> dict[str, Any] | None:
    if "tokenizer.ggml.model" not in gf:
        return None
    # (what the file says, however wrong: Tokenizer.from_gguf is the one that refuses)
    tokens = gf.get("tokenizer.ggml.tokens")
    tokens = tokens if gf.value_types.get("tokenizer.ggml.tokens") == "array[string]" else None
    merges = gf.get("tokenizer.ggml.merges")
    summary: dict[str, Any] = {
        "model": _plain(gf, "tokenizer.ggml.model"),
        "pre": _plain(gf, "tokenizer.ggml.pre"),
        "n_tokens": len(tokens) if tokens is not None else None,
        "n_merges": len(merges) if isinstance(merges, (list, np.ndarray)) else 0,
        "add_bos": _plain(gf, "tokenizer.ggml.add_bos_token"),
        "add_eos": _plain(gf, "tokenizer.ggml.add_eos_token"),
        "chat_template": "tokenizer.chat_template" in gf,
    }
    special = {}
    for role in ("bos", "eos", "eot", "eom", "unknown", "padding", "sep", "cls", "mask"):
        key = f"tokenizer.ggml.{role}_token_id"
        if key not in gf:
            continue
        token_id = gf.get(key)
        if isinstance(token_id, int) and not isinstance(token_id, bool):
            special[role] = {"id": token_id, "text": _token_text(tokens, token_id)}
        else:
            special[role] = {"id": None, "text": None, "stored": f"{gf.value_types[key]} {str(token_id)[:40]}"}
    summary["special"] = special
    types = gf.get("tokenizer.ggml.token_type")
    if isinstance(types, np.ndarray) and types.dtype.kind in "iu":
        values, counts = np.unique(types, return_counts=True)
        summary["token_types"] = {_TOKEN_TYPES.get(int(v), f"type {int(v)}"): int(c) for v, c in zip(values, counts)}
        if tokens is not None:
            summary["control_tokens"] = [tokens[i] for i in np.flatnonzero(types == 3)[:32] if i < len(tokens)]
    return summary


def _metadata_preview(gf: GGUFFile) -> dict[str, str]:
    out = {}
    for key, value in gf.metadata.items():
        vtype = gf.value_types[key]
        if vtype.startswith("array"):
            out[key] = f"{vtype} of {len(value)}"
        elif isinstance(value, str) and (len(value) > 80 or "\n" in value):
            out[key] = f"string of {len(value)} characters"
        else:
            out[key] = repr(value)
    return out


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-able description of a GGUF file. Raises ``GGUFError`` only when the file
    cannot be read as GGUF at all; anything phi3ref cannot *use* is listed in
    ``"problems"`` instead."""
    with GGUFFile(path) as gf:
        problems: list[str] = []
        file_type = _plain(gf, "general.file_type")
        try:
            file_type_name = LlamaFileType(file_type).name if file_type is not None else None
        except (ValueError, TypeError):
            file_type_name = f"unknown ({file_type})"
        info: dict[str, Any] = {
            "path": str(gf.path),
            "file_size": gf.file_size,
            "gguf_version": gf.version,
            "architecture": gf.architecture,
            "name": _plain(gf, "general.name"),
            "file_type": file_type_name,
            "n_metadata": len(gf.metadata),
            "metadata": _metadata_preview(gf),
        }

        config = None
        if gf.architecture != ARCHITECTURE:
            problems.append(f"architecture is {gf.architecture!r}: phi3ref runs only {ARCHITECTURE!r} models")
        else:
            try:
                config = Phi3Config.from_gguf(gf)
            except GGUFError as e:
                problems.append(str(e))
        info["config"] = config.to_dict() if config else None
        if config:
            info["config"]["n_params"] = config.n_params
            info["config"]["longrope_attn_factor"] = config.longrope_attn_factor
        info["tokenizer"] = _tokenizer_summary(gf)
        if info["tokenizer"] is None:
            problems.append("no tokenizer.ggml.* vocabulary in the file")
        else:
            try:
                Tokenizer.from_gguf(gf)  # what phi3ref would build from it
            except GGUFError as e:
                problems.append(str(e))

        tensors = []
        by_type: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "bytes": 0, "elements": 0})
        for t in gf.tensors.values():
            tensors.append({"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.n_bytes})
            agg = by_type[t.type_name]
            agg["count"] += 1
            agg["bytes"] += t.n_bytes
            agg["elements"] += t.n_elements
        info["tensors"] = tensors
        info["totals_by_type"] = {k: {"count": int(v["count"]), "bytes": int(v["bytes"]), "elements": int(v["elements"])} for k, v in by_type.items()}
        info["total_tensor_bytes"] = sum(t.n_bytes for t in gf.tensors.values())
        unsupported = sorted({t.type_name for t in gf.tensors.values() if not t.supported})
        if unsupported:
            problems.append(f"tensor types phi3ref cannot compute with: {', '.join(unsupported)}")
        if config is not None:
            if not gf.tensors:
                problems.append("no tensors: a vocab-only file (its tokenizer is usable, it cannot run)")
            else:
                try:
                    config.check_tensors(gf)
                except GGUFError as e:
                    problems.append(str(e))
        info["problems"] = problems
        info["runnable"] = config is not None and bool(gf.tensors) and not problems
        return info


def _fmt_shape(shape: list[int]) -> str:
    return "x".join(str(n) for n in shape)


def format_report(info: dict[str, Any], *, show_metadata: bool = False) -> str:
    """The human-readable form of :func:`describe`'s result."""
    lines = [
        f"file          {info['path']}",
        f"size          {info['file_size'] / _MIB:,.1f} MiB  (GGUF v{info['gguf_version']}, {info['n_metadata']} metadata keys, {len(info['tensors'])} tensors)",
        f"architecture  {info['architecture']}" + (f"   name: {info['name']}" if info["name"] else ""),
    ]
    if info["file_type"]:
        lines.append(f"file type     {info['file_type']}")
    config = info["config"]
    if config:
        lines.append("")
        lines.append("config")
        features = []
        if config["n_head_kv"] < config["n_head"]:
            features.append(f"grouped-query attention {config['n_head']}/{config['n_head_kv']}")
        if config["n_rot"] < config["head_dim"]:
            features.append(f"partial rotary {config['n_rot']}/{config['head_dim']}")
        if config["has_rope_factors"]:
            features.append(f"LongRoPE from {config['rope_orig_ctx']} (attn factor {config['longrope_attn_factor']:.4f})")
        if config["tied_embeddings"]:
            features.append("tied embeddings")
        for key, value in config.items():
            lines.append(f"  {key:<22}{value}")
        if features:
            lines.append(f"  {'features':<22}{'; '.join(features)}")
    tok = info["tokenizer"]
    if tok:
        lines.append("")
        lines.append(f"tokenizer     {tok['model']} (pre: {tok['pre']}), {tok['n_tokens']} tokens, {tok['n_merges']} merges, add_bos={tok['add_bos']}, chat template: {'yes' if tok['chat_template'] else 'no'}")
        for role, sp in tok["special"].items():
            shown = repr(sp["text"]) if sp["id"] is not None else f"(not a token id: {sp['stored']})"
            lines.append(f"  {role:<10}{str(sp['id']):>8}  {shown}")
        if tok.get("token_types"):
            lines.append("  token types: " + ", ".join(f"{k} {v}" for k, v in tok["token_types"].items()))
        if tok.get("control_tokens"):
            lines.append("  control tokens: " + " ".join(tok["control_tokens"]))
    if info["tensors"]:
        lines.append("")
        width = max(len(t["name"]) for t in info["tensors"])
        lines.append(f"{'tensor':<{width}}  {'type':<7} {'shape':>14} {'MiB':>9}")
        for t in info["tensors"]:
            lines.append(f"{t['name']:<{width}}  {t['type']:<7} {_fmt_shape(t['shape']):>14} {t['bytes'] / _MIB:>9.2f}")
        lines.append("")
        lines.append(f"{'type':<7} {'tensors':>7} {'MiB':>10} {'share':>6} {'bits/weight':>11}")
        total = info["total_tensor_bytes"] or 1
        for name, agg in sorted(info["totals_by_type"].items(), key=lambda kv: -kv[1]["bytes"]):
            bpw = 8 * agg["bytes"] / max(agg["elements"], 1)
            lines.append(f"{name:<7} {agg['count']:>7} {agg['bytes'] / _MIB:>10.2f} {100 * agg['bytes'] / total:>5.1f}% {bpw:>11.2f}")
        lines.append(f"{'total':<7} {len(info['tensors']):>7} {info['total_tensor_bytes'] / _MIB:>10.2f}")
    if show_metadata:
        lines.append("")
        lines.append("metadata")
        for key, value in info["metadata"].items():
            lines.append(f"  {key} = {value}")
    lines.append("")
    if info["runnable"]:
        lines.append("phi3ref supports this model: architecture, tensor layout and every tensor type.")
    else:
        lines.append("phi3ref cannot run this file:" if info["problems"] else "phi3ref cannot run this file.")
        lines.extend(f"  - {p}" for p in info["problems"])
    return "\n".join(lines)
