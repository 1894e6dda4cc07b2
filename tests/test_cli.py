"""The command line: demo and benchmark run end to end on small sizes."""

import pytest

from swattn.cli import main


def test_demo_checks_against_the_oracle(capsys):
    assert main(["demo", "--n", "700", "--window", "128"]) == 0
    out = capsys.readouterr().out
    assert "(ok)" in out and "SDPA + dense mask" in out and "x slower" in out


def test_bench_attention_prints_one_row_per_configuration(capsys):
    args = ["bench", "attention", "--n", "300", "--window", "64", "--head-dim", "16", "--dtype", "fp32",
            "--mode", "fwd", "fwd+bwd", "--impl", "swattn", "sdpa_dense", "--repeat", "1"]
    assert main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("300")]
    assert len(rows) == 2
    assert all(" ms " in row and "x" in row for row in rows)


def test_unknown_command_line_is_an_error():
    with pytest.raises(SystemExit):
        main(["bench", "nonsense"])
    with pytest.raises(SystemExit):
        main(["demo", "--bogus"])


def test_bench_cache_runs_and_checks_ring_memory(capsys):
    assert main(["bench", "cache", "--contexts", "64", "256", "--window", "32", "--steps", "3", "--million", "100"]) == 0
    out = capsys.readouterr().out
    assert "identical, same buffer" in out
    assert len([line for line in out.splitlines() if line.lstrip().startswith(("64 ", "256 "))]) == 2


@pytest.mark.parametrize("name,option", [("model", "--chunk"), ("transformers", "--train")])
def test_bench_help_is_the_scripts_own(name, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", name, "--help"])
    assert exit_.value.code == 0
    assert option in capsys.readouterr().out
