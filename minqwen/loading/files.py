"""The cache directory, one lock, and the two ways minqwen writes anything: atomically.

Every file or directory minqwen writes (the cache, checkpoints, benchmark results) is first built
under a temporary name in the same directory, then renamed into place: a reader sees the old
version or the new one, never half of one. The temporary name records its owner's process id and
host, so a temporary that a killed process (``kill -9``, a power cut) left behind is recognised
and removed by the next writer of the same target, while one a live process is still writing is
left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock

CACHE_ENV = "MINQWEN_CACHE"
TEMPORARY_SUFFIX = ".tmp"


def cache_dir() -> Path:
    """``$MINQWEN_CACHE`` if set, else ``~/.cache/minqwen``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "minqwen").expanduser()


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Hold the exclusive lock ``<cache>/locks/<name>.lock``; other processes wait here.

    ``filelock`` uses ``fcntl`` on POSIX and ``msvcrt`` on Windows; the OS releases the lock when
    its holder dies, so a killed process never blocks the next one.
    """
    path = cache_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


# --------------------------------------------------------------------------- temporaries
def _host() -> str:
    """This machine's name, with only characters that are safe in a file name."""
    return "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"


def temporary_path(target: Path) -> Path:
    """``.<target name>.<pid>@<host>.<random>.tmp`` beside ``target``: unique, and names its owner."""
    return target.parent / f".{target.name}.{os.getpid()}@{_host()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"


def _owner(temporary: Path, target: Path) -> tuple[int, str] | None:
    """(pid, host) recorded in the name of a temporary of ``target``, or None if it is not one."""
    middle = temporary.name[len(target.name) + 2 : -len(TEMPORARY_SUFFIX)]  # "<pid>@<host>.<random>"
    owner, _, _ = middle.rpartition(".")
    pid, _, host = owner.partition("@")
    return (int(pid), host) if pid.isdigit() and host else None


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a process we may not signal counts)."""
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        handle = ctypes.windll.kernel32.OpenProcess(0x100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return False
        still_running = ctypes.windll.kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT
        ctypes.windll.kernel32.CloseHandle(handle)
        return still_running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the temporaries of ``target`` whose owner process on this host is gone; return them.

    A temporary of another host, or of a live process, is kept: it may still be in progress.
    """
    removed = []
    for temporary in target.parent.glob(f".{glob.escape(target.name)}.*{TEMPORARY_SUFFIX}"):
        owner = _owner(temporary, target)
        if owner is None or owner[1] != _host() or process_alive(owner[0]):
            continue
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        removed.append(temporary)
    return removed


# --------------------------------------------------------------------------- atomic writers
@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write; on success it is renamed to ``target``.

    >>> with atomic_file(path) as tmp:  # doctest: +SKIP
    ...     tmp.write_text(json.dumps(results))

    On any error the temporary is removed and ``target`` keeps its old content (or stays absent).
    The file is made readable like any output (mode 0o644, umask permitting).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = temporary_path(target)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def temporary_directory(beside: Path) -> Iterator[Path]:
    """A scratch directory named as a temporary of ``beside``, deleted on exit.

    Named that way, one left behind by a killed process is removed by the next writer of ``beside``.
    """
    beside.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(beside)
    tmp = temporary_path(beside)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` to fill; on success it replaces ``target``.

    An older ``target`` is removed first. On any error the temporary directory is deleted, so
    ``target`` is never half-written. Files and folders get ordinary modes (0o644 / 0o755).
    """
    target = Path(target)
    with temporary_directory(target) as tmp:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)


def build_directory(build: Callable[[Path], None], target: Path) -> Path:
    """``target``, built once by ``build(tmp)`` across processes: the cache's way to make an entry.

    Under a lock: if another process finished first, its result is used as it is. Otherwise stale
    temporaries of dead builders are removed and :func:`atomic_directory` builds and renames.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(f"{target.parent.name}-{target.name}"):
        if not target.is_dir():
            with atomic_directory(target) as tmp:
                build(tmp)
    return target
