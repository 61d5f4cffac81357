"""minqwen: Qwen2 from scratch in plain PyTorch, one concept per module.

>>> import minqwen
>>> model = minqwen.from_pretrained("path/to/Qwen2-0.5B")  # doctest: +SKIP
"""

from .cache import KVCache
from .chat import Chat
from .config import Qwen2Config
from .generate import generate, stream
from .loading import from_pretrained, hub, save_pretrained
from .loss import lm_loss
from .model import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from .quant import quantize
from .sampling import GenerationConfig
from .tokenizer import Tokenizer

__all__ = [
    "hub",
    "KVCache",
    "Chat",
    "GenerationConfig",
    "Qwen2Config",
    "Qwen2DecoderLayer",
    "Qwen2ForCausalLM",
    "Qwen2Model",
    "Tokenizer",
    "from_pretrained",
    "generate",
    "lm_loss",
    "quantize",
    "save_pretrained",
    "stream",
]
__version__ = "0.1.0"
