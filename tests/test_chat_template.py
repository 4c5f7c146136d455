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
