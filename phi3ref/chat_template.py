"""Chat messages -> prompt text, with the model file's own Jinja template.

A template read from a downloaded file is untrusted code. It runs in jinja2's immutable
sandbox, which refuses attribute access to Python internals and mutation of the values it
is given, and within limits that the sandbox does not set:

* **time**: rendering (compiling included) stops after :data:`RENDER_SECONDS`; a trace
  function checks the clock at every line of template code and every Python call, so
  nested loops and ``lipsum(n=10**7)`` end;
* **size**: the output stops at :data:`MAX_OUTPUT_CHARS` characters; ``*``, ``+`` and ``~``
  may not build a string or list longer than that, nor ``*`` / ``**`` an integer of more than
  :data:`MAX_INT_BITS` bits; no function, method or filter takes an integer argument, nor
  a format string a field width, larger than :data:`MAX_ARGUMENT` (``'a' * 10**10``,
  ``'%10000000000s' | format``, ``'x'.ljust(10**9)``); memory that grows by more than
  :data:`MAX_MEMORY_GROWTH` bytes while rendering stops it.

Every failure is a ``ValueError`` that says the template is at fault.
"""

from __future__ import annotations

import functools
import os
import re
import resource
import sys
import time
from typing import Any, Mapping, Sequence

from jinja2 import TemplateError
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ISOLATE", "PHI3_TEMPLATE", "render_chat", "RENDER_SECONDS", "MAX_OUTPUT_CHARS", "MAX_MEMORY_GROWTH"]

# The Phi-3 format, for files that carry no template: each message as <|role|>\n...<|end|>\n,
# then the assistant's turn is opened.
PHI3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")

RENDER_SECONDS = 2.0  # a real chat template renders in milliseconds
MAX_OUTPUT_CHARS = 4_000_000  # far more than any Phi-3 context holds (about 4 characters a token)
MAX_ARGUMENT = 1_000_000
MAX_INT_BITS = 4096
MAX_MEMORY_GROWTH = 512 * 2**20


class _LimitExceeded(Exception):
    """A template went past one of the rendering limits."""


def _raise(message: str) -> None:
    raise TemplateError(message)


# %-format conversions and {}-format fields, for their widths and precisions
_PERCENT_SPEC = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")


def _check_format_string(fmt: str) -> None:
    for m in _PERCENT_SPEC.finditer(fmt):
        for n in m.groups():
            if n == "*" or (n is not None and int(n) > MAX_ARGUMENT):
                raise _LimitExceeded(f"the format {m.group(0)!r} asks for a width beyond {MAX_ARGUMENT}")
    for m in _BRACE_SPEC.finditer(fmt):
        if any(int(n) > MAX_ARGUMENT for n in re.findall(r"\d+", m.group(1))):
            raise _LimitExceeded(f"the format field {m.group(0)!r} asks for a width beyond {MAX_ARGUMENT}")


def _check_arguments(what: str, args: tuple, kwargs: dict) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and abs(value) > MAX_ARGUMENT:
            raise _LimitExceeded(f"{what} was given {value}, beyond the limit of {MAX_ARGUMENT}")


