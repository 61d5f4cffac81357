"""minqwen: Qwen2 from scratch in plain PyTorch, one concept per module.

>>> import minqwen
>>> model = minqwen.from_pretrained("path/to/Qwen2-0.5B")  # doctest: +SKIP
"""

from . import hub
from .cache import KVCache
from .config import Qwen2Config
from .loss import lm_loss
from .model import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from .tokenizer import Tokenizer
from .weights import from_pretrained, save_pretrained

__all__ = [
    "hub",
    "KVCache",
    "Qwen2Config",
    "Qwen2DecoderLayer",
    "Qwen2ForCausalLM",
    "Qwen2Model",
    "Tokenizer",
    "from_pretrained",
    "lm_loss",
    "save_pretrained",
]
__version__ = "0.1.0"
