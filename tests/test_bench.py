"""benchmarks/bench.py's bookkeeping (configs, bytes per token, medians, ratios, targets, table, JSON,
greedy agreement), minqwen.hardware's figures, one real end-to-end run on a tiny checkpoint (fresh
worker processes for minqwen and HF), and llama.cpp on the real GGUF where llama-cpp-python is installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_model, tiny_config

import minqwen
from benchmarks import bench
from benchmarks.bench import Report, RunConfig, Settings
from minqwen import hardware
from minqwen.quant import quantize


def test_run_config_names_round_trip():
    for name in bench.CONFIGS:
        assert RunConfig.parse(name).name == name
    assert RunConfig.parse("minqwen-int8") == RunConfig("minqwen", "bfloat16", "int8")
    assert RunConfig.parse("minqwen-int4") == RunConfig("minqwen", "bfloat16", "int4")
    assert RunConfig.parse(bench.LLAMACPP_CONFIG).engine == "llamacpp"
    for bad in ("hf-int8", "hf-int4", "minqwen-float16", "llama-float32", "llamacpp-float32", "minqwen"):
        with pytest.raises(ValueError, match="unknown configuration"):
            RunConfig.parse(bad)


def test_prompt_ids_are_fixed_and_inside_the_vocabulary():
    assert bench.prompt_ids(32) == bench.prompt_ids(32)
    assert len(bench.prompt_ids(100, vocab_size=257)) == 100
    assert max(bench.prompt_ids(500, vocab_size=257)) < 257
    assert max(bench.prompt_ids(500)) < bench.TEXT_TOKEN_LIMIT


def test_bytes_per_token_counts_every_weight_but_an_untied_embedding():
    def total(model):  # parameters and buffers (int8 weights and the RoPE frequencies are buffers)
        return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])

    model = random_model(tiny_config())
    assert bench.bytes_per_token(model) == total(model) - model.model.embed_tokens.weight.nbytes
    tied = random_model(tiny_config(tied=True))
    assert bench.bytes_per_token(tied) == total(tied)  # the table is the head
    int8 = quantize(random_model(tiny_config()).to(torch.bfloat16), "int8")
    expected = total(int8) - int8.model.embed_tokens.weight.nbytes
    assert bench.bytes_per_token(int8) == expected < bench.bytes_per_token(model) / 2


def test_machine_info_names_the_cpu_capability():
    info = bench.machine_info()
    assert info["cpu"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(info["cpu"]["flags"]) <= set(hardware.CPU_FLAGS)
    assert info["torch"] == torch.__version__


def test_measure_bandwidth_is_a_plausible_number():
    assert 0.1 < hardware.measure_bandwidth(megabytes=64, repeats=3) < 10_000


def test_peak_rss_is_the_kernels_high_water_mark_in_mib():
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs Linux's /proc/self/status to compare with")
    torch.ones(64 * 2**20 // 4)  # 64 MiB, touched: the peak may move
    high_water_kib = int(next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:")).split()[1])
    assert hardware.peak_rss_mb() == pytest.approx(high_water_kib / 1024, abs=1)


def test_peak_rss_of_a_child_is_its_own_not_its_big_parents():
    """ru_maxrss survives exec: a worker started by a 600 MiB parent would report 600 MiB."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux's /proc/self/status")
    parent_block = torch.ones(600 * 2**20 // 4)  # touched: the parent is now over 600 MiB
    code = "from minqwen.hardware import peak_rss_mb; print(peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(bench.REPOSITORY)})
    assert float(child.stdout) < 500, child.stdout  # python + torch + minqwen: about 225 MiB here
    del parent_block


def fake_report() -> Report:
    report = Report(Settings(prefill_lengths=(128, 1024)), machine={}, bandwidth_gb_s=20.0)
    rows = {
        "hf-float32": dict(decode_tok_s=10.0, prefill_128_tok_s=100.0, prefill_1024_tok_s=100.0, load_s=2.0, rss_decode_mb=3000, bytes_per_token=2e9),
        "hf-bfloat16": dict(decode_tok_s=15.0, prefill_128_tok_s=20.0, prefill_1024_tok_s=20.0, load_s=3.0, rss_decode_mb=2000, bytes_per_token=1e9),
        "minqwen-bfloat16": dict(decode_tok_s=18.0, prefill_128_tok_s=90.0, prefill_1024_tok_s=130.0, load_s=0.5, rss_decode_mb=1000, bytes_per_token=1e9),
        "minqwen-int8": dict(decode_tok_s=33.0, prefill_128_tok_s=80.0, prefill_1024_tok_s=90.0, load_s=0.6, rss_decode_mb=800, bytes_per_token=0.5e9),
    }
    for repeat in range(3):
        for config, metrics in rows.items():
            report.add({"config": config, "repeat": repeat, **{k: v * (1 + 0.1 * (repeat - 1)) for k, v in metrics.items()}})
    report.add({"config": "minqwen-float32", "repeat": 0, "error": "Traceback ...\nMemoryError"})
    return report


def test_report_medians_ratios_and_bound():
    report = fake_report()
    assert report.median("minqwen-bfloat16", "decode_tok_s") == pytest.approx(18.0)
    assert bench.ratio(report, "minqwen-bfloat16", "decode_tok_s") == pytest.approx(18 / 15)
    assert bench.ratio(report, "minqwen-int8", "decode_tok_s") == pytest.approx(33 / 15)  # int8 against HF bf16
    assert bench.ratio(report, "hf-float32", "decode_tok_s") is None
    assert report.bound_tok_s("minqwen-int8") == pytest.approx(20e9 / 0.5e9)
    assert report.errors == {"minqwen-float32": "Traceback ...\nMemoryError"}


def test_targets_are_checked_against_the_issue():
    report = fake_report()
    for repeat in range(3):
        report.add({"config": bench.LLAMACPP_CONFIG, "repeat": repeat, "decode_tok_s": 30.0, "prefill_1024_tok_s": 100.0, "load_s": 0.5, "rss_decode_mb": 1000})
    targets = {t.goal: t for t in bench.check_targets(report)}
    assert targets["int8 decode >= 1.0x llama.cpp"].value == pytest.approx(1.1) and targets["int8 decode >= 1.0x llama.cpp"].met
    assert targets["bf16 decode >= 0.8x its bandwidth bound"].value == pytest.approx(18 / 20) and targets["bf16 decode >= 0.8x its bandwidth bound"].met
    prefill = targets[f"{bench.DEFAULT_FAST_CONFIG} (the default) prefill-1024 >= 1.0x llama.cpp"]
    assert prefill.value == pytest.approx(0.9) and prefill.met is False
    assert targets[f"{bench.DEFAULT_FAST_CONFIG} (the default) load <= 1.0x llama.cpp"].met is False  # 0.6 s vs 0.5 s
    assert targets["int8 peak RSS <= 1.0x llama.cpp"].met and targets["int4 decode >= 1.3x llama.cpp"].met is None  # no int4 row
    assert targets["bfloat16 load <= 0.5x HF"].met and targets["bfloat16 peak RSS <= HF"].met
    assert targets["float32 load <= 0.5x HF"].met is None  # minqwen fp32 failed: not measured
    text = bench.format_targets(list(targets.values()))
    assert "0.90x, NOT met" in text and "not measured" in text


def test_table_is_markdown_with_ratios():
    table = bench.format_table(fake_report())
    lines = table.splitlines()
    assert lines[0].startswith("| config | decode tok/s | bound tok/s")
    row = next(line for line in lines if line.startswith("| minqwen-int8 "))
    assert "33.0 (2.20x)" in row and "40.0" in row and "82 %" in row
    json.dumps(fake_report().to_json())  # everything serialises


TINY = dict(prompt_tokens=8, new_tokens=4, prefill_lengths=(16, 32), repeats=1, long_prefill=32)


@pytest.mark.parametrize("config", ["minqwen-float32", "minqwen-int8", "hf-bfloat16"])
def test_run_worker_measures_everything(config, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(minqwen.hub.CACHE_ENV, str(tmp_path / "cache"))
    result = bench.run_worker(RunConfig.parse(config), Settings(tiny_checkpoint, **TINY), repeat=1)
    assert result["decode_tokens"] == 4
    for key in ("load_s", "first_token_s", "decode_tok_s", "rss_decode_mb", "rss_peak_mb", "prefill_16_tok_s"):
        assert result[key] > 0, key
    assert "prefill_32_tok_s" not in result  # long prefills run in the first repeat only
    assert result["bytes_per_token"] > 0
    assert len(result["greedy_tokens"]) == 4 and all(isinstance(t, int) for t in result["greedy_tokens"])


def test_agreement_counts_equal_tokens_from_the_first():
    assert bench.agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 4
    assert bench.agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 2  # a later match after a difference does not count
    assert bench.agreement([7, 2], [1, 2]) == 0
    assert bench.agreement([1, 2], [1, 2, 3]) == 2
    assert bench.agreement([], [1]) == 0


def test_report_compares_greedy_tokens_with_fp32():
    report = fake_report()
    report.add({"config": "minqwen-float32", "repeat": 0, "decode_tok_s": 9.0, "greedy_tokens": [5, 6, 7, 8]})
    report.add({"config": "minqwen-int8", "repeat": 0, "greedy_tokens": [5, 6, 0, 8]})
    report.add({"config": bench.LLAMACPP_CONFIG, "repeat": 0, "decode_tok_s": 40.0, "rss_decode_mb": 700, "greedy_tokens": [5, 1, 7, 8]})
    assert report.agreement("minqwen-int8") == 2 and report.agreement(bench.LLAMACPP_CONFIG) == 1
    assert report.agreement("hf-float32") is None  # no tokens recorded
    row = next(line for line in bench.format_table(report).splitlines() if line.startswith(f"| {bench.LLAMACPP_CONFIG} "))
    assert row.endswith("| 1/4 |") and "40.0" in row
    targets = {t.goal: t for t in bench.check_targets(report)}
    assert targets["int8 decode >= 1.0x llama.cpp"].value == pytest.approx(33 / 40)
    assert targets["int4 decode >= 1.3x llama.cpp"].met is None  # no int4 row
    assert report.to_json()["agreement_with_fp32"]["minqwen-int8"] == 2


def test_reference_tokens_only_are_not_a_row():
    report = fake_report()
    report.add({"config": "minqwen-float32", "repeat": -1, "load_s": 1.0, "greedy_tokens": [1, 2], "tokens_only": True})
    assert report.tokens["minqwen-float32"] == [1, 2] and "minqwen-float32" not in report.samples


def test_llamacpp_is_skipped_with_the_reason_when_not_installed(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(bench, "llamacpp_missing", lambda: "llama-cpp-python is not installed (test)")
    monkeypatch.setattr(bench, "measure_bandwidth", lambda: 20.0)
    logged = []
    report = bench.run_benchmark([RunConfig.parse(bench.LLAMACPP_CONFIG)], Settings(tiny_checkpoint, **TINY), log=logged.append)
    assert report.skipped == {bench.LLAMACPP_CONFIG: "llama-cpp-python is not installed (test)"}
    assert not report.samples and not report.errors
    assert any("skipped, llama-cpp-python is not installed" in line for line in logged)


def test_llamacpp_needs_a_gguf_file(tiny_checkpoint):
    with pytest.raises(ValueError, match="llama.cpp runs GGUF files"):
        bench.gguf_file(tiny_checkpoint)  # an HF-format directory


@pytest.mark.skipif(bench.llamacpp_missing() is not None, reason=str(bench.llamacpp_missing()))
def test_llamacpp_runs_the_real_gguf_greedily():
    settings = Settings(minqwen.hub.DEFAULT_CHECKPOINT, **{**TINY, "threads": 2})
    result = bench.run_worker(RunConfig.parse(bench.LLAMACPP_CONFIG), settings, repeat=1)
    assert result["decode_tokens"] == 4 and result["decode_tok_s"] > 0 and result["load_s"] > 0
    assert "bytes_per_token" not in result  # not a torch model: no bound
    first = bench.run_worker(RunConfig.parse(bench.LLAMACPP_CONFIG), settings, repeat=1, tokens_only=True)["greedy_tokens"]
    assert first == result["greedy_tokens"], "greedy from an empty context is deterministic"


def test_main_runs_workers_and_writes_json(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(minqwen.hub.CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "results" / "run.json"
    bench.main(
        ["--configs", "hf-float32,minqwen-float32", "--checkpoint", tiny_checkpoint, "--repeats", "1",
         "--prefill", "16", "--new-tokens", "4", "--prompt-tokens", "8", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert "| minqwen-float32 |" in printed and "Targets" in printed and str(out) in printed
    data = json.loads(out.read_text())
    assert not data["errors"], data["errors"]
    assert set(data["medians"]) == {"hf-float32", "minqwen-float32"}
    assert data["machine"]["cpu"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert data["medians"]["minqwen-float32"]["decode_tok_s"] > 0


def test_a_failing_worker_is_reported_not_fatal(tmp_path):
    result = bench.spawn_worker(RunConfig.parse("minqwen-float32"), Settings(str(tmp_path / "missing"), **TINY), 0)
    assert "error" in result and "missing" in result["error"]


def test_tokenizer_subcommand_delegates(monkeypatch):
    from benchmarks import tokenizer_bench

    seen = []
    monkeypatch.setattr(tokenizer_bench, "main", lambda argv: seen.append(argv))
    bench.main(["tokenizer", "--megabytes", "0.1"])
    assert seen == [["--megabytes", "0.1"]]


def test_bad_settings_are_refused():
    with pytest.raises(SystemExit, match="unknown configuration"):
        bench.main(["--configs", "minqwen-int3"])
    with pytest.raises(SystemExit, match="must be"):
        bench.settings_from_args(bench.parse_args(["--repeats", "0"]))


def test_worker_entry_point_prints_one_marked_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(minqwen.hub.CACHE_ENV, str(tmp_path / "cache"))
    job = {"config": "minqwen-float32", "settings": {**TINY, "checkpoint": tiny_checkpoint, "threads": None}, "repeat": 0, "load_only": True}
    bench.worker_main(json.dumps(job))
    line = capsys.readouterr().out.strip()
    assert line.startswith(bench.RESULT_MARKER)
    assert json.loads(line[len(bench.RESULT_MARKER):])["load_s"] > 0
