"""Write the full-size synthetic Phi-3-mini Q4_K_M (3.8B parameters, the size of the real
Phi-3-mini-4k-instruct-q4.gguf) that the benchmarks run on, and report what it cost.

    python benchmarks/write_full_model.py [--out PATH] [--force]

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
from phi3ref.synthetic import preset_shape, tensor_plan, write_model

DEFAULT_PATH = Path(__file__).parent / "models" / "phi3-mini-full-Q4_K_M.gguf"


def expected_tensor_bytes(preset: str = "phi3-mini", quant: str = "Q4_K_M") -> int:
    plans = tensor_plan(preset_shape(preset, "full"), 32064, quant)
    return sum(math.prod(p.shape) // QUANT_TYPES[p.qtype].block_size * QUANT_TYPES[p.qtype].type_size for p in plans)


def ensure_full_model(path: Path = DEFAULT_PATH, *, force: bool = False) -> tuple[Path, dict]:
    """Return the cached full-size model, writing it first if needed; and a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    need = expected_tensor_bytes()
    if path.exists() and not force and path.stat().st_size >= need:
        return path, {"path": str(path), "cached": True, "bytes": path.stat().st_size}
    start = time.perf_counter()
    write_model(path, preset="phi3-mini", size="full", quant="Q4_K_M", seed=0)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return path, {"path": str(path), "cached": False, "bytes": path.stat().st_size, "write_seconds": round(seconds, 1), "peak_rss_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--force", action="store_true", help="write even if a cached file exists")
    args = parser.parse_args()
    _, report = ensure_full_model(args.out, force=args.force)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
