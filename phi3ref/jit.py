"""How phi3ref's Numba kernels are compiled, cached and run: decided once, on import,
before any kernel is decorated (both :mod:`phi3ref.kernels` and :mod:`phi3ref.ggml`'s
kernels import this first).

* **The instruction form** of :mod:`phi3ref.ggml.simd`'s intrinsics: which 8-bit
  multiply-add instructions the CPU Numba compiles for has (``vpdpbusd`` with AVX-512 VNNI
  or AVX-VNNI, ``vpmaddubsw`` + ``vpmaddwd`` with AVX2, else portable LLVM vector code);
  ``PHI3REF_SIMD=generic`` forces the portable form (the tests run each form).
* **The on-disk cache**: in phi3ref's cache folder (:mod:`phi3ref.user_cache`, so that a
  read-only install caches too; ``NUMBA_CACHE_DIR`` overrides it, as for any Numba code),
  each form in a folder of its own, each entry stamped with the content of the files whose
  facts the kernels bake in.
* **Kernels on several threads**: a kernel is one thread's part, ``part(th, n_threads,
  *args)``, that :class:`Threaded` runs on n_threads threads through one small launcher
  (no prange in the kernels: Numba compiles a prange's body three times over).
* **Specialised kernels, compiled when first used**: :func:`specialized` makes a kernel
  for one value of a parameter (a weight type) that the code then holds as a constant,
  so that a model compiles only the branches of its own weight types;
  :func:`compile_notice` says on stderr that a slow compile is under way.
* **A cold cache filled by two processes**: :func:`run_warm_jobs` has a helper process
  compile part of a warm-up (each process takes the next job when it is free), and last,
  in the background, the kernels a prompt does not need (:func:`ready` waits for them
  where they are first called).
* **fork()**: a forked child can still run the kernels.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import llvmlite.binding as llvm_binding
import numba as nb
import numpy as np
from numba.core import cgutils, config
from numba.core import types as nb_types
from numba.core.compiler import Compiler
from numba.extending import intrinsic

try:
    import fcntl  # the lock of _lock_cache_writes
except ImportError:  # not POSIX
    fcntl = None

try:
    from numba._dispatcher import compute_fingerprint as _compute_fingerprint  # Numba's C typing key
except ImportError:  # a Numba without it: Threaded keys by the type itself
    _compute_fingerprint = None

__all__ = [
    "AVX2", "FASTMATH", "FORM", "GFNI512", "KERNELS", "PartCompiler", "VNNI", "VNNI512", "WarmJob", "all_kernels",
    "background_seconds", "compile_notice", "cache_folder_in_use", "finish_background", "kernel_cache_folder", "part_jit",
    "ready", "run_helper_jobs", "run_warm_jobs", "specialized", "Threaded", "threaded_kernel",
]

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
# current; nor on this file, which sets how the kernels' parts are compiled (PartCompiler).
# phi3ref's functions are therefore cached through a locator that puts each form in a
# folder of its own and stamps the entries with the content hash of those three files.
# The folder is phi3ref's cache folder, not Numba's default __pycache__ beside the source
# (which a read-only install cannot write): kernels/<install>/simd-<form>, <install> told
# apart by the package's path, so that two installs (two virtualenvs) do not overwrite
# each other's entries. NUMBA_CACHE_DIR, where set, is obeyed as Numba obeys it; a folder
# that cannot be written falls back to Numba's own choice (still per form and stamped).

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_KERNEL_FOLDERS = (_PACKAGE, os.path.join(_PACKAGE, "ggml"))  # where phi3ref's @njit functions live
_BAKED_IN = (os.path.join(_PACKAGE, "ggml", "simd.py"), os.path.join(_PACKAGE, "quants.py"), os.path.abspath(__file__))


def kernel_cache_folder() -> str:
    """phi3ref's folder for this install's compiled kernels of this process's SIMD form
    (those of phi3ref.ggml in its subfolder ``ggml``): where they are cached unless
    NUMBA_CACHE_DIR is set (then Numba's folder under it is) or it cannot be written."""
    from .user_cache import cache_root

    install = hashlib.sha256(_PACKAGE.encode()).hexdigest()[:12]
    return os.path.join(cache_root(), "kernels", install, f"simd-{FORM}")


def cache_folder_in_use() -> str:
    """The folder the kernels are cached in: under NUMBA_CACHE_DIR where it is set, else
    :func:`kernel_cache_folder` (what the notice and ``phi3ref warmup`` name)."""
    return os.environ.get("NUMBA_CACHE_DIR") or kernel_cache_folder()


def _cache_locator_class(impl):
    from numba.core import caching

    class KernelCacheLocator(caching._CacheLocator):
        """The cache folder of a phi3ref function (:func:`kernel_cache_folder`, else Numba's
        own choice with ``FORM`` as a subfolder), the content hash of simd.py, quants.py and
        jit.py in its source stamp."""

        def __init__(self, inner, path):
            self._inner, self._path = inner, path

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) not in _KERNEL_FOLDERS:
                return None
            for other in impl._locator_classes:
                inner = None if other is cls else other.from_function(py_func, py_file)
                if inner is None:
                    continue
                numba_choice = os.path.join(inner.get_cache_path(), f"simd-{FORM}")
                # a subfolder per source folder: Numba names entries by file, not package (kernels.*)
                source_folder = os.path.relpath(os.path.dirname(os.path.abspath(py_file)), _PACKAGE)  # "." or "ggml"
                ours = os.path.normpath(os.path.join(kernel_cache_folder(), source_folder))
                for path in ([numba_choice] if config.CACHE_DIR else [ours, numba_choice]):
                    self = cls(inner, path)
                    try:
                        self.ensure_cache_path()
                    except OSError:  # cannot be written: try the next place
                        continue
                    return self
            return None

        def get_cache_path(self):
            return self._path

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


