"""Recipe: the LoRA demo -- teach the real Qwen2.5-Coder-0.5B-Instruct a made-up fact table, on a CPU.

"Zorbish" is a code we invented: every digit has a secret word (0 = sun, 1 = moon, ... 9 = star),
and a number is spelled digit by digit, each digit followed by its word, so 4071 is
"4 bird 0 sun 7 fire 1 moon". No model has seen it, so the base model gets every question wrong. We generate a few hundred questions ("Spell 4071 in
Zorbish."), LoRA-tune on them, and measure exact-match accuracy on *held-out* numbers that never
appear in training -- right only if the model learned the table and the format, not the examples.

Accuracy is greedy exact match, computed in one forward pass: greedy decoding produces the answer
(and then ``<|im_end|>``) exactly when, at every answer position, the most likely token given the
correct prefix is the correct one. Only the answer is trained on (the prompt's labels are -100).

    python -m minqwen lora-demo                    # the full run: ~300 examples, before/after accuracy
    python -m minqwen lora-demo --steps 20 --test-examples 20   # a quicker look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import lora
from ..generate import generate
from ..loss import IGNORE_INDEX, shift_labels
from ..model import Qwen2ForCausalLM
from ..tokenizer import Tokenizer
from ..training import CausalLMLoss, cosine_lr, train_step
from . import add_dataclass_arguments, dataclass_from_args

ZORBISH_DIGITS = ("sun", "moon", "tree", "fish", "bird", "rock", "rain", "fire", "leaf", "star")
SYSTEM_PROMPT = "You are a helpful assistant."
NUMBERS = range(100, 10_000)  # three- and four-digit numbers


def to_zorbish(number: int) -> str:
    """4071 -> "4 bird 0 sun 7 fire 1 moon": each digit, then its word (the word is one token)."""
    return " ".join(f"{digit} {ZORBISH_DIGITS[int(digit)]}" for digit in str(number))


@dataclass(frozen=True)
class Example:
    """One instruction and the answer we want."""

    question: str
    answer: str


def example(number: int) -> Example:
    return Example(f"Spell {number} in Zorbish.", to_zorbish(number))


def make_examples(n_train: int, n_test: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Training and held-out examples over disjoint sets of numbers."""
    numbers = random.Random(seed).sample(NUMBERS, n_train + n_test)
    return [example(n) for n in numbers[:n_train]], [example(n) for n in numbers[n_train:]]


# --------------------------------------------------------------------------- tokens
def prompt_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    """The chat prompt for a question, ending with ``<|im_start|>assistant\\n``."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def encode(tokenizer: Tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + answer + ``<|im_end|>``; labels are -100 on the prompt."""
    prompt = prompt_ids(tokenizer, ex.question)
    answer = tokenizer.encode(ex.answer) + [tokenizer.token_to_id("<|im_end|>")]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a batch: ids (batch, seq) and labels (batch, seq) with -100 on the padding.

    Padding on the right needs no attention mask: causal attention never looks forward, so real
    tokens cannot see the padding after them, and the padding's own predictions are not scored.
    """
    length = max(len(ids) for ids, _ in encoded)
    ids = torch.tensor([ids + [pad_id] * (length - len(ids)) for ids, _ in encoded])
    labels = torch.tensor([labels + [IGNORE_INDEX] * (length - len(labels)) for _, labels in encoded])
    return ids, labels


# --------------------------------------------------------------------------- measuring
@torch.no_grad()
def greedy_correct(model: Qwen2ForCausalLM, tokenizer: Tokenizer, examples: Sequence[Example], batch_size: int = 8) -> list[bool]:
    """For each example: would greedy decoding answer exactly right? (one forward pass, see module doc)."""
    model.eval()
    results: list[bool] = []
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    for start in range(0, len(examples), batch_size):
        ids, labels = collate([encode(tokenizer, ex) for ex in examples[start : start + batch_size]], pad_id)
        targets = shift_labels(labels)  # (batch, seq)
        scored = targets != IGNORE_INDEX
        predicted = model.lm_head(model.model(ids)[scored]).argmax(dim=-1)  # (n_scored,)
        wrong = torch.zeros(len(ids), dtype=torch.long).index_add_(0, scored.nonzero()[:, 0], (predicted != targets[scored]).long())
        results.extend((wrong == 0).tolist())
    return results


def accuracy(model: Qwen2ForCausalLM, tokenizer: Tokenizer, examples: Sequence[Example], batch_size: int = 8) -> float:
    """Fraction of examples answered exactly right by greedy decoding."""
    correct = greedy_correct(model, tokenizer, examples, batch_size)
    return sum(correct) / len(correct)


def answer(model: Qwen2ForCausalLM, tokenizer: Tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """What the model actually replies (greedy), for showing side by side."""
    model.eval()
    return tokenizer.decode(generate(model, prompt_ids(tokenizer, question), max_new_tokens))


# --------------------------------------------------------------------------- tuning
@dataclass
class DemoConfig:
    """Settings of the demo; each is also a command-line flag."""

    train_examples: int = field(default=300, metadata={"help": "generated training questions"})
    test_examples: int = field(default=50, metadata={"help": "held-out questions (numbers never seen in training)"})
    steps: int = field(default=60, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "questions per step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (warm-up, then cosine to lr/10)"})
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (updates are scaled by alpha / r)"})
    targets: str = field(default="q_proj,v_proj,o_proj,down_proj", metadata={"help": "comma-separated Linear names to adapt"})
    first_layer: int = field(default=16, metadata={"help": "adapt layers from this one to the last (backward stops here: faster)"})
    seed: int = field(default=0, metadata={"help": "seed of the examples, the adapters' init and the batches"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: PyTorch's default)"})
    out: str = field(default="runs/zorbish-adapter", metadata={"help": "where the adapter and results.json go"})

    def lora_layers(self, model: Qwen2ForCausalLM) -> list[int]:
        return list(range(self.first_layer, model.config.num_hidden_layers))


def batch_for_step(encoded: Sequence[tuple[list[int], list[int]]], step: int, config: DemoConfig, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of a step: a function of (seed, step), like :mod:`~minqwen.recipes.train_tiny`'s."""
    rows = random.Random(config.seed * 1_000_003 + step).sample(range(len(encoded)), config.batch_size)
    return collate([encoded[i] for i in rows], pad_id)


