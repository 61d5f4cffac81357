"""benchmarks/kernels.py measures the kernels decoding uses; check it times the right products."""

import importlib.util
from pathlib import Path

import torch

from minqwen import qdot

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def load_script():
    spec = importlib.util.spec_from_file_location("kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_kernel_computes_the_same_product(monkeypatch):
    kernels = load_script()
    monkeypatch.setattr(kernels, "BYTES_PER_SHAPE", 3 * 4 * 48 * 128)  # three matrices of (48, 128)
    products = kernels.kernels_for(48, 128)
    dot_rows = {kernels.DOT_INT8_NAME, kernels.DOT_INT4_NAME} if qdot.kernel() is not None else set()
    assert set(products) == {"fp32", "bf16", "int8 (bf16 act.)", kernels.INT4_NAME} | dot_rows
    outputs = {name: [p().float() for p in fns] for name, (fns, _) in products.items()}
    assert all(len(outs) == 3 and outs[0].shape == (1, 48) for outs in outputs.values())
    tolerances = {"bf16": 0.05, "int8 (bf16 act.)": 0.05, kernels.INT4_NAME: 0.25, kernels.DOT_INT8_NAME: 0.05, kernels.DOT_INT4_NAME: 0.25}  # int4: 16 levels
    for name in set(products) - {"fp32"}:
        for ours, reference in zip(outputs[name], outputs["fp32"]):
            assert (ours - reference).abs().max() <= tolerances[name] * reference.abs().max() + 1e-3, name
    assert products["fp32"][1] == 4 * 3 * 48 * 128 and products["int8 (bf16 act.)"][1] == 3 * 48 * 128
    groups = 128 // kernels.INT4_GROUP_SIZE
    assert products[kernels.INT4_NAME][1] == 3 * 48 * 128 // 2 + 3 * groups * 48 * 2 * 2  # half a byte a weight, plus 2 bf16 per row and group


def test_rate_is_bytes_over_seconds():
    kernels = load_script()
    rate = kernels.gigabytes_per_second([lambda: torch.ones(1000).sum()], weight_bytes=10**9)
    assert rate > 0
