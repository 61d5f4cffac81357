"""Self-checks for the notebooks' exercises.

Each ``check_exercise_*`` takes the reader's function, runs it on fixed inputs and compares it
with the finished piece in ``minqwen``. An answer that still raises ``NotImplementedError`` gets a
friendly "not done yet" (so a fresh notebook runs top to bottom); a wrong answer raises an
``AssertionError`` that says what differs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .config import Qwen2Config


def run_check(name: str, answer: Callable[..., Any], expected: Callable[..., Any], *inputs: Any, atol: float = 1e-5) -> bool:
    """Compare ``answer(*inputs)`` with ``expected(*inputs)``; print the verdict, return True if right."""
    try:
        got = answer(*inputs)
    except NotImplementedError:
        print(f"{name}: not done yet -- fill in the cell above and run this one again.")
        return False
    want = expected(*inputs)
    if isinstance(want, torch.Tensor):
        got = torch.as_tensor(got)
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        worst = (got.float() - want.float()).abs().max().item()
        assert worst <= atol, f"{name}: values differ by up to {worst:.2e} (allowed {atol:.0e})"
    else:
        assert got == want, f"{name}: got {got!r}, expected {want!r}"
    print(f"{name}: correct!")
    return True


def tiny_config(**overrides: Any) -> Qwen2Config:
    """A two-layer Qwen2 small enough for an exercise check to run in milliseconds."""
    fields = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return Qwen2Config(**{**fields, **overrides})


# --------------------------------------------------------------------------- 00 overview
def check_exercise_next_token(next_token: Callable[..., Any]) -> bool:
    """Notebook 00: ``next_token(model, input_ids)`` -> the greedy next token id of each sequence (batch,)."""
    from .model import Qwen2ForCausalLM

    with torch.random.fork_rng():  # a fixed tiny model without touching the reader's random state
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(tiny_config()).eval()
        input_ids = torch.randint(0, model.config.vocab_size, (3, 7))  # (batch, seq)
    with torch.no_grad():
        return run_check("greedy next token", next_token, lambda m, ids: m(ids)[:, -1].argmax(dim=-1), model, input_ids, atol=0)


# --------------------------------------------------------------------------- 01 tokenizer
def check_exercise_learn_merges(learn_merges: Callable[..., Any]) -> bool:
    """Notebook 01: ``learn_merges(pieces, num_merges)`` -> the merges BPE training learns, in order.

    Count every adjacent pair of byte-level symbols (each piece weighted by how often it occurs),
    glue the most frequent pair everywhere (ties: the smaller pair), record it, repeat; stop early
    when no pair occurs twice. Compared with :func:`minqwen.bpe.learn_merges` on small corpora.
    """
    import regex

    from .bpe import QWEN2_PATTERN
    from .bpe import learn_merges as expected

    paragraph = "the cat sat on the mat; the rat sat on the cat. Then the cats sat, and that was that."
    cases = {
        "low lower newest widest": ([" low"] * 5 + [" lower"] * 2 + [" newest"] * 6 + [" widest"] * 3, 10),
        "a tie goes to the smaller pair": (["cd", "ab", "cd", "ab"], 3),
        "overlapping pairs, multi-byte characters": (["aaaa", "aaaa", " été", " été", "étés"], 6),
        "stops when no pair occurs twice": (["abc", "xyz"], 5),
        "a paragraph split by Qwen2's regex": (regex.findall(QWEN2_PATTERN, paragraph), 25),
    }

    def as_pairs(fn: Callable[..., Any]) -> Callable[..., list[tuple[str, str]]]:
        return lambda pieces, num_merges: [tuple(pair) for pair in fn(list(pieces), num_merges)]

    for name, (pieces, num_merges) in cases.items():
        if not run_check(f"learning merges, {name}", as_pairs(learn_merges), as_pairs(expected), pieces, num_merges):
            return False
    return True


# --------------------------------------------------------------------------- 02 embeddings and RMSNorm
def check_exercise_rms_norm(rms_norm: Callable[..., Any]) -> bool:
    """Notebook 02: ``rms_norm(x, weight, eps)`` equals :class:`minqwen.norm.RMSNorm` with that weight.

    Checked in fp32 (to 1e-5) and in bf16 bit for bit: HF's Qwen2 computes the statistics in fp32,
    casts the normalised vector back to the input dtype and only then multiplies by the weight.
    """
    from .norm import RMSNorm

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=generator) * 3 + 1  # (batch, seq, hidden), off-centre on purpose
    weight = 1 + 0.2 * torch.randn(16, generator=generator)  # (hidden,)
    eps = 1e-6

    def expected(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        norm = RMSNorm(x.shape[-1], eps).to(weight.dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
            return norm(x)

    return run_check("RMSNorm in fp32", rms_norm, expected, x, weight, eps) and run_check(
        "RMSNorm in bf16, bit for bit", rms_norm, expected, x.bfloat16(), weight.bfloat16(), eps, atol=0
    )


# --------------------------------------------------------------------------- 03 RoPE
def check_exercise_rope_complex(rope_complex: Callable[..., Any]) -> bool:
    """Notebook 03: ``rope_complex(x, positions, theta)`` (complex multiplication) equals minqwen's RoPE.

    x is (batch, heads, seq, head_dim) in the split-halves layout, positions (seq,).
    """
    from .rope import RotaryEmbedding, apply_rotary

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 8, generator=generator)  # (batch, heads, seq, head_dim)
    positions = torch.tensor([0, 1, 2, 7, 50, 1000])  # (seq,)
    theta = 10000.0

    def expected(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
        heads, head_dim = x.shape[1], x.shape[-1]
        config = tiny_config(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=heads, rope_theta=theta)
        cos, sin = RotaryEmbedding(config)(positions[None], torch.float32)  # (1, seq, head_dim) each
        return apply_rotary(x, cos, sin)

    return run_check("RoPE as complex multiplication", rope_complex, expected, x, positions, theta)


# --------------------------------------------------------------------------- 04 attention with GQA
def check_exercise_causal_mask(causal_mask: Callable[..., Any]) -> bool:
    """Notebook 04: ``causal_mask(q_len, kv_len)`` -> (q_len, kv_len) bool, True where a query may look.

    The queries are the *last* q_len of kv_len positions (the earlier keys come from a KV cache).
    """
    from .attention import causal_mask as reference_mask

    def expected(q_len: int, kv_len: int) -> torch.Tensor:
        mask = reference_mask(q_len, kv_len)  # (1, 1, q_len, kv_len), or None when every key is visible
        return torch.ones(q_len, kv_len, dtype=torch.bool) if mask is None else mask[0, 0]

    for q_len, kv_len in [(4, 4), (3, 7), (1, 6), (2, 9)]:
        if not run_check(f"causal mask, q_len={q_len}, kv_len={kv_len}", causal_mask, expected, q_len, kv_len, atol=0):
            return False
    return True


# --------------------------------------------------------------------------- 05 SwiGLU
def check_exercise_swiglu(swiglu: Callable[..., Any]) -> bool:
    """Notebook 05: ``swiglu(x, w_gate, w_up, w_down)`` equals :class:`minqwen.mlp.Qwen2MLP`.

    The weights are in ``nn.Linear`` layout (out_features, in_features).
    """
    from .mlp import Qwen2MLP

    config = tiny_config(hidden_size=16, intermediate_size=40)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=generator)  # (batch, seq, hidden)
    w_gate, w_up = (torch.randn(40, 16, generator=generator) / 4 for _ in range(2))  # (intermediate, hidden)
    w_down = torch.randn(16, 40, generator=generator) / 6  # (hidden, intermediate)

    def expected(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        mlp = Qwen2MLP(config)
        mlp.load_state_dict({"gate_proj.weight": w_gate, "up_proj.weight": w_up, "down_proj.weight": w_down})
        with torch.no_grad():
            return mlp(x)

    return run_check("SwiGLU MLP", swiglu, expected, x, w_gate, w_up, w_down)


# --------------------------------------------------------------------------- 06 the full model
def check_exercise_parameter_count(count_parameters: Callable[..., Any]) -> bool:
    """Notebook 06: ``count_parameters(config)`` -> the model's parameter count, from the config alone.

    Checked on the Qwen2-0.5B preset (tied head), the same untied, and a tiny config whose
    query and key/value heads differ. The models are built on the meta device: no memory used.
    """
    from .model import Qwen2ForCausalLM

    def expected(config: Qwen2Config) -> int:
        with torch.device("meta"):
            return Qwen2ForCausalLM(config).num_parameters()

    preset = Qwen2Config.qwen2_0_5b()
    configs = {
        "Qwen2-0.5B (tied)": preset,
        "Qwen2-0.5B untied": Qwen2Config.from_dict({**preset.to_dict(), "tie_word_embeddings": False}),
        "tiny (6 heads, 2 kv heads)": tiny_config(hidden_size=48, num_attention_heads=6, num_key_value_heads=2),
    }
    for name, config in configs.items():
        if not run_check(f"parameter count, {name}", count_parameters, expected, config):
            return False
    return True


# --------------------------------------------------------------------------- 07 loading weights
def check_exercise_q8_0(dequantize_q8_0: Callable[..., Any], tensor: Any) -> bool:
    """Notebook 07: decode the raw bytes of a Q8_0 GGUF tensor (a ``gguf`` ReaderTensor)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    assert tensor.tensor_type == GGMLQuantizationType.Q8_0, f"{tensor.name} is {tensor.tensor_type.name}, not Q8_0"
    raw = np.asarray(tensor.data).ravel()  # (n_blocks * 34,) uint8

    def flat(fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda data: torch.from_numpy(np.asarray(fn(data), dtype=np.float32).ravel())

    return run_check("Q8_0 dequantisation", flat(dequantize_q8_0), flat(lambda data: dequantize(data, tensor.tensor_type)), raw, atol=0)


# --------------------------------------------------------------------------- 08 generation
def check_exercise_top_p(top_p_distribution: Callable[..., Any]) -> bool:
    """Notebook 08: ``top_p_distribution(probs, p)`` -> the nucleus distribution.

    ``probs`` (..., vocab) sums to 1 over the last dim. Keep the most likely tokens until their
    total reaches ``p`` (the token that crosses ``p`` stays; the top token always stays), zero
    the rest and renormalise. Compared with :func:`minqwen.sampling.top_p_filter`.
    """
    from .sampling import top_p_filter

    def expected(probs: torch.Tensor, p: float) -> torch.Tensor:
        return top_p_filter(probs.log(), p).softmax(dim=-1)

    hand_made = torch.tensor([0.15, 0.5, 0.05, 0.3])  # not sorted, on purpose
    random = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).mul(2).softmax(dim=-1)
    cases = [(hand_made, 0.75), (hand_made, 0.9), (hand_made, 0.3), (random, 0.6), (random, 1.0)]
    for probs, p in cases:
        if not run_check(f"top-p, p={p}, probs {tuple(probs.shape)}", top_p_distribution, expected, probs, p, atol=1e-6):
            return False
    return True


