"""The Zorbish LoRA demo: data, encoding, the one-pass greedy check, tuning plumbing, and the real base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_model_with_qwen_vocab

import minqwen
from minqwen import lora
from minqwen.loss import IGNORE_INDEX
from minqwen.recipes.lora_demo import (
    DemoConfig,
    answer,
    collate,
    encode,
    finetune,
    greedy_correct,
    make_examples,
    run_demo,
    to_zorbish,
)
from minqwen.training import CausalLMLoss, train_step

@pytest.fixture(scope="module")
def tokenizer() -> minqwen.Tokenizer:
    return minqwen.Tokenizer.from_pretrained(minqwen.hub.DEFAULT_CHECKPOINT)


def test_zorbish_and_examples() -> None:
    assert to_zorbish(4071) == "4 bird 0 sun 7 fire 1 moon"
    train, test = make_examples(300, 50, seed=0)
    assert len(train) == 300 and len(test) == 50
    assert not {ex.question for ex in train} & {ex.question for ex in test}  # held out means never seen
    assert make_examples(300, 50, seed=0) == (train, test)
    assert test[0].question.startswith("Spell ") and test[0].answer == to_zorbish(int(test[0].question.split()[1]))


def test_encode_trains_on_the_answer_only(tokenizer: minqwen.Tokenizer) -> None:
    train, _ = make_examples(1, 0)
    ids, labels = encode(tokenizer, train[0])
    assert len(ids) == len(labels)
    prompt = [i for i, label in zip(ids, labels) if label == IGNORE_INDEX]
    assert tokenizer.decode(prompt).endswith(f"{train[0].question}<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode([label for label in labels if label != IGNORE_INDEX]) == train[0].answer + "<|im_end|>"


def test_collate_pads_on_the_right_with_ignored_labels() -> None:
    ids, labels = collate([([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4, 5], [IGNORE_INDEX, 5])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]


def test_one_pass_greedy_check_agrees_with_generation(tokenizer: minqwen.Tokenizer) -> None:
    """Teach a tiny model two answers by heart; the one-pass check must say exactly which answers
    greedy generation gets right (the two learned ones) and wrong (two others)."""
    train, test = make_examples(2, 2)
    model = tiny_model_with_qwen_vocab(num_hidden_layers=1).train()
    model.model.embed_tokens.weight.requires_grad_(False)  # the 151k-row table need not move: faster
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = collate([encode(tokenizer, ex) for ex in train], pad_id=0)
    for _ in range(25):
        train_step(CausalLMLoss(model), optimizer, ids, 1e-2, 1.0, labels=labels)

    examples = train + test
    checked = greedy_correct(model, tokenizer, examples, batch_size=3)
    generated = [answer(model, tokenizer, ex.question) == ex.answer for ex in examples]
    assert checked == generated == [True, True, False, False]


def test_finetune_trains_only_the_adapters_of_the_chosen_layers(tokenizer: minqwen.Tokenizer) -> None:
    model = tiny_model_with_qwen_vocab(num_hidden_layers=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train, _ = make_examples(4, 0)
    config = DemoConfig(steps=5, batch_size=2, lr=5e-2, first_layer=2, targets="v_proj")
    losses = finetune(model, tokenizer, train, config, log=lambda line: None)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert list(lora.adapted_modules(model)) == ["model.layers.2.self_attn.v_proj"]
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, before[name.replace(".base_layer", "")]), name


def test_run_demo_writes_adapter_and_results(tokenizer: minqwen.Tokenizer, tmp_path: Path) -> None:
    model = tiny_model_with_qwen_vocab(num_hidden_layers=1)
    config = DemoConfig(train_examples=4, test_examples=3, steps=2, batch_size=2, first_layer=0, out=str(tmp_path / "adapter"))
    results = run_demo(model, tokenizer, config, log=lambda line: None)
    saved = json.loads((tmp_path / "adapter" / "results.json").read_text())
    assert saved["accuracy_before"] == results["accuracy_before"] and len(saved["losses"]) == 2
    assert [ex["expected"] for ex in saved["examples"]] == [ex.answer for ex in make_examples(4, 3)[1]]
    reloaded = lora.load(tiny_model_with_qwen_vocab(num_hidden_layers=1), tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), model(ids))


def test_real_base_model_does_not_know_zorbish(real_model_fp32, tokenizer: minqwen.Tokenizer) -> None:
    """The premise of the demo: before tuning, the real model answers held-out questions wrong."""
    _, test = make_examples(300, 50)
    assert greedy_correct(real_model_fp32, tokenizer, test[:8]) == [False] * 8
