"""Write the full-size synthetic model that the benchmarks run on — by default Phi-3-mini
Q4_K_M (3.8B parameters, the size of the real Phi-3-mini-4k-instruct-q4.gguf); ``--preset
phi4-mini`` (3.8B, its 200k-entry vocabulary) or ``phi4`` (14.7B, about 9 GB) — and report
what it cost.

    python benchmarks/write_full_model.py [--preset phi3-mini] [--out PATH] [--force]

The file is cached: an existing file of the expected size is reused unless --force.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

from phi3ref.quants import QUANT_TYPES
from phi3ref.gguf_file import GGUFFile
from phi3ref.synthetic import PRESETS, preset_shape, preset_vocab, tensor_plan, write_model

MODELS = Path(__file__).parent / "models"


def full_model_path(preset: str = "phi3-mini") -> Path:
    """Where the full-size model of ``preset`` is cached."""
    return MODELS / f"{preset}-full-Q4_K_M.gguf"


DEFAULT_PATH = full_model_path()


def expected_tensor_bytes(preset: str = "phi3-mini", quant: str = "Q4_K_M") -> int:
    with GGUFFile(preset_vocab(preset)) as vocab:
        n_vocab = len(vocab.get_array("tokenizer.ggml.tokens"))
    plans = tensor_plan(preset_shape(preset, "full"), n_vocab, quant)
    return sum(math.prod(p.shape) // QUANT_TYPES[p.qtype].block_size * QUANT_TYPES[p.qtype].type_size for p in plans)


def ensure_full_model(path: Path | None = None, *, preset: str = "phi3-mini", force: bool = False) -> tuple[Path, dict]:
    """Return the cached full-size model of ``preset`` (at ``path``, default
    :func:`full_model_path`), writing it first if needed; and a report."""
    path = path or full_model_path(preset)
    path.parent.mkdir(parents=True, exist_ok=True)
    need = expected_tensor_bytes(preset)
    if path.exists() and not force and path.stat().st_size >= need:
        return path, {"path": str(path), "cached": True, "bytes": path.stat().st_size}
    start = time.perf_counter()
    write_model(path, preset=preset, size="full", quant="Q4_K_M", seed=0)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return path, {"path": str(path), "cached": False, "bytes": path.stat().st_size, "write_seconds": round(seconds, 1), "peak_rss_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="phi3-mini", choices=list(PRESETS))
    parser.add_argument("--out", type=Path, help="where to write it (default: benchmarks/models/<preset>-full-Q4_K_M.gguf)")
    parser.add_argument("--force", action="store_true", help="write even if a cached file exists")
    args = parser.parse_args()
    _, report = ensure_full_model(args.out, preset=args.preset, force=args.force)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
