"""Qwen2 hyper-parameters, named exactly as in Hugging Face's ``config.json``.

A checkpoint's ``config.json`` loads with :meth:`Qwen2Config.from_json` and writes back with
:meth:`Qwen2Config.to_dict` without renaming a single key. Keys that minqwen does not use are
kept aside in ``extra`` (so a round trip loses nothing) instead of being an error.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fields a config.json must name: without them the model's shapes are unknown.
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

# Optional fields that HF's Qwen2 config.json does not carry unless they are set.
OMIT_WHEN_NONE = ("dual_chunk_attention_config", "layer_types")
# How a layer attends, by HF's names (``config.layer_types``).
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class Qwen2Config:
    """Everything that fixes a Qwen2 model's shape and numerics.

    Defaults are those of Hugging Face's ``Qwen2Config``; :meth:`qwen2_0_5b` gives the
    published Qwen2-0.5B values.
    """

    vocab_size: int = 151936  # number of token ids (rows of the embedding table)
    hidden_size: int = 4096  # width of the residual stream
    intermediate_size: int = 22016  # width of the SwiGLU MLP's hidden layer
    num_hidden_layers: int = 32  # number of decoder blocks
    num_attention_heads: int = 32  # query heads per layer
    num_key_value_heads: int | None = None  # key/value heads (GQA); None means = query heads
    head_dim: int | None = None  # per-head width; None (as in HF's config.json) means hidden_size // heads
    hidden_act: str = "silu"  # activation of the MLP's gate (Qwen2 uses SiLU)
    max_position_embeddings: int = 32768  # longest context the model was trained for
    initializer_range: float = 0.02  # std of the normal init of fresh weights
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    use_cache: bool = True  # HF flag; minqwen decides caching per call
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    rope_theta: float = 10000.0  # RoPE base: wavelengths grow as theta ** (2i / head_dim)
    rope_scaling: dict[str, Any] | None = None  # long-context RoPE scaling (linear, dynamic, yarn)
    use_sliding_window: bool = False  # some layers attend only to a recent window
    sliding_window: int | None = 4096  # window length, the query itself included
    max_window_layers: int = 28  # layers with index >= this use the sliding window
    layer_types: list[str] | None = None  # per layer "full_attention" / "sliding_attention" (transformers 5)
    attention_dropout: float = 0.0  # HF field; minqwen trains without attention dropout
    dual_chunk_attention_config: dict[str, Any] | None = None  # DCA (Qwen2.5-1M naming)
    bos_token_id: int | None = None  # beginning-of-sequence id, if the checkpoint names one
    eos_token_id: int | list[int] | None = None  # end-of-sequence id(s)
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, e.g. "bfloat16"
    model_type: str = "qwen2"  # always "qwen2"; kept so config.json round-trips
    architectures: list[str] | None = None  # e.g. ["Qwen2ForCausalLM"]
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, kept aside

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()
        if self.head_dim is None:  # HF's Qwen2 derives it the same way where config.json has none
            self.head_dim = self.hidden_size // self.num_attention_heads

    # ----------------------------------------------------------------- derived values
    @property
    def head_size(self) -> int:
        """Deprecated name of :attr:`head_dim`."""
        warnings.warn("Qwen2Config.head_size is deprecated; use head_dim (HF's name)", DeprecationWarning, stacklevel=2)
        return self.head_dim

    @property
    def num_key_value_groups(self) -> int:
        """How many query heads share one key/value head (1 = MHA, heads = MQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def layer_type(self, layer_idx: int) -> str:
        """How layer ``layer_idx`` attends: ``"full_attention"`` or ``"sliding_attention"`` (HF's names).

        Without ``use_sliding_window`` every layer is full. With it, ``layer_types`` (written by
        transformers 5) names each layer; older config.json files use HF's earlier rule: layers
        from ``max_window_layers`` on are windowed.
        """
        if not self.use_sliding_window:
            return "full_attention"
        if self.layer_types is not None:
            return self.layer_types[layer_idx]
        return "sliding_attention" if layer_idx >= self.max_window_layers else "full_attention"

    def layer_uses_sliding_window(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` attends only to the last ``sliding_window`` positions."""
        return self.layer_type(layer_idx) == "sliding_attention"

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when values cannot make a model."""
        for name in REQUIRED_FIELDS + ("num_key_value_heads",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Qwen2Config.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Qwen2Config.num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen2Config.num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if (self.head_dim or self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"Qwen2Config.head_dim must be even for RoPE, got {self.head_dim}")
        if self.layer_types is not None and (
            len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES)
        ):
            raise ValueError(
                f"Qwen2Config.layer_types must name one of {LAYER_TYPES} for each of the "
                f"{self.num_hidden_layers} layers, got {self.layer_types!r}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"Qwen2Config.hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if self.use_sliding_window and (not self.sliding_window or self.sliding_window < 1):
            raise ValueError(
                f"Qwen2Config.sliding_window must be a positive integer when use_sliding_window "
                f"is true, got {self.sliding_window!r}"
            )
        if self.rms_norm_eps <= 0:
            raise ValueError(f"Qwen2Config.rms_norm_eps must be positive, got {self.rms_norm_eps}")

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Qwen2Config":
        """Build from a ``config.json`` dict; unknown keys go to ``extra``, missing required raise."""
        if not isinstance(d, dict):
            raise ValueError(f"Qwen2Config.from_dict expects a dict, got {type(d).__name__}")
        missing = [name for name in REQUIRED_FIELDS if name not in d]
        if missing:
            raise ValueError(f"Qwen2Config: missing required field(s) {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        extra.update(d.get("extra", {}) or {})
        # HF's newer name for the RoPE settings: {"rope_type": ..., "rope_theta": ..., ...}.
        rope_parameters = extra.get("rope_parameters")
        if isinstance(rope_parameters, dict):
            kwargs.setdefault("rope_theta", rope_parameters.get("rope_theta", cls.rope_theta))
            if rope_parameters.get("rope_type", "default") != "default":
                kwargs.setdefault("rope_scaling", dict(rope_parameters))
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen2Config":
        """Read a ``config.json`` file (errors name the file)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config file at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict (HF names; unknown keys from loading are put back).

        ``head_dim`` is written only where it differs from ``hidden_size // num_attention_heads``,
        the value HF's Qwen2 uses when config.json has none (its Qwen2Config has no such field).
        """
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {k: v for k, v in d.items() if v is not None or k not in OMIT_WHEN_NONE}
        if d["head_dim"] == self.hidden_size // self.num_attention_heads:
            del d["head_dim"]
        d.setdefault("architectures", ["Qwen2ForCausalLM"])
        return {**self.extra, **d}

    def to_json(self, path: str | Path) -> None:
        """Write ``config.json``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    # ----------------------------------------------------------------- presets
    @classmethod
    def qwen2_0_5b(cls) -> "Qwen2Config":
        """Qwen2-0.5B as published (tied embeddings): 494,032,768 parameters."""
        return cls(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=131072,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=131072,
            max_window_layers=24,
            bos_token_id=151643,
            eos_token_id=151643,
            torch_dtype="bfloat16",
        )