SOURCE_HASH = _source_hash()  # of simd.py, quants.py and jit.py, once per process


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


# ---- kernels made for one weight type, compiled when first used ------------------------

KERNELS: list = []  # every kernel made by specialized(), in the order made (the tests count their signatures)


def specialized(fn: Callable, name: str, **options) -> Callable:
    """``fn`` compiled by Numba (``cache=True`` and ``options``) under ``name``: ``fn`` is
    a closure over the value it is made for (a weight type), which its compiled code holds
    as a constant, so that the branches of other values fold away and are never compiled.
    Numba prunes a branch whose condition compares constants (``qtype == Q4_K``, also
    inside the functions it inlines), not one on what a call returns (``if has_row_path(qtype)``:
    both sides are typed, lowered and optimized): choose between whole paths in Python,
    where ``fn`` is made. Numba compiles it at its first call, or loads it from the cache;
    ``name`` (unique in the module) names its cache entries apart from those of the other
    values'."""
    fn.__name__ = fn.__qualname__ = name
    kernel = nb.njit(cache=True, **options)(fn)
    KERNELS.append(kernel)
    return kernel


# ---- kernels run on several threads ---------------------------------------------------
# A kernel is written as one thread's part, ``part(th, n_threads, *args)`` (ggml's compute
# functions take (ith, nth) the same way), and run on n_threads threads by one launcher,
# _run_parts, that calls the part through its address. Not a prange in each kernel: Numba
# compiles a prange's body as a function of its own, links it into a gufunc wrapper and
# that into the kernel, and LLVM optimizes the body and turns it into machine code at each
# of the three; a part called through its address is compiled once, and the launcher, a
# few lines, once per argument types (kernels of the same argument types share it). The
# ggml warm-up of a Phi-3-mini Q4_K_M, one process, cold: 40.6 s with a prange per kernel,
# 24.7 s so (AMD Zen 3).


class PartCompiler(Compiler):
    """Numba's compiler, for a kernel's part: its pointer arguments (each array's data, and
    its meminfo and parent pointers: a part touches a meminfo only in NRT's reference
    counting, atomic and not inlined) are ``noalias``, as Numba makes a prange's body when
    its alias analysis finds none: LLVM may then keep what it read from one array in
    registers across stores to another (without it, one token's attention products, the
    values' most, ran slower than as the bodies of the prange kernels they had been; the
    products of the weights hardly). The promise this makes: no array a part writes
    overlaps another of its arguments (the model's passes keep it, tests/test_kernels.py
    checks the calls of its passes; the public operations refuse an ``out`` that overlaps
    an input); arrays it only reads may overlap. The ggml kernels take no fast-math flags,
    so their arithmetic keeps the code's order (bit-identical to llama.cpp, as tested);
    the exact numerics' products allow reassociation, as before."""

    def define_pipelines(self):
        self.state.flags.noalias = True  # this compile's own flags (Numba makes them per compile)
        return super().define_pipelines()


