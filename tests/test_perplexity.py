"""swattn perplexity: equal to transformers' exp(mean cross-entropy) on the same tokens; windows; KL."""

import math
import subprocess
import sys

import pytest
import torch
import transformers

import swattn
from swattn.perplexity import evaluate, segments


@pytest.fixture(scope="module")
def text_and_model(tiny_trained):
    import textwrap

    out, _ = tiny_trained
    model = swattn.load(out)
    text = open(textwrap.__file__).read()[:6000]
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    return out, model, text, ids


def transformers_nll(path, ids, context, window=None):
    """Summed cross-entropy and token count that transformers gives on the same segments."""
    kw = {} if window is None else {"sliding_window": window}
    hf = transformers.Gemma2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kw)
    total, count = 0.0, 0
    with torch.no_grad():
        for seg in segments(ids, context, hf.config.bos_token_id):
            t = torch.tensor([seg])
            logits = hf(t).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum").item()
            count += len(seg) - 1
    return total, count


@pytest.mark.parametrize("context,chunk", [(100, 1024), (100, 7), (300, 64)])
def test_perplexity_equals_transformers_on_the_same_tokens(text_and_model, context, chunk):
    path, model, _, ids = text_and_model
    assert len(ids) > 3 * context and context > 32  # several segments, each several windows (32) long
    r = evaluate(model, ids, context=context, chunk_size=chunk, tokenizer=model.tokenizer)
    nll, count = transformers_nll(path, ids, context)
    assert r.tokens == count == len(ids)  # <bos> per segment: every token of the text is predicted
    assert abs(r.perplexity - math.exp(nll / count)) / math.exp(nll / count) < 1e-4


def test_window_override_equals_transformers_with_that_window(text_and_model):
    path, model, _, ids = text_and_model
    try:
        model.set_local_window(8)
        r = evaluate(model, ids, context=120)
    finally:
        model.set_local_window(32)
    nll, count = transformers_nll(path, ids, 120, window=8)
    assert abs(r.loss - nll / count) < 1e-4
    assert abs(evaluate(model, ids, context=120).loss - r.loss) > 1e-3  # the window did change something


def test_kl_against_itself_is_zero_and_bits_per_byte_counts_the_text(text_and_model):
    _, model, text, ids = text_and_model
    r = evaluate(model, ids[:500], context=200, base=model, tokenizer=model.tokenizer)
    assert r.mean_kl == pytest.approx(0.0, abs=1e-6) and r.top1_agreement == 1.0
    n_bytes = len(model.tokenizer.decode(ids[:500]).encode())
    assert r.bytes == n_bytes
    assert r.bits_per_byte == pytest.approx(r.nll / math.log(2) / n_bytes)


def test_cli_prints_a_row_per_window_and_writes_the_plot(text_and_model, tmp_path):
    path, _, text, _ = text_and_model
    f = tmp_path / "text.py"
    f.write_text(text)
    plot = tmp_path / "ppl.png"
    r = subprocess.run([sys.executable, "-m", "swattn.cli", "perplexity", "--model", str(path), "--file", str(f),
                        "--context", "128", "--window", "8", "32", "full", "--plot", str(plot), "--kl-base", "float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["8", "32", "full"]
    assert rows[1][-1] == "100.00%"  # the model's own window against itself
    assert plot.exists() and plot.stat().st_size > 1000


def test_cli_errors_are_one_line(tmp_path):
    for args, message in [(["--file", str(tmp_path / "missing.txt"), "--model", str(tmp_path)], "missing.txt"),
                          (["--file", "-", "--context", "1"], "--context must be >= 2")]:
        r = subprocess.run([sys.executable, "-m", "swattn.cli", "perplexity", *args], capture_output=True, text=True,
                           timeout=60, input="")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_kl_and_top1_against_another_model_are_computed_by_hand(text_and_model):
    path, model, _, ids = text_and_model
    base = swattn.load(path)
    seg = [model.cfg.bos_token_id] + ids[:99]
    try:
        model.set_local_window(4)
        r = evaluate(model, ids[:99], context=100, base=base)
        with torch.no_grad():
            lp = model(torch.tensor([seg]))[0, :-1].double().log_softmax(-1)
    finally:
        model.set_local_window(32)
    with torch.no_grad():
        lpb = base(torch.tensor([seg]))[0, :-1].double().log_softmax(-1)
    kl = (lpb.exp() * (lpb - lp)).sum(-1).mean().item()  # KL(base || model): how far the model is from the base
    assert kl > 1e-3 and r.mean_kl == pytest.approx(kl, rel=1e-3)
    assert r.top1 == int((lp.argmax(-1) == lpb.argmax(-1)).sum())
