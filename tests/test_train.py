"""swattn train: the checkpoint it writes, exact resumption after Ctrl-C, and its errors."""

import json
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

import swattn
from swattn.training import data as D
from swattn.training.loss import linear_cross_entropy
from swattn.training.trainer import TrainArgs, lr_at, parse_duration, train


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "swattn.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_trained_checkpoint_loads_in_swattn_and_transformers_with_equal_logits(tiny_trained):
    out, result = tiny_trained
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "loss.csv", "loss.png"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma2" and config["sliding_window"] == 32
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
    ours = swattn.load(out)
    hf = transformers.Gemma2ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([ours.tokenizer.encode("import json\n" * 30).ids[:150]])  # several windows long
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    # the tokenizer: transformers reads the same ids, <bos> first
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("def f(x):").input_ids == ours.tokenizer.encode("def f(x):").ids
    assert ours.tokenizer.encode("x").ids[0] == config["bos_token_id"]


def test_training_lowers_the_heldout_loss(tiny_trained):
    _, result = tiny_trained
    held = [h["heldout_loss"] for h in result.history if h.get("heldout_loss") is not None]
    assert len(held) == 3 and held[-1] < held[0] - 0.3
    assert result.history[0]["train_loss"] > result.history[-1]["train_loss"]


def test_tokenizer_round_trips_any_text(corpus_dir):
    tok = D.train_tokenizer(D.read_documents(D.expand([str(corpus_dir)])), 300)
    for text in ["def f(x):\n    return x", "€ 漢字 🙂 ünïcödé", "\t\t  spaces  \n"]:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_batches_depend_only_on_seed_and_step():
    stream = torch.arange(1000, dtype=torch.int32)
    a = D.batch_at(stream, 7, 4, 16, seed=1)
    assert torch.equal(a, D.batch_at(stream, 7, 4, 16, seed=1))
    assert not torch.equal(a, D.batch_at(stream, 8, 4, 16, seed=1))
    assert a.shape == (4, 17) and torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 16, dtype=torch.int64))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_head_loss_matches_cross_entropy(softcap, monkeypatch):
    import swattn.training.loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK", 7)  # several chunks, the last one short
    h = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (20,))
    loss = linear_cross_entropy(h, w, t, softcap)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logits = h2 @ w2.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ref = torch.nn.functional.cross_entropy(logits, t)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(h.grad, h2.grad, atol=1e-6) and torch.allclose(w.grad, w2.grad, atol=1e-6)


def test_schedule_and_durations():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.55)
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == 90 and parse_duration("45") == 45
    with pytest.raises(ValueError, match="time-budget"):
        parse_duration("soon")


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(corpus_dir, tmp_path):
    common = ["train", "--data", str(corpus_dir), "--preset", "tiny", "--steps", "150", "--eval-every", "10",
              "--save-every", "1000", "--precision", "fp32", "--save-dtype", "float32"]
    straight = tmp_path / "straight"
    assert run_cli(*common, "--out", str(straight)).returncode == 0

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "swattn.cli", *common, "--out", str(stopped)],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the first held-out evaluation: training is under way
        if line.startswith("step 10/"):
            proc.send_signal(signal.SIGINT)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert "--resume" in err and "Traceback" not in err
    state = json.loads((stopped / "checkpoint" / "trainer.json").read_text())
    assert 10 <= state["step"] < 150
    assert (stopped / "model.safetensors").exists()  # the model so far is usable too

    resumed = run_cli(*common, "--out", str(stopped), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {state['step']}" in resumed.stderr
    a, b = load_file(straight / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (stopped / "loss.csv").read_text() == (straight / "loss.csv").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--context", "16"], "shorter than the local window"),
    (["--resume"], "no checkpoint"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--time-budget", "soon"], "cannot read 'soon'"),
])
def test_bad_settings_are_one_line_errors(corpus_dir, tmp_path, extra, message):
    r = run_cli("train", "--data", str(corpus_dir), "--out", str(tmp_path / "o"), "--preset", "tiny",
                *(["--steps", "5"] if "--steps" not in extra and "--time-budget" not in extra else []), *extra)
    assert r.returncode in (1, 2)
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("swattn train: error: ") and message in errors[0]
    assert "Traceback" not in r.stderr


def test_bad_data_is_a_one_line_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    for data, message in [(str(tmp_path / "nothing-*.txt"), "names no file"), (str(tmp_path / "empty.txt"), "no text")]:
        r = run_cli("train", "--data", data, "--out", str(tmp_path / "o"), "--preset", "tiny", "--steps", "5")
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_resume_refuses_another_shape_and_a_fresh_run_refuses_a_used_directory(tiny_trained, corpus_dir):
    out, _ = tiny_trained
    r = run_cli("train", "--data", str(corpus_dir), "--out", str(out), "--preset", "small", "--resume")
    assert r.returncode == 1 and "preset 'tiny', not 'small'" in r.stderr
    r = run_cli("train", "--data", str(corpus_dir), "--out", str(out), "--preset", "tiny", "--steps", "5")
    assert r.returncode == 1 and "already holds a training checkpoint" in r.stderr


def test_fine_tuning_an_existing_checkpoint_keeps_its_tokenizer_and_family(tiny_trained, corpus_dir, tmp_path):
    base, _ = tiny_trained
    out = tmp_path / "tuned"
    result = train(TrainArgs(data=[str(corpus_dir)], out=str(out), init=str(base), steps=3, context=64,
                             precision="fp32", save_dtype="float32", eval_every=3), log=lambda _: None, progress=False)
    assert result.steps == 3
    assert (out / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    before, after = swattn.load(base), swattn.load(out)
    assert before.cfg == after.cfg
    assert not torch.equal(before.embed_tokens.weight, after.embed_tokens.weight)