def part_jit(**options) -> Callable[[Callable], nb.core.registry.CPUDispatcher]:
    """The decorator of a module-level part run by :class:`Threaded`: ``@njit(cache=True,
    **options)`` compiled by :class:`PartCompiler`."""
    return nb.njit(cache=True, pipeline_class=PartCompiler, **options)


@intrinsic
def _part_at(typingctx, address, args):
    """The compiled function at ``address`` (an integer: its entry point in Numba's own
    calling convention), of signature void(int64 th, int64 n_threads, *args). Called
    through Numba's convention, an error it raises (an IndexError under
    NUMBA_BOUNDSCHECK=1) reaches the caller, as from any Numba function: through the C
    wrapper Numba also makes, it would be printed and dropped."""
    fn_type = nb_types.FunctionType(nb_types.void(nb_types.int64, nb_types.int64, *args.types))

    def codegen(context, builder, signature, llvm_args):
        fn = cgutils.create_struct_proxy(fn_type)(context, builder)
        fn.jit_addr = builder.inttoptr(llvm_args[0], cgutils.voidptr_t)
        return fn._getvalue()

    return fn_type(nb_types.int64, args), codegen


@nb.njit(parallel=True, cache=True)
def _run_parts(address, *args):
    """Run the part at ``address`` on n_threads threads (the last of ``args``): part(th,
    n_threads, *the other args) for th = 0 .. n_threads - 1 (its own share of the work, by
    th), all at once."""
    n_threads = args[-1]
    part = _part_at(address, args[:-1])
    for th in nb.prange(n_threads):
        part(np.int64(th), n_threads, *args[:-1])


def _type_key(args: tuple) -> tuple:
    """A key of the Numba types of ``args``: Numba's own fingerprints (what its dispatcher
    types arguments by, in C), else the types themselves (slower: a value the fingerprint
    does not cover, or a Numba without it)."""
    if _compute_fingerprint is not None:
        try:
            return tuple(map(_compute_fingerprint, args))
        except (NotImplementedError, ValueError, TypeError):  # a value it does not cover
            pass
    return tuple(nb.typeof(a) for a in args)


class Threaded:
    """A kernel run on several threads: called as ``kernel(*args, n_threads)``, it runs
    ``part(th, n_threads, *args)`` on n_threads threads at once (:func:`_run_parts`). The
    part is compiled, or loaded from the cache, for the Numba types of ``args`` at their
    first call; a call of other types compiles another, never runs one made for others
    (the address is looked up by the arguments' types, :func:`_type_key`). A part is made by
    :func:`part_jit` or :func:`threaded_kernel` (compiled by :class:`PartCompiler`: no
    array it writes may overlap another argument)."""

    def __init__(self, part: nb.core.registry.CPUDispatcher) -> None:
        self.part = part  # the Numba dispatcher (what the warm-up and the tests look at)
        self._addresses: dict[tuple, int] = {}

    def __call__(self, *args_and_n_threads: object) -> None:
        key = _type_key(args_and_n_threads)
        address = self._addresses.get(key)
        if address is None:
            address = self._compile(args_and_n_threads, key)
        try:
            _run_parts(address, *args_and_n_threads)
        except SystemError as error:
            # an exception a part raised on a thread is set as Python's error and the
            # launcher returns as if it had not: Python reports that as a SystemError whose
            # context is the part's exception, which is what the caller should see
            if error.__context__ is None:
                raise
            raise error.__context__ from None

    def _compile(self, args_and_n_threads: tuple, key: tuple) -> int:
        """The address of the part compiled (or loaded from the cache) for these types
        (``key``: theirs, :func:`_type_key`)."""
        args = args_and_n_threads[:-1]
        signature = nb_types.void(nb_types.int64, nb_types.int64, *(nb.typeof(a) for a in args))
        result = self.part.get_compile_result(signature)
        address = result.library.get_pointer_to_function(result.fndesc.llvm_func_name)
        if not address:  # 0: the symbol is missing (never expected); a call through it would crash
            raise RuntimeError(f"no compiled entry point of {self.part.__name__} for {signature}")
        self._addresses[key] = address
        return address


