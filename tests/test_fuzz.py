"""The fuzz tier (tests/fuzzing.py): hostile files, template payloads and careless calls,
each in a forked child; anything but success or a documented phi3ref error fails.

The default run executes a fixed-seed sample; ``pytest -m fuzz`` runs the long campaign
(``PHI3REF_FUZZ_CASES``, default 20000, and ``PHI3REF_FUZZ_SEED``) and a sample with
Numba's bounds checking on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the fuzz harness forks and reads /proc")

SAMPLE_CASES = 2000


def _run(cases: int, seed: int, tmp_path: Path) -> dict:
    import fuzzing

    report = fuzzing.campaign(cases, seed, folder=tmp_path / "corpus")
    print(fuzzing.format_report(report))
    return report


@pytest.mark.slow
def test_fuzz_sample(tmp_path):
    report = _run(SAMPLE_CASES, 0, tmp_path)
    assert sum(sum(o.values()) for o in report["by_kind"].values()) == SAMPLE_CASES
    assert set(report["by_kind"]) == {"structural", "semantic", "template", "api"}
    assert report["failures"] == [], report["failures"][:5]


def test_the_harness_sees_crashes_hangs_and_foreign_errors(tmp_path):
    """The classification itself: a case that segfaults, hangs, runs out of memory or
    raises from outside phi3ref is reported as such (the sample above could not fail
    otherwise)."""
    import ctypes

    import numpy as np

    import fuzzing

    work = tmp_path / "work"
    work.mkdir()
    cases = {
        "signal": lambda w: ctypes.string_at(0),
        "timeout": lambda w: __import__("time").sleep(60),
        "memory": lambda w: np.ones(2**34, np.uint8),
        "foreign-exception": lambda w: np.zeros(3)[[5]],
        "library-error": lambda w: __import__("phi3ref").load(w / "missing.gguf"),
        "ok": lambda w: None,
    }
    for outcome, run in cases.items():
        got = fuzzing.run_case(fuzzing.Case("test", outcome, run), work, seconds=3)
        assert got["outcome"] == outcome, (outcome, got)


@pytest.mark.fuzz
def test_fuzz_campaign(tmp_path):
    cases = int(os.environ.get("PHI3REF_FUZZ_CASES", "20000"))
    report = _run(cases, int(os.environ.get("PHI3REF_FUZZ_SEED", "1")), tmp_path)
    assert report["failures"] == [], report["failures"][:5]


@pytest.mark.fuzz
def test_fuzz_with_numba_bounds_checks(tmp_path):
    """Every kernel compiled with NUMBA_BOUNDSCHECK=1 (a fresh cache: a few minutes): an
    index a header lie pushed out of range raises IndexError instead of corrupting memory."""
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "fuzzing.py"), "--cases", "400", "--seed", "5", "--boundscheck"],
                         capture_output=True, text=True, timeout=3600)
    print(out.stdout[-3000:], out.stderr[-2000:])
    assert out.returncode == 0
