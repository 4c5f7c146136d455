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


# -- GPT-2-style byte-level BPE: every pre-tokenizer name a Phi-family file can carry ------------
# llama.cpp's own vocabularies (models/ggml-vocab-*.gguf in its sources: GPT-2's 50k and
# Llama 3's 128k tiktoken-style BPE), with tokenizer.ggml.pre set to each name in turn:
# the same merges split by another pre-tokenizer must still give llama.cpp's ids.

BPE_TEXTS = TEXTS + [
    "def f(x):\n    return x**2  # square\n\n\nclass A(B):\n\tpass\n",
    "    indented\n        more\r\n\r\n   \n",
    "I'm sure they'll say it's fine; we've done what you'd DO, WE'VE TOLD YOU'RE",
    "12345678901234567890 3.14159e-10 -42 +7 1,000,000 ٣٤٥ ⅷ",
    "漢字とかなカナ混じり文。中文标点，还有全角ＡＢＣ！한국어 텍스트",
    "emoji 🦙🔥👍🏽 👨‍👩‍👧 flags 🇫🇷 and ZWJ",
    "CamelCaseWords HTTPServer iOSDevice ПриветМир ÉcoleNormale helloМир",
    "café cafe\u0301 naïve Ångström ﬁne ß ſ",
    "a  b   c\t\td\n\ne  \n  f",
    "$x+=<y>^~|z!! ... ?!? ''' \"\"\" `code` @user #tag 50% &amp;",
    "<|endoftext|>Hello<|endoftext|> world",
    "Cửa Việt, Hà Nội — tiếng Việt có dấu",  # Llama 3 has words its merges never build whole
    "don't stop, (ok) 12345 [a]{b} x=1;y=2",
]
BPE_CASES = [("gpt-2", "gpt-2"), ("gpt-2", "phi-2"), ("gpt-2", "default"),
             ("llama-bpe", "llama-bpe"), ("llama-bpe", "llama3"), ("llama-bpe", "llama-v3"),
             ("llama-bpe", "dbrx"), ("llama-bpe", "smaug-bpe"), ("llama-bpe", "gpt-4o"), ("llama-bpe", "default")]


@pytest.fixture(scope="module")
def llama_cpp_models():
    from phi3ref.llama_builds import BuildError, source_tree

    try:
        return source_tree() / "models"
    except BuildError as e:
        pytest.skip(f"llama.cpp's sources are not at hand: {e}")


@pytest.fixture(scope="module")
def bpe_pair(llama_cpp_models, tmp_path_factory):
    from craft import VT, rewrite_gguf

    made = {}

    def get(vocab: str, pre: str):
        if (vocab, pre) not in made:
            path = rewrite_gguf(llama_cpp_models / f"ggml-vocab-{vocab}.gguf", tmp_path_factory.mktemp("bpe") / f"{vocab}-{pre}.gguf",
                                set_kv={"tokenizer.ggml.pre": (VT.STRING, pre)})
            made[vocab, pre] = (Tokenizer.from_gguf(path), llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False))
        return made[vocab, pre]

    yield get
    for _, llm in made.values():
        llm.close()


@pytest.mark.parametrize("vocab,pre", BPE_CASES)
def test_bpe_pre_tokenizers_give_llama_cpp_s_ids(bpe_pair, vocab, pre):
    """Each text with and without special-token parsing; BOS as the file (and the
    pre-tokenizer's default, e.g. llama3 adds one) says. Decoding is compared where
    llama.cpp does not "clean spaces" (it drops the space before , . ! ? when it
    detokenizes with every other BPE pre-tokenizer, but not in the pieces generation
    streams, which phi3ref's decode follows)."""
    ours, llm = bpe_pair(vocab, pre)
    for text in BPE_TEXTS:
        for special in (True, False):
            theirs = llm.tokenize(text.encode(), add_bos=True, special=special)  # add_bos=True: as the vocabulary says
            assert ours.encode(text, special=special) == theirs, (pre, text, special)
            if pre == "gpt-4o":
                assert ours.decode(theirs) == llm.detokenize(theirs).decode("utf-8", "replace"), (pre, text)


@pytest.mark.parametrize("vocab,pre", [("gpt-2", "gpt-2"), ("llama-bpe", "llama-bpe")])
def test_bpe_vocabularies_pass_llama_cpp_s_own_test_vectors(llama_cpp_models, vocab, pre):
    """models/ggml-vocab-*.gguf.inp / .out: the texts and ids llama.cpp's test-tokenizer-0
    holds it to (made with the models' own Hugging Face tokenizers)."""
    inputs = (llama_cpp_models / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (llama_cpp_models / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    ours = Tokenizer.from_gguf(llama_cpp_models / f"ggml-vocab-{vocab}.gguf")
    assert len(inputs) >= 30 and len(outputs) >= len(inputs)
    for text, expected in zip(inputs, outputs):
        assert ours.encode(text, add_bos=False, special=False) == [int(t) for t in expected.split()], text


# -- The Phi-4 generation's vocabularies: cl100k's and o200k's ranks, as the converter stores them --


@pytest.fixture(scope="module")
def tiktoken_pair(tiny_model):
    """The tokenizers of a ``phi4`` or ``phi4-mini`` preset's model file (tiktoken's ranks,
    the model's special tokens and pre-tokenizer): phi3ref's, llama.cpp's, and the
    reference encoder of bpe-openai."""
    bpe_openai = pytest.importorskip("bpe_openai")
    made = []

    def get(preset: str):
        path = tiny_model(preset, "Q4_0")
        made.append(llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False))
        from phi3ref.tiktoken_vocab import VOCABULARIES

        return Tokenizer.from_gguf(path), made[-1], bpe_openai.get_encoding(VOCABULARIES[preset][0])

    yield get
    for llm in made:
        llm.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # bpe-openai reads its data with importlib's old API
@pytest.mark.parametrize("model", ["phi4", "phi4-mini"])
def test_phi4_vocabularies_give_llama_cpp_s_and_tiktoken_s_ids(tiktoken_pair, model):
    """phi3ref's tokens on Phi-4's vocabulary (cl100k, dbrx) and Phi-4-mini's (o200k,
    gpt-4o) equal llama.cpp's, special tokens parsed or not, and — without special tokens —
    tiktoken's own encoding as bpe-openai computes it."""
    from phi3ref.tiktoken_vocab import VOCABULARIES

    special = VOCABULARIES[model][1]
    ours, llm, reference = tiktoken_pair(model)
    for text in BPE_TEXTS:
        for parse in (True, False):
            assert ours.encode(text, special=parse) == llm.tokenize(text.encode(), add_bos=True, special=parse), (text, parse)
        assert ours.encode(text, special=False) == list(reference.encode_ordinary(text)), text
    for token_id, text in special.named.items():
        assert ours.encode(text, special=True) == [token_id]
    assert not ours.add_bos
    assert ours.eos_id == ours.encode(special.eos, special=True)[0] and ours.eos_id in ours.eog_ids
