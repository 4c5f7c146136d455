"""phi3ref's tokenizer against llama.cpp's on the same GGUF vocabulary (tier crosscheck)."""

from __future__ import annotations

import pytest

from phi3ref.synthetic import vocab_path
from phi3ref.tokenizer import Tokenizer

pytestmark = pytest.mark.crosscheck
llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = [
    "<|user|>\nWrite a haiku about ice hockey<|end|>\n<|assistant|>",
    "<|system|>\nYou are nice.<|end|>\n<|user|>\nHi there</s> ok<|end|>\n<|assistant|>\n",
    "plain 🦙 text  with  spaces\n\n\tand tabs",
    "",
    "<|end|>",
    "a<|end|>b",
    " <|user|> ",
    "日本語のテキスト 😀👍🏽",
    "[PAD32011] x",
    "<s>hi</s>  <unk>",
    "<|endoftext|> a",
    "   leading and trailing   ",
    "Numbers 3.14159 and 1,000,000 and 0x1F",
]


@pytest.fixture(scope="module")
def both():
    llm = llama_cpp.Llama(model_path=str(vocab_path()), vocab_only=True, verbose=False)
    yield Tokenizer.from_gguf(vocab_path()), llm
    llm.close()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("special", [True, False])
@pytest.mark.parametrize("add_bos", [True, False])
def test_same_ids_as_llama_cpp(both, text, special, add_bos):
    ours, llm = both
    if add_bos and text.startswith("<s>"):
        pytest.skip("llama.cpp warns about a doubled BOS")
    assert ours.encode(text, add_bos=add_bos, special=special) == llm.tokenize(text.encode(), add_bos=add_bos, special=special)
