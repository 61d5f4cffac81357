"""Looking inside a forward pass: the residual stream, attention probabilities, and patching.

Every point we can read or change is a module, named by its path in the model -- the same names
as the state-dict keys, so nothing new to learn:

- ``"model.embed_tokens"``: token embeddings, the start of the residual stream (batch, seq, hidden)
- ``"model.layers.3"``: the residual stream after block 3 (batch, seq, hidden)
- ``"model.layers.3.self_attn"`` / ``"model.layers.3.mlp"``: what attention / the MLP of block 3
  add to the stream (batch, seq, hidden)
- ``"model.layers.3.self_attn.attention_probs"``: block 3's attention probabilities
  (batch, heads, seq, seq); read-only, and only computed by the eager attention path
- any other submodule (``"model.layers.3.mlp.gate_proj"``, ``"model.norm"``, ``"lm_head"``)

Reading and patching use PyTorch forward hooks that exist only inside :func:`trace` (or the
:func:`recording` / :func:`patching` context managers), so the ordinary forward pass pays nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from .model import Qwen2ForCausalLM

Patch = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
PROBS_SUFFIX = "attention_probs"


@dataclass
class Trace:
    """What one forward pass computed, as returned by :func:`trace`.

    ``hidden_states`` holds ``num_hidden_layers + 1`` tensors (batch, seq, hidden): the embeddings,
    then the residual stream after each block -- all *before* the final norm. (HF's
    ``output_hidden_states`` has the final norm already applied to its last entry;
    ``model.model.norm(trace.hidden_states[-1])`` is that tensor.)
    """

    logits: torch.Tensor  # (batch, seq, vocab)
    hidden_states: tuple[torch.Tensor, ...]  # layers + 1 of (batch, seq, hidden)
    attentions: tuple[torch.Tensor, ...] | None = None  # layers of (batch, heads, seq, seq), if asked for
    activations: dict[str, torch.Tensor] = field(default_factory=dict)  # the extra points asked for


def residual_stream_names(model: Qwen2ForCausalLM) -> list[str]:
    """The points whose outputs form the residual stream: embeddings, then every block."""
    return ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(len(model.model.layers))]


def attention_probs_names(model: Qwen2ForCausalLM) -> list[str]:
    """The attention-probability hook point of every block."""
    return [f"model.layers.{i}.self_attn.{PROBS_SUFFIX}" for i in range(len(model.model.layers))]


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; an unknown name is a ``ValueError`` with examples of good ones."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"no module named {name!r} in the model; points are module paths such as 'model.embed_tokens', "
            "'model.layers.0', 'model.layers.0.self_attn', 'model.layers.0.mlp', "
            f"'model.layers.0.self_attn.{PROBS_SUFFIX}' (see [n for n, _ in model.named_modules()])"
        ) from None


@contextlib.contextmanager
def recording(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, every forward stores the output of each named module into the dict yielded.

    The tensors are the live outputs (not copies), detached from the autograd graph.
    """
    records: dict[str, torch.Tensor] = {}
    modules = {name: find_module(model, name) for name in names}  # check every name before hooking any
    handles = [module.register_forward_hook(_recorder(records, name)) for name, module in modules.items()]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _recorder(records: dict[str, torch.Tensor], name: str) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        records[name] = output.detach()

    return hook


@contextlib.contextmanager
def patching(model: nn.Module, patches: Mapping[str, Patch]) -> Iterator[None]:
    """Inside the block, each named module's output is replaced.

    A patch is either a tensor of the output's shape (used instead of the output) or a function
    ``output -> new output`` (e.g. :func:`at_positions`). Patching a module with the output it
    computes anyway changes nothing -- the basis of activation patching.
    """
    for name in patches:
        if name.endswith(PROBS_SUFFIX):
            raise ValueError(f"{name!r}: attention probabilities can be read, not patched (patch 'self_attn' instead)")
    modules = {name: find_module(model, name) for name in patches}
    handles = [module.register_forward_hook(_patcher(name, patches[name])) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _patcher(name: str, patch: Patch) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        new = patch(output) if callable(patch) else patch
        if new.shape != output.shape:
            raise ValueError(f"patch for {name!r} has shape {tuple(new.shape)}, the output there is {tuple(output.shape)}")
        return new.to(output.dtype)

    return hook


def at_positions(value: torch.Tensor, positions: int | Sequence[int] | slice) -> Callable[[torch.Tensor], torch.Tensor]:
    """A patch that replaces only some sequence positions of an output by those of ``value``.

    ``value`` has the output's shape (batch, seq, ...), typically recorded from another run (the
    "clean" prompt in activation patching); ``positions`` index the seq dimension (dim 1).
    """

    def patch(output: torch.Tensor) -> torch.Tensor:
        patched = output.clone()
        patched[:, positions] = value[:, positions].to(output.dtype)
        return patched

    return patch


@contextlib.contextmanager
def using_eager_attention(model: Qwen2ForCausalLM) -> Iterator[None]:
    """Run every attention layer through the eager path (which computes the probabilities) inside the block."""
    attentions = [layer.self_attn for layer in model.model.layers]
    before = [attention.attn_implementation for attention in attentions]
    for attention in attentions:
        attention.attn_implementation = "eager"
    try:
        yield
    finally:
        for attention, implementation in zip(attentions, before):
            attention.attn_implementation = implementation


@torch.no_grad()
def trace(
    model: Qwen2ForCausalLM,
    input_ids: torch.Tensor,
    *,
    attentions: bool = False,
    capture: Sequence[str] = (),
    patches: Mapping[str, Patch] | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> Trace:
    """One forward pass that also returns the residual stream, and optionally more.

    attentions: also return every block's attention probabilities (runs the eager path for
    this call); capture: extra points to record (module names, see the module docstring);
    patches: {point: tensor or function} replacing those outputs during this pass -- recorded
    values are the patched ones.
    """
    stream = residual_stream_names(model)
    probs = attention_probs_names(model) if attentions else []
    with contextlib.ExitStack() as stack:
        if attentions:
            stack.enter_context(using_eager_attention(model))
        stack.enter_context(patching(model, patches or {}))  # hooked first, so recordings see patches
        records = stack.enter_context(recording(model, [*stream, *probs, *capture]))
        logits = model(input_ids, position_ids, attention_mask)
    return Trace(
        logits=logits,
        hidden_states=tuple(records[name] for name in stream),
        attentions=tuple(records[name] for name in probs) if attentions else None,
        activations={name: records[name] for name in capture},
    )


@torch.no_grad()
def logit_lens(model: Qwen2ForCausalLM, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """What each layer would predict if the model stopped there: ``lm_head(norm(h))`` for each h.

    hidden_states: a sequence of n tensors (batch, seq, hidden), e.g. ``trace(...).hidden_states``
    (slice the positions you need first: the result is large). Returns logits (n, batch, seq, vocab);
    the last entry equals the model's own logits.
    """
    return torch.stack([model.lm_head(model.model.norm(h)) for h in hidden_states])


def previous_token_score(probs: torch.Tensor) -> torch.Tensor:
    """How much each head attends to the token just before the query: probs (..., heads, seq, seq) -> (..., heads).

    The mean, over query positions 1..seq-1, of the probability on key position ``query - 1``.
    "Previous-token heads" score near 1; they are a building block of induction heads
    (Olsson et al. 2022, "In-context Learning and Induction Heads").
    """
    return probs.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=-1)
