"""`python -m minqwen`: generate and chat as subprocesses, one-line errors, the command table."""

import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from minqwen.__main__ import COMMANDS, main


def run_cli(*args, stdin="", timeout=300):
    """Run ``python -m minqwen *args``; return (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "minqwen", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(code, stderr, expected_code, fragment):
    """Exit status as expected; the error is one line (the last), with no traceback."""
    assert code == expected_code, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert [line for line in lines if "error:" in line] == lines[-1:], stderr
    assert fragment in lines[-1], stderr


def run_main(args, capsys, monkeypatch, stdin=""):
    """``main(args)`` in this process (much faster than a subprocess); (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = main(args)
    except SystemExit as e:  # argparse's usage errors and --help
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- as subprocesses
def test_generate_prints_the_continuation_and_speed(tiny_checkpoint):
    code, out, err = run_cli("generate", "Hello world", "--max-new-tokens", "5", "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    assert out.startswith("Hello world") and len(out.strip()) > len("Hello world")
    assert "tokens/s" in err


def test_real_model_continues_the_prompt():
    """What `make run` does (a short version): the real weights, greedy."""
    code, out, err = run_cli("The capital of France is", "--max-new-tokens", "4")
    assert code == 0, err
    assert out.startswith("The capital of France is Paris"), out


def test_bad_value_and_bad_flag_as_subprocesses():
    code, _, err = run_cli("hi", "--top-p", "2")
    assert_one_line_error(code, err, 1, "top_p must be in (0, 1]")
    code, _, err = run_cli("generate", "hi", "--bogus")
    assert_one_line_error(code, err, 2, "unrecognized arguments: --bogus")


def test_chat_answers_resets_and_exits(tiny_checkpoint):
    code, out, err = run_cli(
        "chat", "--checkpoint", tiny_checkpoint, "--max-new-tokens", "4", "--seed", "0",
        stdin="hello\n/reset\n/what\nhello again\n/exit\nnever read\n",
    )
    assert code == 0, err
    assert out.count("qwen> ") == 2 and out.count("you> ") == 5
    assert "[conversation cleared]" in err and "unknown command /what" in err
    assert "Traceback" not in err


def test_chat_leaves_cleanly_on_ctrl_c(tiny_checkpoint):
    proc = subprocess.Popen(
        [sys.executable, "-m", "minqwen", "chat", "--checkpoint", tiny_checkpoint],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    output = b""
    deadline = time.monotonic() + 240
    while b"you> " not in output and time.monotonic() < deadline and proc.poll() is None:
        output += os.read(proc.stdout.fileno(), 100)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()


def test_real_model_chat_answers():
    code, out, err = run_cli(
        "chat", "--temperature", "0", "--max-new-tokens", "16", stdin="What is 2+2? Reply with the number only.\n/exit\n"
    )
    assert code == 0, err
    assert "4" in out.split("qwen> ", 1)[1]


# --------------------------------------------------------------------------- in process
def test_bare_prompt_means_generate(tiny_checkpoint, capsys, monkeypatch):
    bare = run_main(["Hello world", "--max-new-tokens", "5", "--checkpoint", tiny_checkpoint], capsys, monkeypatch)
    explicit = run_main(["generate", "Hello world", "--max-new-tokens", "5", "--checkpoint", tiny_checkpoint], capsys, monkeypatch)
    assert bare[0] == 0 and bare[1] == explicit[1]


def test_device_auto_picks_an_available_device(tiny_checkpoint, capsys, monkeypatch):
    code, out, err = run_main(["Hello world", "--max-new-tokens", "3", "--checkpoint", tiny_checkpoint, "--device", "auto"], capsys, monkeypatch)
    assert code == 0 and out.startswith("Hello world")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    setting = "int8 weights, bfloat16 activations" if expected == "cpu" else "bfloat16"
    assert f"({setting}, {expected}; the default" in err


@pytest.mark.parametrize("flags, setting", [
    ([], "(int8 weights, bfloat16 activations, cpu; the default: fastest within int8's quality bound; --dtype float32 for exact)"),
    (["--dtype", "float32"], "(float32, cpu)"),
    (["--dtype", "bfloat16"], "(bfloat16, cpu)"),
    (["--quantize", "int8"], "(int8 weights, bfloat16 activations, cpu)"),
    (["--quantize", "none"], "(float32, cpu)"),
    (["--dtype", "float32", "--quantize", "int8"], "(int8 weights, float32 activations, cpu)"),
])
def test_the_precision_is_the_default_or_what_the_flags_name(flags, setting, tiny_checkpoint, capsys, monkeypatch):
    code, out, err = run_main(["Hello", "--max-new-tokens", "2", "--checkpoint", tiny_checkpoint, *flags], capsys, monkeypatch)
    assert code == 0 and out.startswith("Hello"), err
    assert setting in err


def test_sampling_flags_with_a_seed_are_reproducible(tiny_checkpoint, capsys, monkeypatch):
    flags = ["Hi", "--max-new-tokens", "8", "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed", "3", "--checkpoint", tiny_checkpoint]
    first = run_main(flags, capsys, monkeypatch)
    assert first[0] == 0 and first[1] == run_main(flags, capsys, monkeypatch)[1]


def test_quantize_flag_loads_quantized_weights(tiny_checkpoint, capsys, monkeypatch):
    args = ["generate", "Hello", "--max-new-tokens", "3", "--checkpoint", tiny_checkpoint, "--dtype", "bfloat16", "--quantize", "int8"]
    code, out, err = run_main(args, capsys, monkeypatch)
    assert code == 0, err
    assert "(int8 weights, bfloat16 activations, cpu)" in err and out.startswith("Hello")
    code, _, err = run_main(args[:-1] + ["int4"], capsys, monkeypatch)  # the tiny MLP's 56 inputs make no int4 groups
    assert_one_line_error(code, err, 1, "cannot quantise model.layers.0.mlp.down_proj to int4")


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["generate", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["generate", "hi", "--temperature", "-1"], "temperature must be"),
        (["hi", "--top-k", "0"], "top_k must be an integer >= 1"),
        (["hi", "--max-new-tokens", "-3"], "max_new_tokens must be an integer >= 0"),
        (["generate", ""], "the prompt is empty"),
        (["chat", "--repetition-penalty", "0"], "repetition_penalty must be"),
        (["hi", "--checkpoint", "no/such/dir/or-name"], "no/such/dir/or-name"),
        (["hi", "--device", "meta"], "unknown device 'meta'"),
        pytest.param(["chat", "--device", "cuda"], "sees no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
        pytest.param(["hi", "--device", "mps"], "MPS is not available", marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
    ],
)
def test_bad_values_exit_1_with_one_line(args, fragment, capsys, monkeypatch):
    code, _, err = run_main(args, capsys, monkeypatch)
    assert_one_line_error(code, err, 1, fragment)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["generate", "hi", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "hi", "--top-k", "many"], "invalid int value: 'many'"),
        (["generate"], "the following arguments are required: prompt"),
        (["chat", "--dtype", "float8"], "invalid choice: 'float8'"),
        (["generate", "hi", "--quantize", "int3"], "invalid choice: 'int3'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, fragment, capsys, monkeypatch):
    code, _, err = run_main(args, capsys, monkeypatch)
    assert_one_line_error(code, err, 2, fragment)


def test_help_reads_well(capsys, monkeypatch):
    code, out, _ = run_main(["--help"], capsys, monkeypatch)
    assert code == 0 and "generate" in out and "chat" in out and "python -m minqwen" in out
    code, out, _ = run_main(["generate", "--help"], capsys, monkeypatch)
    for flag in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--dtype", "--quantize", "--checkpoint", "--device"):
        assert flag in out


def test_no_arguments_prints_help_and_fails(capsys, monkeypatch):
    code, _, err = run_main([], capsys, monkeypatch)
    assert code == 2 and "COMMAND" in err


def test_chat_leaves_cleanly_at_end_of_input(tiny_checkpoint, capsys, monkeypatch):
    code, out, err = run_main(["chat", "--checkpoint", tiny_checkpoint, "--max-new-tokens", "3"], capsys, monkeypatch, "hi\n")
    assert code == 0 and out.count("qwen> ") == 1 and out.count("you> ") == 2


def test_chat_reports_a_message_too_long_and_goes_on(tiny_checkpoint, capsys, monkeypatch):
    args = ["chat", "--checkpoint", tiny_checkpoint, "--context-length", "80", "--max-new-tokens", "4", "--stats"]
    code, out, err = run_main(args, capsys, monkeypatch, "word " * 200 + "\nhi\n")
    assert code == 0 and "exceeds the 80-token context" in err and out.count("qwen> ") == 1
    assert "tokens/s" in err


def test_command_table_has_generate_and_chat():
    assert {"generate", "chat"} <= set(COMMANDS)
    assert all(callable(c.run) and callable(c.add_arguments) and c.help for c in COMMANDS.values())
