"""Benchmarks and measuring scripts, kept outside the ``minqwen`` package.

Run them from the repository root: ``python -m benchmarks.bench``, ``python -m benchmarks.tokenizer_bench``,
``python benchmarks/kernels.py``, ``python benchmarks/dca_memory.py``.
"""
