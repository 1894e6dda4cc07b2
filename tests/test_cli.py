"""The command line: demo and benchmark run end to end on small sizes."""

import pytest

from swattn.cli import main


def test_demo_tour_runs_on_the_built_in_model(capsys, tmp_path):
    plot = tmp_path / "demo.png"
    assert main(["demo", "--n", "700", "--window", "128", "--stream-tokens", "3000", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "def list_python_files(root):" in out  # part 1: the prompt, then its completion
    assert "[2/3]" in out and "every token kept" in out and plot.stat().st_size > 1000
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


def test_bench_linear_prints_every_shape_and_pass(capsys):
    assert main(["bench", "linear", "--rows", "8", "--shapes", "64:32", "96:48", "--dtype", "fp32", "--repeat", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().endswith("%")]
    assert [r.split()[:4] for r in rows] == [["64", "32", "fp32", "fwd"], ["64", "32", "fp32", "fwd+bwd"],
                                              ["96", "48", "fp32", "fwd"], ["96", "48", "fp32", "fwd+bwd"]]
    with pytest.raises(SystemExit):
        main(["bench", "linear", "--shapes", "64x32"])


def test_bench_cache_runs_and_checks_ring_memory(capsys):
    assert main(["bench", "cache", "--contexts", "64", "256", "--window", "32", "--steps", "3", "--million", "100"]) == 0
    out = capsys.readouterr().out
    assert "identical, same buffer" in out
    assert len([line for line in out.splitlines() if line.lstrip().startswith(("64 ", "256 "))]) == 2


@pytest.mark.parametrize("name,option", [("model", "--chunk"), ("transformers", "--train"), ("train", "--contexts"),
                                         ("distributed", "--procs")])
def test_bench_help_is_the_scripts_own(name, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", name, "--help"])
    assert exit_.value.code == 0
    assert option in capsys.readouterr().out


def test_bench_train_runs_every_implementation(capsys, tmp_path):
    args = ["bench", "train", "--contexts", "64", "128", "--tokens", "128", "--precision", "fp32", "--repeat", "1",
            "--dir", str(tmp_path)]
    assert main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith(("64 ", "128 "))]
    assert len(rows) == 2 and all(row.count(" s ") == 3 and "faster than" in row for row in rows)


def test_demo_measures_memory_where_there_is_no_proc(monkeypatch, capsys):
    import builtins

    real_open = builtins.open

    def no_proc(file, *args, **kwargs):
        if str(file).startswith("/proc"):
            raise FileNotFoundError(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    from swattn import profiling

    assert profiling.rss_bytes() > 0 and profiling.peak_rss_bytes() >= profiling.rss_bytes() // 2
    assert main(["demo", "--op-only", "--n", "700", "--window", "128"]) == 0
    assert "(ok)" in capsys.readouterr().out
