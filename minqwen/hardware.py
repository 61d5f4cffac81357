"""The machine a model runs on: which device to use, what the CPU can do, how fast memory reads,
how much RAM we used.

Decoding one token reads every weight once, so its speed is set by memory bandwidth and by
which instructions the CPU has (AVX2/FMA for fp32, AVX-512 BF16 or AMX for bf16 matrix
products, VNNI for int8). Benchmarks, notebooks and the passkey test report these figures next
to their timings, so two runs on two machines can be compared.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    import resource  # POSIX only
except ImportError:  # Windows: no peak-RSS figure
    resource = None

# CPU features that decide which dtype is fast: AVX2/FMA (fp32), AVX-512 BF16 / AMX (bf16 GEMM), VNNI (int8).
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> dict[str, Any]:
    """CPU model, the flags that matter for dtype speed, and torch's view of the CPU.

    The flags come from ``/proc/cpuinfo`` (Linux); elsewhere the list is empty and torch's
    ``get_cpu_capability()`` (e.g. ``"AVX512"``, ``"DEFAULT"``) is the only hint.
    """
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {
        "model": model,
        "cores": os.cpu_count(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }


def measure_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """Memory read bandwidth in GB/s: the median time to sum a buffer far larger than any cache."""
    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    buffer.sum()  # touch every page once
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        seconds.append(time.perf_counter() - start)
    return buffer.nbytes / statistics.median(seconds) / 1e9


def peak_rss_mb() -> float:
    """The largest resident set this process's program has had so far, in MiB (NaN on Windows).

    On Linux this is ``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` would do, but it survives
    ``exec``, so a process started by a big parent (the benchmark's, say) reports the parent's size
    at the fork. Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    if resource is None:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """The device called ``name``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, or ``"auto"``
    (the first of cuda, mps and cpu that this torch can use).

    Naming a device this machine does not have is a ``ValueError`` saying so, not a crash later.
    """
    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {str(name)!r}: use cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r}: this torch ({torch.__version__}) sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(name)!r}: there are only {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(name)!r}: Apple's MPS is not available to this torch ({torch.__version__})")
    return device