# --------------------------------------------------------------------------- 09 long context: YaRN, sliding windows
def check_exercise_sliding_window_mask(sliding_window_mask: Callable[..., Any]) -> bool:
    """Notebook 09: ``sliding_window_mask(q_len, kv_len, window)`` -> (q_len, kv_len) bool.

    The queries are the last q_len of kv_len positions; each sees itself and the ``window - 1``
    keys before it. Compared with :func:`minqwen.attention.causal_mask`.
    """
    from .attention import causal_mask

    def expected(q_len: int, kv_len: int, window: int) -> torch.Tensor:
        mask = causal_mask(q_len, kv_len, sliding_window=window)
        return torch.ones(q_len, kv_len, dtype=torch.bool) if mask is None else mask[0, 0]

    for q_len, kv_len, window in [(8, 8, 3), (8, 8, 1), (3, 10, 4), (1, 12, 5), (5, 5, 9)]:
        name = f"sliding-window mask, q_len={q_len}, kv_len={kv_len}, window={window}"
        if not run_check(name, sliding_window_mask, expected, q_len, kv_len, window, atol=0):
            return False
    return True


# --------------------------------------------------------------------------- 10 Dual Chunk Attention
def check_exercise_dca_distances(dca_distances: Callable[..., Any]) -> bool:
    """Notebook 10: ``dca_distances(seq, chunk_size, local_size)`` -> (seq, seq) long.

    The query-minus-key position DCA gives each pair of tokens 0..seq-1, and -1 where the key is
    in the query's future. Compared with :func:`minqwen.dca.dca_position_matrices`.
    """
    from .dca import DualChunkSettings, dca_position_matrices

    def expected(seq: int, chunk_size: int, local_size: int) -> torch.Tensor:
        positions = torch.arange(seq)
        query_pos, key_pos, _, visible = dca_position_matrices(positions, positions, DualChunkSettings(chunk_size, local_size))
        return torch.where(visible, query_pos - key_pos, -1)

    for seq, chunk_size, local_size in [(12, 6, 2), (30, 10, 2), (7, 8, 1), (40, 9, 4)]:
        name = f"DCA distances, seq={seq}, chunk_size={chunk_size}, local_size={local_size}"
        if not run_check(name, dca_distances, expected, seq, chunk_size, local_size, atol=0):
            return False
    return True