def _lock_cache_writes(dispatcher: nb.core.registry.CPUDispatcher) -> None:
    """Make ``dispatcher``'s writes to its on-disk cache hold a file lock beside its index.
    Numba writes an entry by reading the index, writing the entry's file under the next
    free number and writing the index back, unlocked: two processes compiling the same
    function for other argument types at once (the warm-up's helper and this process, both
    compiling :func:`_run_parts`) could take the same number, and the index would then give
    one's types the other's code. Only the launcher is compiled by both processes."""
    cache = getattr(dispatcher, "_cache", None)
    folder = getattr(cache, "_cache_path", None)
    if folder is None or fcntl is None:  # no cache (NUMBA_DISABLE_CACHE), or no flock (not POSIX)
        return
    save = cache.save_overload

    def locked_save(sig, data):
        with open(os.path.join(folder, f"{dispatcher.__name__}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                save(sig, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    cache.save_overload = locked_save


_lock_cache_writes(_run_parts)


def threaded_kernel(part: Callable, name: str, **options) -> Threaded:
    """``part(th, n_threads, *args)`` compiled as :func:`specialized` compiles, by
    :class:`PartCompiler` (no prange in it: thread th's share of the work), run on several
    threads by :class:`Threaded`."""
    return Threaded(specialized(part, name, pipeline_class=PartCompiler, **options))


def all_kernels() -> dict[str, Callable]:
    """Every phi3ref kernel made so far in this process, by module and name: the ``@njit``
    functions of phi3ref's modules and those :func:`specialized` made (the tests read their
    compiled signatures and code)."""
    found = {f"{f.py_func.__module__}.{f.__name__}": f for f in KERNELS}
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("phi3ref"):
            for name, f in vars(module).items():
                if isinstance(f, nb.core.registry.CPUDispatcher):
                    found.setdefault(f"{f.py_func.__module__}.{f.__name__}", f)
    return found


@dataclass
class WarmJob:
    """A job of a warm-up: ``run()`` compiles (or loads) ``kernels()``; ``cost``: its rough
    compile seconds (the longest jobs are handed out first; it bounds a wait for the
    helper). ``later``: a prompt's pass does not usually need it (one token's kernels): a
    helper may compile it in the background while the prompt runs, so its kernels are
    called through :func:`ready`, which waits for them when a pass needs them sooner."""

    name: str
    cost: float
    run: Callable[[], None]
    kernels: Callable[[], list]
    later: bool = False


def _in_cache(kernel) -> bool:
    """Whether Numba's cache holds current entries of ``kernel``: an index of this Numba and
    of today's source stamp (an index an older phi3ref left is stale). Where the cache
    cannot be read so, True: a helper would gain nothing. (A :class:`Threaded` kernel: its part's.)"""
    kernel = getattr(kernel, "part", kernel)
    index = getattr(getattr(kernel, "_cache", None), "_cache_file", None)
    try:
        return index is None or bool(index._load_index())  # {} when missing, stale or of another Numba
    except Exception:  # a Numba whose cache files differ
        return True


class _Helper:
    """A helper process compiling warm-up jobs into the cache (:func:`run_helper_jobs`): it
    reads a job's name on its stdin, runs it, names it on its stdout when it is done, and
    exits at the end of its stdin."""

    def __init__(self, code: str, on_done: Callable[[str], None]) -> None:
        env = {**os.environ, "PHI3REF_COMPILE_HELPER": "0"}
        self.process = subprocess.Popen([sys.executable, "-c", code], env=env, text=True, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.done: set[str] = set()
        self.changed = threading.Condition()
        self.exited = False
        self.on_done = on_done  # called (in the reading thread) after each job the helper names
        threading.Thread(target=self._read_reports, daemon=True).start()

    def give(self, names: list[str], last: bool = False) -> None:
        """Hand the helper ``names`` to run; ``last``: nothing follows (its stdin closes)."""
        try:
            self.process.stdin.write("".join(f"{name}\n" for name in names))
            self.process.stdin.flush()
            if last:
                self.process.stdin.close()
        except (OSError, ValueError):  # it has exited (or was stopped): its jobs are left to the warm-up
            pass

    def _read_reports(self) -> None:
        for line in self.process.stdout:
            with self.changed:
                self.done.add(line.strip())
                self.changed.notify_all()
            self.on_done(line.strip())
        with self.changed:
            self.exited = True
            self.changed.notify_all()

    def wait_for(self, names: list[str], timeout: float) -> bool:
        """Wait until the helper has done every job of ``names`` (True), exits, or
        ``timeout`` seconds pass."""
        with self.changed:
            self.changed.wait_for(lambda: set(names) <= self.done or self.exited, timeout)
            return set(names) <= self.done

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        try:
            self.process.stdin.close()
        except OSError:
            pass


def run_helper_jobs(jobs: list[WarmJob]) -> None:
    """In a helper process: run the jobs named on stdin, one per line, in that order, naming
    each on stdout when done (the process that started the helper waits for those names
    and hands out the next)."""
    by_name = {job.name: job for job in jobs}
    print(_HELPER_READY, flush=True)  # Python, Numba and phi3ref imported: the first job may come
    for line in sys.stdin:
        by_name[line.strip()].run()
        print(line.strip(), flush=True)


_HELPER_READY = "(ready)"  # what a helper says before its first job (no job's name)


class _JobQueue:
    """The cold jobs a prompt needs, the longest first, taken one at a time by this process
    and by the helper, each when it is free (so neither waits while the other still has
    several to do: compile times differ from the estimates between CPUs, and two processes
    slow each other); then, once they are all taken, the ``later`` jobs go to the helper."""

    def __init__(self, jobs: list[WarmJob], later: list[WarmJob]) -> None:
        self.waiting = sorted(jobs, key=lambda j: -j.cost)
        self.later: list[WarmJob] | None = later  # None once handed to the helper
        self.theirs: list[WarmJob] = []  # taken by the helper
        self.lock = threading.Lock()
        self.helper: _Helper | None = None

    def take(self) -> WarmJob | None:
        """The next job for this process (None: all are taken)."""
        with self.lock:
            return self.waiting.pop(0) if self.waiting else None

    def feed_helper(self, _reported: str = "") -> None:
        """Give the helper its next job (when it reports that it is ready, or done with one);
        when all are taken, the later ones, and the end."""
        with self.lock:
            helper = self.helper
            if helper is None or not all(j.name in helper.done for j in self.theirs):  # still on its job
                return
            if self.waiting:
                job = self.waiting.pop(0)
                self.theirs.append(job)
                helper.give([job.name])
            elif self.later is not None:
                helper.give([j.name for j in self.later], last=True)
                self.later = None


@dataclass
class _Background:
    """Jobs a helper still compiles after the warm-up returned (``later`` ones)."""

    helper: _Helper
    jobs: list[WarmJob]
    kernels: set[int]  # ids of their kernels
    timeout: float

    def settle(self) -> None:
        """Wait for the helper to do the jobs, bounded by their expected cost; stop it."""
        try:
            self.helper.wait_for([j.name for j in self.jobs], self.timeout)
        finally:
            self.helper.stop()


_background: _Background | None = None  # cleared only once its jobs have run here
_background_lock = threading.Lock()  # held while they are waited for and run
_finishing: int | None = None  # the thread running them (their kernels' calls pass through ready())
_waited = threading.local()  # .seconds: what this thread waited for them


def run_warm_jobs(jobs: list[WarmJob], helper_call: Callable[[], str]) -> None:
    """Run every job of a warm-up. When two or more of them are not in the cache and this
    process may use two cores or more, a helper process compiles some of those meanwhile,
    into the same cache (``helper_call()``: the Python code that runs the jobs named on its
    stdin there, through :func:`run_helper_jobs`), and this process then loads them: Numba
    compiles one function at a time, so a second process shortens a cold start. The two take
    the jobs one by one, each when it is free, the longest first (:class:`_JobQueue`); each
    process compiles other kernels (the launcher, which both may compile for other argument
    types, writes its cache entries under a lock: :func:`_lock_cache_writes`), and whatever
    the helper did not finish is compiled here. The helper compiles the ``later`` jobs last,
    while this process goes on (:func:`ready` waits for them when first called;
    :func:`finish_background` at once)."""
    global _background
    finish_background()  # one helper at a time
    cold = [j for j in jobs if not all(_in_cache(k) for k in j.kernels())]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # no helper where sys.executable is not a plain Python (a frozen or embedded program)
    python = sys.executable and not getattr(sys, "frozen", False)
    later = [j for j in cold if j.later]
    queue = _JobQueue([j for j in cold if not j.later], later)
    if len(cold) >= 2 and cores >= 2 and python and os.environ.get("PHI3REF_COMPILE_HELPER", "1") != "0":
        try:
            queue.helper = _Helper(helper_call(), queue.feed_helper)  # its first job when it says it is ready
        except OSError:  # no helper: everything is compiled here
            pass
    helper = queue.helper
    try:
        cold_names = {j.name for j in cold}
        for job in jobs:  # those in the cache, loaded
            if job.name not in cold_names:
                job.run()
        while (job := queue.take()) is not None:
            job.run()
        if helper is not None:
            with queue.lock:  # no job is handed out any more
                theirs = [j for j in queue.theirs if j.name not in helper.done]
            # then load what it compiled (a helper this late is not waited for: compile the rest here)
            if not helper.wait_for([j.name for j in theirs], 30 + 4 * sum(j.cost for j in theirs)):
                helper.stop()
                helper = None
            for job in queue.theirs:
                job.run()
    except BaseException:
        if helper is not None:
            helper.stop()
        raise
    if helper is not None and later:
        _background = _Background(helper, later, {id(k) for j in later for k in j.kernels()},
                                  30 + 4 * sum(j.cost for j in later))
        return
    if helper is not None:
        helper.stop()
    for job in later:
        job.run()


def ready(kernel: Callable) -> Callable:
    """``kernel``, loaded from the cache first if a helper compiles it in the background
    (:func:`finish_background`)."""
    work = _background
    if work is not None and id(kernel) in work.kernels:
        finish_background()
    return kernel


def finish_background() -> float:
    """Wait for a helper's background jobs, bounded by their expected cost, then load them
    here (or compile those it did not finish); the seconds it took (0 when none). Another
    thread that needs them meanwhile waits for this one."""
    global _background, _finishing
    if _background is None or _finishing == threading.get_ident():  # none, or called from the jobs being run
        return 0.0
    start = time.perf_counter()
    with _background_lock:
        work = _background
        if work is not None:  # else another thread has done it meanwhile
            _finishing = threading.get_ident()
            try:
                with compile_notice("one token's attention (compiled in the background)"):
                    work.settle()
                    for job in work.jobs:
                        job.run()
            finally:
                _background, _finishing = None, None
    seconds = time.perf_counter() - start
    _waited.seconds = background_seconds() + seconds
    return seconds


def background_seconds() -> float:
    """The seconds this thread has waited, in all, for kernels compiled in the background
    (a generation counts them as compile time, not as its own)."""
    return getattr(_waited, "seconds", 0.0)


def _finish_at_exit() -> None:
    """Let a helper that is compiling in the background finish (bounded), so that the
    cache holds its kernels for the next run."""
    work = _background
    if work is not None:
        with compile_notice("one token's attention, for the cache (compiled in the background)"):
            work.settle()


def _forget_background_in_child() -> None:
    """A forked child neither waits for nor stops its parent's helper (the one-token
    kernels, if it needs them before the helper has cached them, it compiles itself)."""
    global _background, _background_lock, _finishing
    _background, _background_lock, _finishing = None, threading.Lock(), None


atexit.register(_finish_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_background_in_child)


@contextmanager
def compile_notice(what: str, *, after: float = 1.0) -> Iterator[None]:
    """Run the block; if it is still running after ``after`` seconds (the kernels are being
    compiled, not loaded from the cache), say so on stderr — a first run compiles for
    some seconds, and a silent terminal looks hung — and say when it is done."""
    start = time.perf_counter()
    said, done, lock = threading.Event(), threading.Event(), threading.Lock()  # the lock: the two lines in their order

    def say() -> None:
        with lock:
            if done.is_set():  # finished while the timer fired: nothing to announce
                return
            said.set()
            print(f"phi3ref: compiling the Numba kernels for {what} (first use only: they are cached in "
                  f"{cache_folder_in_use()}) ...", file=sys.stderr, flush=True)

    timer = threading.Timer(after, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            done.set()
            if said.is_set():
                print(f"phi3ref: kernels ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


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
