"""Loading and saving HF-format directories: round trips both ways and clear errors."""

import json

import pytest
import torch
from helpers import assert_close, hf_twin, random_model, tiny_config
from safetensors.torch import save_file

import minqwen
from minqwen.loading.weights import read_safetensors

transformers = pytest.importorskip("transformers", reason="transformers is in requirements-dev.txt")

INPUT_IDS = torch.randint(0, 257, (2, 17), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("tied", [False, True])
def test_hf_save_loads_in_minqwen(tmp_path, tied):
    model = random_model(tiny_config(4, 2, tied=tied))
    hf_twin(model).save_pretrained(tmp_path)
    loaded = minqwen.from_pretrained(tmp_path)
    with torch.no_grad():
        assert_close(loaded(INPUT_IDS), model(INPUT_IDS))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


def test_hf_sharded_save_loads_in_minqwen(tmp_path):
    model = random_model(tiny_config(4, 2))
    hf_twin(model).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert_close(minqwen.from_pretrained(tmp_path)(INPUT_IDS), model(INPUT_IDS))


@pytest.mark.parametrize("tied", [False, True])
def test_minqwen_save_loads_in_hf(tmp_path, tied):
    model = random_model(tiny_config(6, 2, tied=tied))
    minqwen.save_pretrained(model, tmp_path)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert_close(hf(INPUT_IDS).logits, model(INPUT_IDS))
    assert not list(tmp_path.glob("*.tmp")), "temporary files must be renamed or removed"


def test_bf16_load(tmp_path, monkeypatch):
    monkeypatch.setenv(minqwen.hub.CACHE_ENV, str(tmp_path / "cache"))  # the prepared bf16 copy goes here
    model = random_model(tiny_config())
    minqwen.save_pretrained(model, tmp_path / "tiny")
    loaded = minqwen.from_pretrained(tmp_path / "tiny", dtype="bfloat16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16


def _saved_tiny(tmp_path):
    model = random_model(tiny_config())
    minqwen.save_pretrained(model, tmp_path)
    return dict(read_safetensors(tmp_path / "model.safetensors"))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), r"missing: model\.layers\.1\.mlp\.up_proj\.weight"),
        (lambda sd: sd.update({"model.layers.9.extra.weight": torch.zeros(2)}), r"unexpected: model\.layers\.9\.extra\.weight"),
        (lambda sd: sd.update({"model.norm.weight": torch.zeros(5)}), r"model\.norm\.weight expected \(32,\) got \(5,\)"),
    ],
)
def test_state_dict_mismatch_is_listed(tmp_path, edit, message):
    state_dict = {k: v.clone() for k, v in _saved_tiny(tmp_path).items()}
    edit(state_dict)
    save_file(state_dict, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        minqwen.from_pretrained(tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    _saved_tiny(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
        minqwen.from_pretrained(tmp_path)


def test_corrupt_header_names_the_file(tmp_path):
    _saved_tiny(tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        minqwen.from_pretrained(tmp_path)


def test_directory_without_weights(tmp_path):
    tiny_config().to_json(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="no weights found"):
        minqwen.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    model = random_model(tiny_config(4, 2))
    hf_twin(model).save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        minqwen.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int8, "int32", "complex64", "bogus", 3])
def test_bad_dtype(tmp_path, dtype):
    with pytest.raises(ValueError, match="dtype"):
        minqwen.from_pretrained(tmp_path, dtype=dtype)


def test_loaded_weights_are_memory_mapped_views(tmp_path):
    model = random_model(tiny_config())
    minqwen.save_pretrained(model, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = read_safetensors(path)
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    a, b = "model.embed_tokens.weight", "model.norm.weight"
    file_distance = header[b]["data_offsets"][0] - header[a]["data_offsets"][0]
    # Both tensors point into one mapping of the file: no copy was made.
    assert tensors[b].data_ptr() - tensors[a].data_ptr() == file_distance


def test_atomic_directory_replaces_the_target_or_leaves_nothing(tmp_path):
    from minqwen.loading.files import atomic_directory

    target = tmp_path / "out" / "step-1"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first" and (target / "a.txt").stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("half-written")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "first"  # the old directory is untouched
    assert [p.name for p in target.parent.iterdir()] == ["step-1"]  # and no temporary left behind
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_atomic_file_writes_all_or_nothing(tmp_path):
    from minqwen.loading.files import atomic_file

    target = tmp_path / "dir with space ü" / "results.json"
    with atomic_file(target) as tmp:
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "first" and [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_checkpoint_paths_with_spaces_and_non_ascii(tmp_path):
    model = random_model(tiny_config())
    path = tmp_path / "my checkpoints" / "qwen 小型 é"
    minqwen.save_pretrained(model, path)
    with torch.no_grad():
        assert_close(minqwen.from_pretrained(path)(INPUT_IDS), model(INPUT_IDS))


def test_from_pretrained_puts_the_model_on_the_device(tmp_path):
    model = random_model(tiny_config())
    minqwen.save_pretrained(model, tmp_path)
    loaded = minqwen.from_pretrained(tmp_path, device=torch.device("cpu"))
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="device must be"):
        minqwen.from_pretrained(tmp_path, device="gpu")
    # "meta" exists everywhere and has no int8 kernel: the int8 refusal, before anything is read
    with pytest.raises(ValueError, match="quantize='int8' needs the int8 kernel, which device 'meta' does not have"):
        minqwen.from_pretrained(tmp_path / "absent", quantize="int8", device="meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the error is for machines without it")
def test_an_absent_accelerator_is_named(tmp_path):
    with pytest.raises(ValueError, match="device 'cuda' is not available on this machine"):
        minqwen.from_pretrained(tmp_path, device="cuda")


def test_old_loading_paths_warn_and_forward_and_import_minqwen_is_silent():
    import subprocess
    import sys

    quiet = "import minqwen, minqwen.hub; assert minqwen.hub is minqwen.loading.hub"
    subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", quiet], check=True)
    from minqwen import gguf_file, loading, prepared, tokenizer, weights

    moved = [
        (weights, "from_pretrained", loading.from_pretrained),
        (weights, "atomic_directory", loading.files.atomic_directory),
        (weights, "read_safetensors", loading.weights.read_safetensors),
        (prepared, "save_aligned", loading.prepared.save_aligned),
        (gguf_file, "open_gguf", loading.gguf.open_gguf),
        (tokenizer, "tokenizer_files_from_gguf", loading.gguf.tokenizer_files_from_gguf),
    ]
    for old, name, new in moved:
        with pytest.warns(DeprecationWarning, match=f"{old.__name__}.{name} has moved to"):
            assert getattr(old, name) is new
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        weights.nothing
