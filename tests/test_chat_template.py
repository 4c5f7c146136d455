"""Chat templates are untrusted code: sandboxed, and contained in time and memory; every
failure is a ValueError that blames the template."""

from __future__ import annotations

import time

import pytest

from phi3ref import chat_template
from phi3ref.chat_template import RENDER_SECONDS, render_chat
from phi3ref.gguf_file import GGUFFile
from phi3ref.synthetic import vocab_path

MESSAGES = [{"role": "user", "content": "Write a haiku about ice hockey"}]


@pytest.mark.parametrize(
    "template,message",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than"),
        ("{{ lipsum(n=10**7) }}", "beyond the limit"),
        ("{{ lipsum(n=100000) }}", "took more than"),
        ("{{ 'a' * 10**10 }}", "beyond the limit"),
        ("{{ [1] * 10**9 }}", "beyond the limit"),
        ("{{ '%10000000000s' | format('x') }}", "asks for a width"),
        ("{{ '%-99999999999d' % 1 }}", "asks for a width"),
        ("{{ '{:>9999999999}'.format(1) }}", "asks for a width"),
        ("{{ '{:{}}'.format(1, 10**9) }}", "beyond the limit"),
        ("{{ 'x'.ljust(10**9) }}", "beyond the limit"),
        ("{{ 'a' | center(10**9) }}", "beyond the limit"),
        ("{{ 2 ** 100000 }}", "bits"),
        ("{% for i in range(100000) %}{{ 'a' * 1000000 }}{% endfor %}", "output grew beyond"),
        ("{% set ns = namespace(x='a') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}", "beyond the limit"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
        ("{% include 'other' %}", "no loader"),
        ("{% extends 'other' %}", "no loader"),
        ("{% import 'other' as o %}", "no loader"),
        ("{{ messages[0]['content'] / 0 }}", "TypeError"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{% for %}", "the chat template failed"),
        ("{{ ().__class__.__base__.__subclasses__() }}", "the chat template failed"),
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{{ range(10**6) | list }}", "OverflowError"),
    ],
)
def test_hostile_templates(template, message):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="the chat template") as e:
        render_chat(MESSAGES, template)
    assert message in str(e.value)
    assert time.perf_counter() - start < RENDER_SECONDS + 3


@pytest.mark.skipif(not chat_template.ISOLATE, reason="templates render in a child process on Linux only")
@pytest.mark.parametrize(
    "template,message",
    [
        # one call each that would allocate gigabytes, or run for minutes inside C
        ("{{ ('a' * 999999).replace('a', 'a' * 2400) | length }}", "grew memory"),
        ("{{ (('%999999s' * 2400) % ((1,) * 2400)) | length }}", "grew memory"),
        ("{{ ('\t' * 2400).expandtabs(999999) | length }}", "grew memory"),
        ("{{ ('x' * 999999).join(('a' * 1000) | list) | length }}", "grew memory"),
        ("{{ (([[1, 2, 3]] * 100000) | sum(start=[])) | length }}", "took more than"),
    ],
)
def test_a_single_call_is_contained_by_the_child(template, message):
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ValueError, match="the chat template exceeded a limit") as e:
        render_chat(MESSAGES, template)
    assert message in str(e.value)
    assert time.perf_counter() - start < RENDER_SECONDS + chat_template.CHILD_GRACE_SECONDS + 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss == peak  # nothing grew here


@pytest.mark.parametrize("isolate", [True, False], ids=["child", "in-process"])
def test_the_in_process_limits_hold_without_the_child(isolate, monkeypatch):
    """Where templates render in this process (not Linux), its own limits still apply."""
    monkeypatch.setattr(chat_template, "ISOLATE", isolate and chat_template.ISOLATE)
    with pytest.raises(ValueError, match="took more than"):
        render_chat(MESSAGES, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    with pytest.raises(ValueError, match="beyond the limit"):
        render_chat(MESSAGES, "{{ 'a' * 10**10 }}")
    assert render_chat(MESSAGES, "{{ messages[0]['content'] }}!") == MESSAGES[0]["content"] + "!"


def test_memory_growth_stops_rendering(monkeypatch):
    # Many strings, each within the size limit, kept in a list: only the memory watchdog
    # stops this. The time limit is lifted so that a slow, busy machine reaches the memory
    # limit first, and the memory the allocator holds from earlier tests is outgrown (4 GB).
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 120.0)
    template = "{% set ns = namespace(l=[]) %}{% for i in range(2000) %}{% set ns.l = ns.l + ['ab' * 1000000 ~ i] %}{% endfor %}"
    with pytest.raises(ValueError, match="grew memory by more than"):
        render_chat(MESSAGES, template)


def test_limits_leave_real_templates_alone():
    with GGUFFile(vocab_path()) as gf:
        template = gf.get_str("tokenizer.chat_template")
    out = render_chat(MESSAGES * 3, template)
    assert out.count("<|user|>") == 3 and out.endswith("<|assistant|>\n")
    assert render_chat(MESSAGES, "{{ 'ab' * 3 }}{{ '%5s|' % 'x' }}{{ '{:>4}'.format(7) }}") == "ababab    x|   7"


def test_template_must_be_a_string():
    with pytest.raises(TypeError, match="template must be a str"):
        render_chat(MESSAGES, 7)


def test_the_caller_s_trace_function_is_restored():
    import sys

    seen = []

    def tracer(frame, event, arg):
        seen.append(event)
        return None

    sys.settrace(tracer)
    try:
        render_chat(MESSAGES)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)


@pytest.mark.skipif(not chat_template.ISOLATE, reason="templates render in a child process on Linux only")
def test_the_child_survives_the_caller_s_process_habits():
    """A caller that ignores SIGCHLD (its children reaped by the kernel), or that holds more
    than 1,023 open files (select() cannot watch their descriptors), still renders."""
    import os
    import resource
    import signal

    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        assert render_chat(MESSAGES) == "<s><|user|>\nWrite a haiku about ice hockey<|end|>\n<|assistant|>\n"
        with pytest.raises(ValueError, match="took more than"):
            render_chat(MESSAGES, "{{ (([[1, 2, 3]] * 100000) | sum(start=[])) | length }}")
    finally:
        signal.signal(signal.SIGCHLD, previous)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the open-file limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    files = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert render_chat(MESSAGES).endswith("<|assistant|>\n")
    finally:
        for f in files:
            os.close(f)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_phi4_generation_s_templates():
    """Phi-4's ChatML-style template (<|im_sep|> between role and content) and Phi-4-mini's
    render as those models expect; the generation prompt ends where the reply begins."""
    from phi3ref.tiktoken_vocab import PHI4, PHI4_MINI

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(messages, PHI4.template, bos_token="<|endoftext|>", eos_token="<|im_end|>") == (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>")
    assert render_chat(messages, PHI4_MINI.template, bos_token="<|endoftext|>", eos_token="<|endoftext|>") == (
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>")
    assert render_chat(messages, PHI4_MINI.template, eos_token="<|endoftext|>", add_generation_prompt=False).endswith("<|end|><|endoftext|>")
