"""The command line as a user meets it, through the real entry point: one-line errors, Ctrl-C, pipes, chat."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from chat_fixtures import write_chat_checkpoint

CLI = [sys.executable, "-m", "swattn.cli"]


def run(*args, stdin=None, timeout=120):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, input=stdin, timeout=timeout)


def assert_one_line_error(proc, command, status, *words):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if line.startswith(f"swattn {command}: error: ")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("chat_cli"))


def broken_copy(chat_dir, tmp_path, edit):
    """A copy of the chat checkpoint with config.json changed by ``edit`` (a dict -> dict or str function)."""
    out = tmp_path / "broken"
    shutil.copytree(chat_dir, out)
    config = json.loads((out / "config.json").read_text())
    edited = edit(config)
    (out / "config.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    return out


@pytest.mark.parametrize("args,status,words", [
    (["--model", "/no/such/dir", "--prompt", "x"], 2, ["--model", "/no/such/dir"]),
    (["--prompt-file", "/no/such/file"], 2, ["--prompt-file", "/no/such/file"]),
    (["--prompt", "x", "--top-p", "1.5"], 2, ["--top-p", "1.5"]),
    (["--prompt", "x", "--top-k", "0", "--temperature", "1"], 2, ["--top-k", "0"]),
    (["--prompt", "x", "--max-new-tokens", "-1"], 2, ["--max-new-tokens", "-1"]),
    (["--prompt", "x", "--top-k", "5"], 2, ["--temperature"]),  # top-k is meaningless when greedy
    (["--prompt", "x", "--system", "s"], 2, ["--chat"]),
    (["--prompt", "x", "--chat"], 2, ["chat template", "swattn generate"]),  # the built-in model is no chat model
])
def test_bad_options_and_paths_are_one_line_errors(args, status, words):
    assert_one_line_error(run("generate", *args), "generate", status, *words)


@pytest.mark.parametrize("edit,words", [
    (lambda c: "{ this is not json", ["config.json", "JSON"]),
    (lambda c: {**c, "model_type": "llama"}, ["model_type", "llama"]),
    (lambda c: {**c, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope_scaling", "yarn"]),
    (lambda c: {**c, "hidden_activation": "relu"}, ["hidden_activation", "relu"]),
    (lambda c: {**c, "layer_types": ["chunked_attention"] * 4}, ["layer_types", "chunked_attention"]),
    (lambda c: {**c, "use_bidirectional_attention": True}, ["use_bidirectional_attention"]),
])
def test_unusable_checkpoints_are_one_line_errors(chat_dir, tmp_path, edit, words):
    bad = broken_copy(chat_dir, tmp_path, edit)
    assert_one_line_error(run("generate", "--model", str(bad), "--prompt", "x"), "generate", 1, *words)


def test_a_missing_tokenizer_is_named(chat_dir, tmp_path):
    bad = broken_copy(chat_dir, tmp_path, lambda c: c)
    (bad / "tokenizer.json").unlink()
    assert_one_line_error(run("generate", "--model", str(bad), "--prompt", "x"), "generate", 1, "tokenizer.json")


def test_debug_shows_the_traceback(chat_dir, tmp_path):
    bad = broken_copy(chat_dir, tmp_path, lambda c: {**c, "model_type": "llama"})
    proc = run("generate", "--model", str(bad), "--prompt", "x", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_prompt_file_dash_reads_standard_input():
    proc = run("generate", "--prompt-file", "-", "--max-new-tokens", "3", stdin="import os\n")
    assert proc.returncode == 0, proc.stderr
    assert "prefill: 4 tokens" in proc.stderr  # <bos>, import, os, newline: the text came through


def test_a_closed_output_pipe_ends_quietly():
    proc = subprocess.Popen([*CLI, "generate", "--prompt", "import os\n", "--max-new-tokens", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and "Traceback" not in err and "Error" not in err


def wait_for(stream_lines, text, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = stream_lines.readline()
        if text in line:
            return
    raise AssertionError(f"{text!r} never appeared")


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_ctrl_c_stops_cleanly_with_the_figures_so_far(tmp_path, phase):
    if phase == "prefill":  # a long prompt in small chunks: Ctrl-C lands while it is prefilled
        prompt = tmp_path / "long.py"
        prompt.write_text("import os\nprint(os.getcwd())\n" * 3000)
        args = ["--prompt-file", str(prompt), "--chunk-size", "16", "--max-new-tokens", "5"]
    else:
        args = ["--prompt", "import os\n", "--max-new-tokens", "100000"]
    proc = subprocess.Popen([*CLI, "generate", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if phase == "prefill":
        wait_for(proc.stderr, "using the built-in model")
        time.sleep(1.5)
    else:
        proc.stdout.readline()  # tokens are streaming
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "prefill:" in err
    if phase == "prefill":
        prefilled = int(err.split("prefill: ")[1].split(" tokens")[0].replace(",", ""))
        assert 0 < prefilled < 30000 and "decode: 0 tokens" in err


def test_generating_past_max_positions_warns_once(chat_dir, tmp_path):
    short = broken_copy(chat_dir, tmp_path, lambda c: {**c, "max_position_embeddings": 8})
    proc = run("generate", "--model", str(short), "--prompt", "abc", "--max-new-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "max_position_embeddings" in warnings[0] and warnings[0].startswith("swattn generate")


def test_chat_reads_messages_from_standard_input(chat_dir):
    proc = run("chat", "--model", str(chat_dir), "--max-new-tokens", "5", stdin="Hi\nHow are you?\n/reset\nHello\n")
    assert proc.returncode == 0, proc.stderr
    turns = [line for line in proc.stderr.splitlines() if line.startswith("(") and "from the cache" in line]
    assert len(turns) == 3 and "(conversation cleared)" in proc.stderr
    assert " 0 from the cache" in turns[0] and " 0 from the cache" not in turns[1] and " 0 from the cache" in turns[2]


def test_chat_and_generate_chat_give_the_same_reply(chat_dir):
    chat = run("chat", "--model", str(chat_dir), "--max-new-tokens", "6", stdin="Hi\n")
    once = run("generate", "--chat", "--model", str(chat_dir), "--prompt", "Hi", "--max-new-tokens", "6")
    assert chat.returncode == 0 and once.returncode == 0, chat.stderr + once.stderr
    assert chat.stdout == once.stdout and chat.stdout.strip()


def test_a_refused_system_message_is_a_one_line_error_with_a_hint(chat_dir):
    proc = run("chat", "--model", str(chat_dir), "--system", "Be brief.", stdin="Hi\n")
    assert_one_line_error(proc, "chat", 2, "System role not supported", "first message")


def test_bf16_checkpoints_load_in_bf16_unless_told():
    import torch

    from swattn import load

    assert load().embed_tokens.weight.dtype == torch.bfloat16  # the built-in model is stored in bfloat16
    assert load(dtype="float32").embed_tokens.weight.dtype == torch.float32


def test_interactive_chat_on_a_terminal_survives_ctrl_c(chat_dir, tmp_path):
    import os
    import pty
    import select

    endless = broken_copy(chat_dir, tmp_path, lambda c: c)
    (endless / "generation_config.json").write_text(json.dumps({"eos_token_id": []}))  # replies never end alone
    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, "chat", "--model", str(endless), "--max-new-tokens", "1000000"],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < end, seen.decode(errors="replace")[-500:]
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)

    try:
        read_until(b">>> ")
        seen = b""
        os.write(master, b"Hi\n")
        read_until(b"Hi")  # the echo, then the reply streams
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)  # stops the reply, keeps the session
        read_until(b">>> ")
        assert b"stopped;" in seen and b"Traceback" not in seen
        seen = b""
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_weight_options_are_checked_in_one_line(tmp_path):
    for command in (["generate", "--prompt", "x"], ["serve"]):
        assert_one_line_error(run(*command, "--head", "q4"), command[0], 2, "--head applies to quantized weights")
    proc = run("quantize", "--out", str(tmp_path / "q"), "--weights", "q2")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert_one_line_error(run("quantize", "--out", str(tmp_path / "full"), "--weights", "q8"), "quantize", 2,
                          "exists and is not empty")
