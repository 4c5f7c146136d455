"""How phi3ref's Numba kernels are compiled, cached and run: decided once, on import,
before any kernel is decorated (both :mod:`phi3ref.kernels` and :mod:`phi3ref.ggml`'s
kernels import this first).

* **The instruction form** of :mod:`phi3ref.ggml.simd`'s intrinsics: which 8-bit
  multiply-add instructions the CPU Numba compiles for has (``vpdpbusd`` with AVX-512 VNNI
  or AVX-VNNI, ``vpmaddubsw`` + ``vpmaddwd`` with AVX2, else portable LLVM vector code);
  ``PHI3REF_SIMD=generic`` forces the portable form (the tests run each form).
* **The on-disk cache**: each form in a folder of its own, each entry stamped with the
  content of the files whose facts the kernels bake in.
* **fork()**: a forked child can still run the kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading

import llvmlite.binding as llvm_binding
import numba as nb
from numba.core import config

__all__ = ["AVX2", "FASTMATH", "FORM", "GFNI512", "VNNI", "VNNI512"]

# Fast-math flags of every float kernel. They may reassociate (LLVM vectorizes their sums);
# no 'nnan'/'ninf', so NaN and infinity propagate as IEEE says. (The ggml kernels keep
# ggml's order of float operations and take no float flags at all.)
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


def _cpu_features() -> set[str]:
    """The CPU features Numba compiles for (its NUMBA_CPU_FEATURES, else the host's)."""
    feats = config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm_binding.get_host_cpu_features().flatten()
    return {f[1:] for f in feats.split(",") if f.startswith("+")}


def _simd_forms() -> tuple[bool, bool, bool, bool]:
    """(256-bit VNNI, 512-bit VNNI with AVX-512 BW, 512-bit GFNI, AVX2) for this process."""
    if os.environ.get("PHI3REF_SIMD", "").lower() == "generic":
        return False, False, False, False
    features = _cpu_features()
    vnni512 = {"avx512vnni", "avx512bw", "avx512vl"} <= features
    return vnni512 or "avxvnni" in features, vnni512, vnni512 and "gfni" in features, "avx2" in features


# Every choice gives the same integers. AVX2 without VNNI multiplies bytes with vpmaddubsw +
# vpmaddwd, as ggml's AVX2 kernels do (pairs of products saturate at 16 bits there, never
# for these codes).
VNNI, VNNI512, GFNI512, AVX2 = _simd_forms()
FORM = "-".join(name for name, on in (("vnni", VNNI), ("vnni512", VNNI512), ("gfni512", GFNI512), ("avx2", AVX2)) if on) or "generic"


# ---- Numba's on-disk cache of the kernels --------------------------------------------
# Numba keys a cached function on its own source file and the target CPU, not on the
# intrinsics it inlines from ggml/simd.py, nor on the block layouts it bakes in from
# quants.py, nor on the form chosen above (PHI3REF_SIMD leaves the target unchanged), so a
# cache written before an edit of those files, or in another form, would be loaded as if
# current. phi3ref's functions are therefore cached through a locator that puts each form
# in a folder of its own and stamps the entries with the content hash of those two files.

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_KERNEL_FOLDERS = (_PACKAGE, os.path.join(_PACKAGE, "ggml"))  # where phi3ref's @njit functions live
_BAKED_IN = (os.path.join(_PACKAGE, "ggml", "simd.py"), os.path.join(_PACKAGE, "quants.py"))


def _cache_locator_class(impl):
    from numba.core import caching

    class KernelCacheLocator(caching._CacheLocator):
        """Numba's own choice of cache folder for a phi3ref function, with ``FORM`` as a
        subfolder and the content hash of simd.py and quants.py in the source stamp."""

        def __init__(self, inner):
            self._inner = inner

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) not in _KERNEL_FOLDERS:
                return None
            for other in impl._locator_classes:
                if other is not cls:
                    inner = other.from_function(py_func, py_file)
                    if inner is not None:
                        self = cls(inner)
                        try:
                            self.ensure_cache_path()
                        except OSError:  # the form's folder cannot be written: try the next place
                            continue
                        return self
            return None

        def get_cache_path(self):
            return os.path.join(self._inner.get_cache_path(), f"simd-{FORM}")

        def get_source_stamp(self):
            return self._inner.get_source_stamp(), SOURCE_HASH

        def get_disambiguator(self):
            return self._inner.get_disambiguator()

    return KernelCacheLocator


def _source_hash() -> bytes:
    digest = hashlib.sha256()
    for path in _BAKED_IN:
        with open(path, "rb") as source:
            digest.update(source.read())
    return digest.digest()


SOURCE_HASH = _source_hash()  # of simd.py and quants.py, once per process


def _install_cache_locator() -> None:
    """Put KernelCacheLocator first among Numba's locators (before any kernel is decorated:
    a function's cache is set up at decoration)."""
    try:
        from numba.core import caching

        impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # the name since / before Numba 0.62
        locators = impl._locator_classes
    except (ImportError, AttributeError):  # another Numba: its own locators, and the caveat in docs/model.md
        return
    if not any(getattr(c, "__name__", "") == "KernelCacheLocator" for c in locators):
        locators.insert(0, _cache_locator_class(impl))


_install_cache_locator()


# ---- fork() ----------------------------------------------------------------------------

def _after_fork_in_child() -> None:
    """Let a forked child run the kernels. Numba's OpenMP threading layer (its default on
    Linux) kills a child that launches a parallel kernel after its parent did ("fork()
    called from a process already using GNU OpenMP"), because GNU OpenMP's thread pool
    does not survive fork(). The child records itself as the layer's owner (Numba's own
    launch_threads does that) and runs on one thread, which takes no pool: the same
    numbers (every kernel splits its work by rows, not sums, across threads), computed
    more slowly. Numba's other layers (TBB, workqueue) survive fork() unaided.

    Numba guards the start of its threads with a process-shared semaphore, and fork()
    hands the child that very semaphore: a child that dies holding it (killed by a
    timeout, interrupted) would leave every later child, and the parent, waiting on it
    forever. A child starts with one thread, so it takes locks of its own."""
    from numba.np.ufunc import parallel

    if hasattr(parallel, "_backend_init_process_lock"):
        parallel._backend_init_process_lock = None  # made anew (unshared) at its next use
        parallel._backend_init_thread_lock = threading.RLock()
    if not getattr(parallel, "_is_initialized", False) or getattr(parallel, "_threading_layer", None) != "omp":
        return
    from numba.np.ufunc import omppool

    if getattr(omppool, "openmp_vendor", "") != "GNU":
        return
    ctypes.CFUNCTYPE(None, ctypes.c_int)(omppool.launch_threads)(1)
    nb.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