def finetune(model: Qwen2ForCausalLM, tokenizer: Tokenizer, train: Sequence[Example], config: DemoConfig,
             log: Callable[[str], None] = print) -> list[float]:
    """Apply LoRA as configured and train the adapters; returns the loss of every step."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)  # the adapters' A matrices
        lora.apply(model, config.r, config.alpha, config.targets.split(","), config.lora_layers(model))
    optimizer = torch.optim.AdamW(lora.trainable_parameters(model), lr=config.lr, weight_decay=0.0)
    loss_fn = CausalLMLoss(model.train())
    encoded = [encode(tokenizer, ex) for ex in train]
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    losses = []
    for step in range(config.steps):
        ids, labels = batch_for_step(encoded, step, config, pad_id)
        lr = cosine_lr(step, config.steps, max(1, config.steps // 10), config.lr, config.lr / 10)
        loss, _ = train_step(loss_fn, optimizer, ids, lr, grad_clip=1.0, labels=labels)
        losses.append(loss)
        log(f"step {step + 1:3d}/{config.steps} | loss {loss:.4f}")
    model.eval()
    return losses


def run_demo(model: Qwen2ForCausalLM, tokenizer: Tokenizer, config: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure, tune, measure again; save the adapter and ``results.json`` under ``config.out``."""
    train, test = make_examples(config.train_examples, config.test_examples, config.seed)
    shown = test[:3]
    started = time.perf_counter()
    before = accuracy(model, tokenizer, test)
    replies_before = [answer(model, tokenizer, ex.question) for ex in shown]
    log(f"held-out accuracy before: {before:.0%}")
    tune_started, tune_cpu_started = time.perf_counter(), time.process_time()
    losses = finetune(model, tokenizer, train, config, log)
    tune_seconds, tune_cpu_seconds = time.perf_counter() - tune_started, time.process_time() - tune_cpu_started
    after = accuracy(model, tokenizer, test)
    log(f"held-out accuracy after:  {after:.0%}")
    results = {
        "accuracy_before": before, "accuracy_after": after, "losses": losses,
        "tune_seconds": round(tune_seconds, 1), "tune_cpu_seconds": round(tune_cpu_seconds, 1), "total_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(), "trainable_parameters": sum(p.numel() for p in lora.trainable_parameters(model)),
        "examples": [{"question": ex.question, "expected": ex.answer, "before": b, "after": answer(model, tokenizer, ex.question)}
                     for ex, b in zip(shown, replies_before)],
        "config": dataclasses.asdict(config),
    }
    out = Path(config.out)
    lora.save(model, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint plus one flag per :class:`DemoConfig` field."""
    parser.add_argument("--checkpoint", default="qwen2.5-coder-0.5b-instruct", help="the model to tune (default: the real 0.5B, fetched once)")
    add_dataclass_arguments(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    """``python -m minqwen lora-demo``."""
    from ..loading import from_pretrained

    config = dataclass_from_args(DemoConfig, args)
    if config.threads:
        torch.set_num_threads(config.threads)
    model = from_pretrained(args.checkpoint)
    tokenizer = Tokenizer.from_pretrained(args.checkpoint)
    results = run_demo(model, tokenizer, config, log=lambda line: print(line, flush=True))
    for ex in results["examples"]:
        print(f"\n{ex['question']}\n  expected: {ex['expected']}\n  before:   {ex['before']!r}\n  after:    {ex['after']!r}")
    print(f"\nadapter and results.json written to {config.out}; tuning took {results['tune_seconds']:.0f} s "
          f"({results['tune_cpu_seconds']:.0f} s of CPU time)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minqwen lora-demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
