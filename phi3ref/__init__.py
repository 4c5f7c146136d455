"""phi3ref: a pure-Python reference inference library for Microsoft's Phi-3 family in GGUF files."""

from .config import Phi3Config, TensorSpec
from .errors import ModelBusyError, NonFiniteError
from .gguf_file import GGUFError, GGUFFile, TensorInfo, open_gguf
from .generate import Chat, GenerationResult, generate
from .hub import HubError
from .loading import load
from .model import Model
from .sampler import SamplingParams
from .tokenizer import Tokenizer
from .quants import QUANT_TYPES, QuantType, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "Chat",
    "GenerationResult",
    "HubError",
    "ModelBusyError",
    "NonFiniteError",
    "SamplingParams",
    "Tokenizer",
    "generate",
    "GGUFError",
    "GGUFFile",
    "Model",
    "Phi3Config",
    "QUANT_TYPES",
    "QuantType",
    "TensorInfo",
    "TensorSpec",
    "dequantize",
    "load",
    "open_gguf",
    "quantize",
]
