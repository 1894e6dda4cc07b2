"""The llama.cpp peer columns of `bench model`: the commands they run and what they read back,
against stand-in binaries that print llama.cpp's JSON (the real ones are optional, never built by
the tests)."""

import importlib.util
import json
import stat
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "model.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("swattn_bench_model_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stand_in(path: Path, rates: dict[str, float], record: Path, fail_fa: str | None = None) -> str:
    """A program that logs its arguments and prints llama.cpp's JSON with the rate for its -fa value."""
    path.write_text(f"""#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
open({str(record)!r}, "a").write(json.dumps(args) + "\\n")
fa = args[args.index("-fa") + 1]
if fa == {fail_fa!r}:
    sys.exit("failed to load model")
rate = {json.dumps(rates)}[fa]
if "llama-batched-bench" in sys.argv[0]:
    print(json.dumps({{"n_kv_max": 1}}))  # a header line, as --output-format jsonl prints
    print(json.dumps({{"pl": int(args[args.index("-npl") + 1]), "speed_tg": rate}}))
else:
    print(json.dumps([{{"avg_ts": rate}}]))
""")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_llama_bench_takes_the_better_attention_setting(bench, tmp_path):
    record = tmp_path / "args.jsonl"
    binary = stand_in(tmp_path / "llama-bench", {"off": 120.0, "on": 130.5}, record)
    got = bench.llama_bench(binary, "m.gguf", "decode", 2048, 64, "bf16", 60)
    assert got == {"tokens_per_s": 130.5, "fa": "on"}
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 2 and all(c[c.index("-d") + 1] == "2048" and c[c.index("-ctk") + 1] == "bf16" for c in calls)


def test_llama_batched_bench_runs_every_sequence_with_its_own_cache(bench, tmp_path):
    record = tmp_path / "args.jsonl"
    binary = stand_in(tmp_path / "llama-batched-bench", {"off": 699.1, "on": 687.5}, record)
    got = bench.llama_batched_bench(binary, "m.gguf", 512, 32, 8, None, 60)
    assert got == {"tokens_per_s": 699.1, "fa": "off"}
    for call in (json.loads(line) for line in record.read_text().splitlines()):
        assert "-no-kvu" in call and "-ctk" not in call  # no KV type given: llama.cpp's default
        assert [call[call.index(flag) + 1] for flag in ("-npp", "-ntg", "-npl")] == ["512", "32", "8"]
        assert int(call[call.index("-c") + 1]) >= 8 * (512 + 32)  # room for every sequence


def test_a_failing_setting_is_skipped_and_all_failing_is_an_error(bench, tmp_path):
    record = tmp_path / "args.jsonl"
    binary = stand_in(tmp_path / "llama-batched-bench", {"off": 1.0, "on": 2.0}, record, fail_fa="on")
    assert bench.llama_batched_bench(binary, "m.gguf", 64, 8, 2, "q8_0", 60) == {"tokens_per_s": 1.0, "fa": "off"}
    broken = tmp_path / "broken" / "llama-bench"
    broken.parent.mkdir()
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    assert "error" in bench.llama_bench(str(broken), "m.gguf", "prefill", 64, 0, None, 60)


def test_the_batched_binary_is_found_beside_llama_bench(bench, tmp_path):
    (tmp_path / "llama-bench").write_text("")
    assert bench.batched_binary(str(tmp_path / "llama-bench")) is None
    (tmp_path / "llama-batched-bench").write_text("")
    assert bench.batched_binary(str(tmp_path / "llama-bench")) == str(tmp_path / "llama-batched-bench")
