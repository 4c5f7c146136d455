from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/craft.py

from phi3ref import isa  # noqa: E402
from phi3ref.synthetic import PRESETS, write_model  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir: Path):
    """tiny_model(preset, quant) -> path of a synthetic model, written once per session."""
    cache: dict[tuple[str, str], Path] = {}

    def get(preset: str = "phi3-mini", quant: str = "Q4_K_M") -> Path:
        key = (preset, quant)
        if key not in cache:
            cache[key] = write_model(model_dir / f"{preset}-{quant}.gguf", preset=preset, quant=quant, seed=1)
        return cache[key]

    return get


ALL_PRESETS = list(PRESETS)


CAMPAIGN_TIMEOUT = 6 * 3600  # seconds a test of a selected OPT_IN tier may take
# the tests sharing one cold-cache child per SIMD form (simd_form_child) may take this long,
# the child's own compile and run included; the child itself is stopped before
FORM_TIMEOUT, FORM_CHILD_TIMEOUT = 2400, 2100

# Tiers that run only when a -m expression names them: long campaigns, not the default run.
OPT_IN = {
    "fuzz": "a long fuzz campaign: run with -m fuzz",
    "levels": "llama.cpp built at another instruction-set level (a build of minutes each): run with -m levels",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of an OPT_IN tier are skipped unless the -m expression names the tier."""
    named = config.option.markexpr or ""
    for tier, reason in OPT_IN.items():
        if tier in named:  # selected: a campaign may run for hours, but not forever (pytest-timeout)
            for item in items:
                if tier in item.keywords:
                    item.add_marker(pytest.mark.timeout(CAMPAIGN_TIMEOUT))
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if tier in item.keywords:
                item.add_marker(skip)


# The instruction forms phi3ref.ggml.simd compiles to besides this CPU's own, each run in a child
# process with a cold Numba cache of its own (so the form is compiled there): the portable
# form (ARM, any CPU without VNNI: no x86 intrinsic at all) and the AVX2 form (Haswell to
# Zen 3: vpmaddubsw, no AVX-512, VNNI or GFNI). ``forbidden``: x86 intrinsics (llvm.x86.*)
# that form's code must not call, by substring.
SIMD_FORMS = {
    "generic": dict(env={"PHI3REF_SIMD": "generic"}, flags=(False, False, False, False), forbidden=("",)),
    "avx2": dict(env=isa.haswell_numba_env(), flags=(False, False, False, True),
                 forbidden=("avx512", "vgf2p8", "vpdpbusd")),
}


def simd_form_params() -> list:
    """pytest params over SIMD_FORMS, the AVX2 form skipped where the CPU has no AVX2, and a
    form skipped where it is this process's own (an AVX2-only CPU: the tests here run it)."""
    from phi3ref import jit

    avx2 = isa.LEVELS["avx2"].runs_on(isa.host_features()) if isa.is_x86() else False

    def skip(name: str):
        if name == jit.FORM:
            return pytest.mark.skip(reason=f"the {name} form is this process's own: the tests here run it")
        return pytest.mark.skipif(name == "avx2" and not avx2, reason="this CPU has no AVX2")

    return [pytest.param(name, id=name, marks=skip(name)) for name in SIMD_FORMS]


def simd_form_env(name: str, numba_cache: Path) -> dict[str, str]:
    """The environment of a child process that compiles phi3ref in form ``name``."""
    import os

    env = {**os.environ, **SIMD_FORMS[name]["env"], "NUMBA_CACHE_DIR": str(numba_cache)}
    env.pop("PHI3REF_ISA", None)
    return env


# ---- one child process per instruction form: what an ARM CPU (portable form) or an
# AVX2-only CPU runs. Compiled in that form with a cold cache (minutes), it checks the SIMD
# matmul kernels against the plain one (test_ggml.check_simd_path), computes every
# numerics at every level on FORM_QUANTS' models (test_model compares them with this
# process's logits bit for bit) and lists x86 intrinsics its compiled code must not call.
FORM_QUANTS = ["Q4_K_M", "Q5_K_M", "Q8_0", "Q4_0", "BF16"]
FORM_TOKENS = list(range(200, 240))
FORM_CHILD = r"""
import json, re, sys, traceback, numpy as np, numba, phi3ref
from phi3ref.ggml import simd
from phi3ref.crosscheck import generation_logits
flags, forbidden, tests_dir, tokens = json.loads(sys.argv[2])
assert [simd.VNNI, simd.VNNI512, simd.GFNI512, simd.AVX2] == flags, "the form is not in force"
sys.path.insert(0, tests_dir)
import test_ggml
try:
    test_ggml.check_simd_path()
    print("simd path: bit-identical")
except Exception:
    print("simd path FAILED:", traceback.format_exc())
out = {}
for i, path in enumerate(sys.argv[3:]):
    for level in ("avx2", "avx512", "avx512bf16"):
        out[f"{i}-ggml-{level}"] = phi3ref.load(path, isa=level).logits(tokens)
    for numerics in ("exact", "numpy"):
        out[f"{i}-{numerics}"] = phi3ref.load(path, numerics=numerics).logits(tokens)
    for level in ("avx2", "avx512"):  # the decode kernels (one token at a time)
        model = phi3ref.load(path, isa=level)
        out[f"{i}-decode-{level}"] = generation_logits(model, tokens[:30], tokens[30:])
# x86 intrinsics in the compiled IR, but LLVM's own llvm.x86.atomic.* (its x86 lowering of
# Numba's reference-count atomics: plain atomics on other targets)
from phi3ref.jit import all_kernels
found = sorted({
    f"{name}: {x}" for name, fn in all_kernels().items()
    for sig in fn.signatures for x in re.findall(r"llvm\.x86\.[\w.]+", fn.inspect_llvm(sig))
    if not x.startswith("llvm.x86.atomic.") and any(f in x for f in forbidden)
})
np.savez(sys.argv[1], **out)
print("forbidden intrinsics in:", found)
"""


@pytest.fixture(scope="session")
def simd_form_child(tmp_path_factory: pytest.TempPathFactory, tiny_model):
    """simd_form_child(form) -> (CompletedProcess, path of its logits .npz, model paths),
    the child run once per form in a session."""
    import json
    import subprocess

    runs: dict[str, tuple] = {}

    def run(form: str) -> tuple:
        if form not in runs:
            folder = tmp_path_factory.mktemp(f"form-{form}")
            paths = [str(tiny_model("phi4-mini" if q == "BF16" else "phi3-medium", q)) for q in FORM_QUANTS]
            spec = json.dumps([list(SIMD_FORMS[form]["flags"]), list(SIMD_FORMS[form]["forbidden"]), str(Path(__file__).parent), FORM_TOKENS])
            done = subprocess.run(
                [sys.executable, "-c", FORM_CHILD, str(folder / "form.npz"), spec, *paths],
                env=simd_form_env(form, folder / "numba"), capture_output=True, text=True, timeout=FORM_CHILD_TIMEOUT,
            )
            runs[form] = (done, folder / "form.npz", paths)
        return runs[form]

    return run