def _sized(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > MAX_OUTPUT_CHARS:
        raise _LimitExceeded(f"a value of {len(value):,} items, beyond the limit of {MAX_OUTPUT_CHARS:,}")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _LimitExceeded(f"an integer of more than {MAX_INT_BITS} bits")
    return value


class _BoundedCodeGenerator(CodeGenerator):
    """jinja2's compiler, with ``a ~ b`` (string concatenation, which the sandbox does not
    intercept as it does ``+``) passed through the size limit: ``{% set ns.x = ns.x ~ ns.x %}``
    in a loop would otherwise double a string until memory runs out."""

    def visit_Concat(self, node: Any, frame: Any) -> None:
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(")")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with the size limits of the module docstring."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    @staticmethod
    def sized(value: Any) -> Any:
        """The compiled template's check on a concatenation's result."""
        return _sized(value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                    raise _LimitExceeded(f"{len(seq)} items times {n} is beyond the limit of {MAX_OUTPUT_CHARS:,}")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _LimitExceeded(f"a product of more than {MAX_INT_BITS} bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right * left.bit_length() > MAX_INT_BITS:
                raise _LimitExceeded(f"{left} ** {right} has more than {MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left)
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            if len(left) + len(right) > MAX_OUTPUT_CHARS:
                raise _LimitExceeded(f"a concatenation beyond the limit of {MAX_OUTPUT_CHARS:,} items")
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        _check_arguments(getattr(__obj, "__name__", "a function"), args, kwargs)
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _check_format_string(obj)
        return super().getattr(obj, attribute)


def _bounded_filter(name: str, f: Any) -> Any:
    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(f"the filter {name!r}", args, kwargs)
        if name == "format" and args and isinstance(args[0], str):
            _check_format_string(args[0])
        return _sized(f(*args, **kwargs))

    return bounded


def _resident_bytes() -> int:
    """This process's resident memory now (Linux), else its peak (elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class _Watchdog:
    """A trace function that ends rendering at the deadline or when memory has grown too
    much: checked at every call and at every line of template code (the memory at most
    every 5 ms: reading it costs a system call)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.memory_limit = _resident_bytes() + MAX_MEMORY_GROWTH
        self.next_memory_check = 0.0

    def check(self) -> None:
        now = time.monotonic()
        if now > self.deadline:
            raise _LimitExceeded(f"rendering took more than {self.seconds} s")
        if now >= self.next_memory_check:
            self.next_memory_check = now + 0.005
            if _resident_bytes() > self.memory_limit:
                raise _LimitExceeded(f"rendering grew memory by more than {MAX_MEMORY_GROWTH // 2**20} MiB")

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        self.check()
        return self.line if frame.f_code.co_filename == "<template>" else None

    def line(self, frame: Any, event: str, arg: Any) -> Any:
        self.check()
        return self.line


def _environment() -> _BoundedSandbox:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    return env


def render_chat(
    messages: Sequence[Mapping[str, str]],
    template: str | None = None,
    *,
    bos_token: str = "<s>",
    eos_token: str = "<|endoftext|>",
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` ([{"role": "user", "content": "..."}, ...]) with ``template``
    (the file's ``tokenizer.chat_template``; the Phi-3 format when None). ``ValueError``
    for malformed messages or a template that fails or exceeds the module's limits.

    On Linux the template renders in a forked child process whose address space is
    limited (:data:`MAX_MEMORY_GROWTH` above this process's) and which is killed at the
    deadline: a single call that would allocate gigabytes, or run for minutes inside C
    (where no trace function is called), ends there, not in this process."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r:.200}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has role {m['role']!r}; Phi-3 knows {', '.join(ROLES)}")
        clean.append({"role": m["role"], "content": m["content"]})
    if template is not None and not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")
    for name, value in (("bos_token", bos_token), ("eos_token", eos_token)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    render = functools.partial(_render, clean, template or PHI3_TEMPLATE, bos_token, eos_token, bool(add_generation_prompt))
    # phi3ref's own template needs no containment: only a file's template runs in a child
    return _in_child(render) if ISOLATE and template is not None else render()


def _render(messages: list[dict[str, str]], template: str, bos_token: str, eos_token: str, add_generation_prompt: bool) -> str:
    """Render in this process, within the in-process limits (the trace-function watchdog,
    the size checks of the sandbox)."""
    watchdog = _Watchdog(RENDER_SECONDS)
    previous = sys.gettrace()
    sys.settrace(watchdog)
    try:
        env = _environment()
        pieces, size = [], 0
        for piece in env.from_string(template).generate(
            messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
        ):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise _LimitExceeded(f"the output grew beyond {MAX_OUTPUT_CHARS:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    except _LimitExceeded as e:
        raise ValueError(f"the chat template exceeded a limit: {e}") from None
    except MemoryError:
        raise ValueError(f"the chat template exceeded a limit: rendering grew memory by more than "
                         f"{MAX_MEMORY_GROWTH // 2**20} MiB") from None
    except TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from None
    except (Exception, RecursionError) as e:  # the template is untrusted code: any failure is its own
        raise ValueError(f"the chat template failed: {type(e).__name__}: {str(e)[:200]}") from None
    finally:
        sys.settrace(previous)


# Render in a forked child (Linux only: fork with threads is not safe on macOS, and Windows
# has no fork). Set to False to render in this process, within the in-process limits alone.
ISOLATE = sys.platform.startswith("linux") and hasattr(os, "fork")
CHILD_GRACE_SECONDS = 1.0  # beyond RENDER_SECONDS: the fork, and the child's own deadline


def _in_child(render) -> str:
    """``render()`` in a forked child with an address-space limit; its text, or the
    ``ValueError`` it raised; killed (a ``ValueError`` too) when it outlives the deadline."""
    import pickle
    import select
    import signal
    import warnings

    read_end, write_end = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns that forking a threaded process may deadlock
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: render, send (ok, text) or (error, message), leave at once
        try:
            os.close(read_end)
            _limit_address_space(MAX_MEMORY_GROWTH)
            try:
                reply = ("ok", render())
            except ValueError as e:
                reply = ("error", str(e))
            except BaseException as e:  # noqa: BLE001 - whatever happens in the child is the template's
                reply = ("error", f"the chat template failed: {type(e).__name__}")
            try:
                data = pickle.dumps(reply)
            except MemoryError:
                data = pickle.dumps(("error", f"the chat template exceeded a limit: rendering grew memory by more than "
                                              f"{MAX_MEMORY_GROWTH // 2**20} MiB"))
            view = memoryview(data)
            while view:
                view = view[os.write(write_end, view):]
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, done, status = [], False, None
    deadline = time.monotonic() + RENDER_SECONDS + CHILD_GRACE_SECONDS
    poller = select.poll()  # (not select(): it fails for descriptors past 1023)
    poller.register(read_end, select.POLLIN | select.POLLHUP)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                break
            chunk = os.read(read_end, 1 << 20)
            if not chunk:
                done = True
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        if not done:
            os.kill(pid, signal.SIGKILL)
        try:
            status = os.waitpid(pid, 0)[1]
        except ChildProcessError:  # reaped already: SIGCHLD ignored, or the caller's handler waits for children
            pass
    if not done:
        raise ValueError(f"the chat template exceeded a limit: rendering took more than {RENDER_SECONDS} s")
    try:
        kind, value = pickle.loads(b"".join(chunks))
    except Exception:  # noqa: BLE001 - the child died before it could answer
        how = ("status unknown" if status is None else f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.WEXITSTATUS(status)}")
        raise ValueError(f"the chat template failed: the renderer ended without a reply ({how})") from None
    if kind != "ok":
        raise ValueError(value)
    return value


def _limit_address_space(extra: int) -> None:
    """Let this process map at most ``extra`` bytes more than it has mapped now: beyond,
    an allocation fails (MemoryError) instead of growing."""
    try:
        with open("/proc/self/statm", "rb") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError):  # no /proc, or a limit that cannot be lowered: the watchdog still runs
        pass