def check_exercise_merge_softmax(merge: Callable[..., Any]) -> bool:
    """Notebook 10: ``merge(out_a, lse_a, out_b, lse_b)`` -> the attention over both key sets.

    ``out_x`` (T, D) is softmax attention over one set of keys and ``lse_x`` (T,) the log-sum-exp
    of its scores. Compared with the attention over the concatenated keys.
    """
    generator = torch.Generator().manual_seed(10)
    q = torch.randn(5, 8, generator=generator)  # (T, D)
    keys, values = torch.randn(11, 8, generator=generator), torch.randn(11, 8, generator=generator)  # (S, D)

    def half(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = q @ k.T  # (T, S_half)
        return scores.softmax(dim=-1) @ v, scores.logsumexp(dim=-1)

    (out_a, lse_a), (out_b, lse_b) = half(keys[:4], values[:4]), half(keys[4:], values[4:])

    def expected(*_: torch.Tensor) -> torch.Tensor:
        return (q @ keys.T).softmax(dim=-1) @ values

    return run_check("merging two partial softmaxes", merge, expected, out_a, lse_a, out_b, lse_b)


# --------------------------------------------------------------------------- 11 performance
def check_exercise_int8_rows(quantize_rows: Callable[..., Any]) -> bool:
    """Notebook 11: ``quantize_rows(weight)`` -> (int8 Q, fp32 scale per row) as in :func:`minqwen.quant.quantize_int8`.

    Compared through what the pair stands for, ``scale[:, None] * Q``, on rows of very different size.
    """
    from .quant import dequantize_int8, quantize_int8

    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(16, 64, generator=generator) * torch.logspace(-3, 0, 16)[:, None]  # (out, in)

    def stands_for(quantizer: Callable[..., Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        def dequantized(w: torch.Tensor) -> torch.Tensor:
            q, scale = quantizer(w)
            assert torch.as_tensor(q).dtype == torch.int8, f"Q must be int8, got {torch.as_tensor(q).dtype}"
            return dequantize_int8(torch.as_tensor(q), torch.as_tensor(scale))

        return dequantized

    return run_check("int8 per-row quantisation", stands_for(quantize_rows), stands_for(quantize_int8), weight, atol=1e-6)


# --------------------------------------------------------------------------- 12 looking inside
def check_exercise_previous_token_score(previous_token_score: Callable[..., Any]) -> bool:
    """Notebook 12: ``previous_token_score(probs)`` -> (..., heads), probs (..., heads, seq, seq).

    The mean over query positions 1..seq-1 of the attention on the key just before the query;
    compared with :func:`minqwen.inspection.previous_token_score`.
    """
    from .inspection import previous_token_score as expected

    scores = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))  # (batch, heads, seq, seq)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return run_check("previous-token score", previous_token_score, expected, probs, atol=1e-6)


# --------------------------------------------------------------------------- 13 training
def check_exercise_cosine_lr(cosine_lr: Callable[..., Any]) -> bool:
    """Notebook 13: ``cosine_lr(step, steps, warmup_steps, lr, min_lr)`` equals :func:`minqwen.training.cosine_lr`
    at every step of a short schedule: linear warm-up to ``lr``, then a cosine down to ``min_lr``."""
    from .training import cosine_lr as expected

    def schedule(fn: Callable[..., Any]) -> Callable[..., torch.Tensor]:
        return lambda steps, warmup: torch.tensor([float(fn(s, steps, warmup, 1e-3, 1e-4)) for s in range(steps)])

    return run_check("warm-up + cosine schedule", schedule(cosine_lr), schedule(expected), 50, 10, atol=1e-9)


def check_exercise_lora_merge(merge_lora: Callable[..., Any]) -> bool:
    """Notebook 13: ``merge_lora(weight, lora_A, lora_B, alpha, r)`` -> the merged weight (out, in),
    compared with :meth:`minqwen.lora.LoRALinear.merged`."""
    from .lora import LoRALinear

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 10, generator=generator)  # (out, in)
    lora_A = torch.randn(4, 10, generator=generator)  # (r, in)
    lora_B = torch.randn(6, 4, generator=generator)  # (out, r)

    def expected(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, r: int) -> torch.Tensor:
        base = torch.nn.Linear(10, 6, bias=False)
        layer = LoRALinear(base, r, alpha)
        with torch.no_grad():
            base.weight.copy_(weight)
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
        return layer.merged().weight.detach()

    return run_check("LoRA merge", merge_lora, expected, weight, lora_A, lora_B, 8.0, 4)
