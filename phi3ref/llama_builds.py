"""llama.cpp built at each instruction-set level, from the installed llama-cpp-python's sources.

A llama.cpp build computes in the arithmetic of the instruction set it was compiled for
(:mod:`phi3ref.isa`); llama-cpp-python compiles it natively, for the host alone. To hold
phi3ref against every level a CPU can run (an AVX-512 machine checks its own level and
AVX2's), :func:`build` compiles the same llama.cpp once per level — a non-native build
with that level's GGML_* options — and :mod:`phi3ref.crosscheck` loads it through
llama-cpp-python (``LLAMA_CPP_LIB_PATH``) in a child process.

The sources are the llama-cpp-python source distribution of the installed version,
fetched from the package index with pip; builds go to ``$PHI3REF_CACHE`` (default
``~/.cache/phi3ref``), ``llama.cpp-<version>/<level>/``, once (about two minutes each on
two cores). It needs cmake and a C/C++ compiler.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .isa import Level
from .user_cache import cache_root

__all__ = ["BuildError", "TOOLS", "build", "build_tool", "installed_version", "library_dir", "tool_path"]

PACKAGE = "llama-cpp-python"
# only what llama-cpp-python's bindings load; no tools, tests, examples or network code
_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
]


# llama.cpp's own command-line tools that phi3ref is checked against (tools/<name>/)
TOOLS = ("llama-perplexity",)
_TOOL_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
]


class BuildError(RuntimeError):
    """llama.cpp could not be fetched or built; the message says which step and why."""


def installed_version() -> str:
    """The installed llama-cpp-python's version (``BuildError`` if it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        raise BuildError(f"{PACKAGE} is not installed (pip install phi3ref[crosscheck])") from None


def library_dir(level: Level, version: str | None = None) -> Path:
    """The directory that holds (or will hold) libllama.so built at ``level``."""
    return cache_root() / f"llama.cpp-{version or installed_version()}" / level.name / "build" / "bin"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (another process building the same thing waits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: list[str], step: str, log: Path, **kwargs) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise BuildError(f"{step} failed (exit {done.returncode}); the end of {log}:\n" + "\n".join(tail))


def _source_tree(version: str) -> Path:
    """vendor/llama.cpp of llama-cpp-python's source distribution, fetched once."""
    root = cache_root() / f"llama.cpp-{version}"
    tree = root / "source" / "vendor" / "llama.cpp"
    with _locked(root / "source.lock"):
        if (tree / "CMakeLists.txt").exists():
            return tree
        log = root / "source.log"
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            _run(
                [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={version}", "--no-deps", "--no-binary", ":all:", "-d", tmp],
                f"downloading the {PACKAGE} {version} sources", log,
            )
            archives = sorted(Path(tmp).glob("*.tar.gz"))
            if not archives:
                raise BuildError(f"pip downloaded no source archive of {PACKAGE} {version} (see {log})")
            with tarfile.open(archives[0]) as archive:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                    archive.extractall(tmp, filter="data")
                else:
                    archive.extractall(tmp)
            tops = [p for p in Path(tmp).iterdir() if p.is_dir()]
            if len(tops) != 1:
                raise BuildError(f"the {PACKAGE} {version} source archive {archives[0].name} does not hold one top folder")
            (top,) = tops
            shutil.rmtree(root / "source", ignore_errors=True)
            top.rename(root / "source")
    if not (tree / "CMakeLists.txt").exists():
        raise BuildError(f"the {PACKAGE} {version} sources have no vendor/llama.cpp")
    return tree


def source_tree() -> Path:
    """llama.cpp's source tree (``vendor/llama.cpp``) of the installed llama-cpp-python,
    fetched once: its ``models/ggml-vocab-*.gguf`` vocabularies and their test vectors
    serve the tokenizer cross-checks."""
    return _source_tree(installed_version())


def build(level: Level, *, jobs: int | None = None) -> Path:
    """llama.cpp of the installed llama-cpp-python, built at ``level`` (once; cached):
    the directory holding its libllama.so, for ``LLAMA_CPP_LIB_PATH``."""
    for tool in ("cmake", "c++", "cc"):
        if shutil.which(tool) is None:
            raise BuildError(f"building llama.cpp needs {tool!r}, which is not on PATH")
    version = installed_version()
    lib = library_dir(level, version)
    work = lib.parent.parent  # .../<level>
    with _locked(work.parent / f"{level.name}.lock"):
        if (lib / "libllama.so").exists() and (work / "done").exists():
            return lib
        tree = _source_tree(version)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        log = work / "build.log"
        _run(["cmake", "-S", str(tree), "-B", str(work / "build"), *_CMAKE_ARGS, *level.cmake_args], f"configuring llama.cpp for {level}", log)
        jobs = jobs or os.cpu_count() or 1
        _run(["cmake", "--build", str(work / "build"), "--target", "llama", "-j", str(jobs)], f"building llama.cpp for {level}", log)
        (work / "done").write_text(" ".join(level.cmake_args) + "\n")
    return lib


def tool_path(tool: str, level: Level, version: str | None = None) -> Path:
    """Where llama.cpp's command-line ``tool`` built at ``level`` is (or will be)."""
    if tool not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {tool!r}; one of {', '.join(TOOLS)}")
    return cache_root() / f"llama.cpp-{version or installed_version()}" / f"{level.name}-tools" / "build" / "bin" / tool


def build_tool(tool: str, level: Level, *, jobs: int | None = None) -> Path:
    """llama.cpp's command-line ``tool`` (:data:`TOOLS`) from the installed
    llama-cpp-python's sources, built at ``level`` (once; cached, statically linked):
    its path. A few minutes on two cores."""
    path = tool_path(tool, level)
    for program in ("cmake", "c++", "cc"):
        if shutil.which(program) is None:
            raise BuildError(f"building llama.cpp needs {program!r}, which is not on PATH")
    work = path.parent.parent.parent  # .../<level>-tools
    with _locked(work.parent / f"{level.name}-tools.lock"):
        if path.exists() and (work / f"done-{tool}").exists():
            return path
        tree = _source_tree(installed_version())
        work.mkdir(parents=True, exist_ok=True)
        log = work / "build.log"
        if not (work / "build" / "CMakeCache.txt").exists():
            _run(["cmake", "-S", str(tree), "-B", str(work / "build"), *_TOOL_CMAKE_ARGS, *level.cmake_args],
                 f"configuring llama.cpp's tools for {level}", log)
        _run(["cmake", "--build", str(work / "build"), "--target", tool, "-j", str(jobs or os.cpu_count() or 1)],
             f"building {tool} for {level}", log)
        if not path.exists():
            raise BuildError(f"the build of {tool} made no {path} (see {log})")
        (work / f"done-{tool}").write_text(" ".join(level.cmake_args) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m phi3ref.llama_builds [--tool NAME] [--level LEVEL]``: build llama.cpp's
    library (default) or one of its tools at a level (default: this CPU's), print the path."""
    import argparse

    from .isa import LEVELS, host_level

    parser = argparse.ArgumentParser(prog="python -m phi3ref.llama_builds", description=main.__doc__)
    parser.add_argument("--tool", choices=TOOLS, default=None, help="a command-line tool instead of the library")
    parser.add_argument("--level", choices=list(LEVELS), default=None, help="instruction-set level (default: this CPU's)")
    args = parser.parse_args(argv)
    level = LEVELS[args.level] if args.level else host_level()
    try:
        print(build_tool(args.tool, level) if args.tool else build(level))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
