"""Run under torchrun by test_train_ddp.py: one DDP backward on this rank's share of a batch;
rank 0 writes the (averaged) gradients to the safetensors file named on the command line.

It leaves with ``os._exit``, skipping Python's shutdown: right after a backward, gloo's worker
threads may still be freeing its all-reduce, which needs the interpreter (the backward's context
rides along); if the interpreter is shutting down by then, that thread aborts the process
("terminate called without an active exception"). A barrier does not help: it returns at once
on the rank that arrives last."""

import os
import sys

import torch
from safetensors.torch import save_file

from minqwen.recipes.train_tiny import TextData, TrainConfig, new_model
from minqwen.training import CausalLMLoss, Processes


def main(out_path: str, config: TrainConfig) -> None:
    torch.set_num_threads(1)
    procs = Processes.start()
    data = TextData.from_file(config.text, config.seq_len, config.val_fraction)
    model = new_model(config).to(procs.device)
    ddp = procs.wrap(CausalLMLoss(model))  # keep a reference: DDP's gradient hooks live as long as it does
    batch = data.batch("train", config.seed, 0, config.batch_size, config.seq_len)
    ddp(procs.shard(batch)).backward()
    if procs.is_main:
        save_file({name: p.grad.cpu() for name, p in model.named_parameters()}, out_path)
    procs.stop()
    os._exit(0)  # see the docstring


if __name__ == "__main__":
    main(sys.argv[1], TrainConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, seq_len=32, batch_size=8))
