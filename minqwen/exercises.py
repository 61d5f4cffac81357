"""Self-checks for the notebooks' exercises.

Each ``check_exercise_*`` takes the reader's function, runs it on fixed inputs and compares it
with the finished piece in ``minqwen``. An answer that still raises ``NotImplementedError`` gets a
friendly "not done yet" (so a fresh notebook runs top to bottom); a wrong answer raises an
``AssertionError`` that says what differs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


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
