"""Chat messages -> prompt text, with the model file's own Jinja template.

A template read from a downloaded file is untrusted input: it runs in jinja2's immutable
sandbox, which refuses attribute access to Python internals and mutation of the values
it is given.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["PHI3_TEMPLATE", "render_chat"]

# The Phi-3 format, for files that carry no template: each message as <|role|>\n...<|end|>\n,
# then the assistant's turn is opened.
PHI3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")


def _raise(message: str) -> None:
    raise TemplateError(message)


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
    for malformed messages or a template that fails."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has role {m['role']!r}; Phi-3 knows {', '.join(ROLES)}")
        clean.append({"role": m["role"], "content": m["content"]})
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template or PHI3_TEMPLATE).render(
            messages=clean, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from None
