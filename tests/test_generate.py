"""Generation: batched greedy parity with transformers, sampling, stop tokens, the CLI."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from swattn.cli import main
from swattn.generate import Sampling, generate
from swattn.models.loading import load

from test_models import tiny_hf_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = tiny_hf_model("gemma2")
    path = tmp_path_factory.mktemp("gemma2")
    hf.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path, hf


def test_batched_left_padded_greedy_matches_transformers(checkpoint):
    path, hf = checkpoint
    model = load(path)
    prompts = [[5, 17, 99, 3, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    new = 14
    stats = generate(model, prompts, max_new_tokens=new)
    padded = torch.tensor([[0] * 4 + prompts[0], prompts[1]])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    with torch.no_grad():
        want = hf.generate(padded, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, 9:]
    assert stats.tokens == want.tolist()
    assert stats.new_tokens == 2 * new and stats.prompt_tokens == 14


def test_sampling_is_seeded_and_degenerates_to_greedy(checkpoint):
    model = load(checkpoint[0])
    prompt = [[7, 8, 9]]
    greedy = generate(model, prompt, max_new_tokens=10).tokens
    a = generate(model, prompt, max_new_tokens=10, sampling=Sampling(temperature=1.0, seed=3)).tokens
    b = generate(model, prompt, max_new_tokens=10, sampling=Sampling(temperature=1.0, seed=3)).tokens
    assert a == b
    assert generate(model, prompt, max_new_tokens=10, sampling=Sampling(temperature=0.7, top_k=1, seed=1)).tokens == greedy
    assert generate(model, prompt, max_new_tokens=10, sampling=Sampling(temperature=0.7, top_p=1e-6, seed=1)).tokens == greedy


def test_stop_tokens_end_their_row_only(checkpoint):
    model = load(checkpoint[0])
    prompts = [[7, 8, 9], [100, 101]]
    free = generate(model, prompts, max_new_tokens=8).tokens
    stop = free[0][2]
    assert stop not in free[1][:8] or free[1].index(stop) > 2  # the test needs row 0 to stop first
    got = generate(model, prompts, max_new_tokens=8, stop_tokens=[stop]).tokens
    assert got[0] == free[0][: free[0].index(stop) + 1]
    assert got[1] == free[1][: free[1].index(stop) + 1] if stop in free[1] else got[1] == free[1]


def test_chunked_prefill_does_not_change_the_output(checkpoint):
    model = load(checkpoint[0])
    prompt = [list(range(10, 40))]
    assert generate(model, prompt, max_new_tokens=6, chunk_size=7).tokens == generate(model, prompt, max_new_tokens=6).tokens


def test_bad_sampling_settings():
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1, top_p=0)


def test_cli_generate_streams_text_and_reports_speed(checkpoint, capsys):
    path, _ = checkpoint
    assert main(["generate", "--model", str(path), "--prompt", "w7 w8 w9", "--max-new-tokens", "5",
                 "--chunk-size", "2"]) == 0
    out, err = capsys.readouterr()
    expected = generate(load(path), [[7, 8, 9]], max_new_tokens=5).tokens[0]
    assert out.split() == [f"w{t}" for t in expected]
    assert "tokens/s" in err and "cache memory" in err
    assert "\r" not in err  # no progress bar when stderr is not a terminal


def sample_support(logits, sampling, draws=3000):
    from swattn.generate import choose

    batch = torch.tensor(logits, dtype=torch.float32).log().expand(draws, -1)
    return set(choose(batch, sampling, torch.Generator().manual_seed(0)).tolist())


def test_top_p_keeps_the_fewest_tokens_that_reach_it():
    probs = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    assert sample_support(probs, Sampling(temperature=1.0, top_p=0.4999)) == {0}
    assert sample_support(probs, Sampling(temperature=1.0, top_p=0.5001)) == {0, 1}  # the crossing token is in
    assert sample_support(probs, Sampling(temperature=1.0, top_p=0.7501)) == {0, 1, 2}
    assert sample_support(probs, Sampling(temperature=1.0, top_p=1.0)) == {0, 1, 2, 3, 4}


def test_top_k_keeps_every_token_tied_at_the_kth_value():
    probs = [0.1, 0.25, 0.25, 0.25, 0.15]
    assert sample_support(probs, Sampling(temperature=1.0, top_k=2)) == {1, 2, 3}  # as transformers: ties kept
    assert sample_support(probs, Sampling(temperature=1.0, top_k=4)) == {1, 2, 3, 4}
    # then top-p over the three survivors (1/3 each): one of them, or two (which ones among ties: sort order)
    one = sample_support(probs, Sampling(temperature=1.0, top_k=2, top_p=0.3))
    two = sample_support(probs, Sampling(temperature=1.0, top_k=2, top_p=0.5))
    assert len(one) == 1 and len(two) == 2 and one < two <= {1, 2, 3}


def test_decode_time_excludes_the_streaming_callback_and_the_kernel_build(checkpoint, monkeypatch):
    import time

    from swattn.ops import cpu

    model = load(checkpoint[0])
    built = []
    real_available = cpu.available

    def slow_build():  # as a first-time compile would be
        if not built:
            time.sleep(0.5)
        built.append(1)
        return real_available()

    monkeypatch.setattr(cpu, "available", slow_build)
    stats = generate(model, [[7, 8, 9]], max_new_tokens=6, on_step=lambda _: time.sleep(0.1))
    assert built and stats.new_tokens == 6
    assert stats.prefill_seconds < 0.5  # the build happened before the clock started
    assert stats.decode_seconds < 0.5  # six 0.1 s callbacks are not decoding


def test_packed_forward_equals_each_sequence_alone(checkpoint):
    # decoding rows of a batch cache and another sequence's prompt chunk share one pass over the weights
    model = load(checkpoint[0])
    a, b, c = (torch.randint(4, 250, (1, n)) for n in (21, 13, 9))
    big = model.new_cache(3, capacity=64)
    views = [big.row(i) for i in range(3)]
    for view in views:
        view.clear()

    def alone(seq, extra=None):
        cache = model.new_cache(1, capacity=64)
        out = model(seq, torch.arange(seq.shape[1])[None], cache, last_only=True)[0, -1]
        if extra is not None:
            out = model(torch.tensor([[extra]]), torch.tensor([[seq.shape[1]]]), cache, last_only=True)[0, -1]
        return out

    with torch.inference_mode():
        first = model.forward_packed([(a, torch.arange(21)[None], views[0]), (b, torch.arange(13)[None], views[1])])
        torch.testing.assert_close(first[0][0], alone(a), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(first[1][0], alone(b), atol=1e-4, rtol=1e-4)
        ta, tb = int(first[0][0].argmax()), int(first[1][0].argmax())
        step = model.forward_packed([(torch.tensor([[ta], [tb]]), torch.tensor([[21], [13]]), big.rows(0, 2)),
                                     (c, torch.arange(9)[None], views[2])])
        torch.testing.assert_close(step[0][0], alone(a, ta), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step[0][1], alone(b, tb), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step[1][0], alone(c), atol=1e-4, rtol=1e-4)
        # decoding rows alone (the server's usual step) take the model's decode path
        tc = int(step[1][0].argmax())
        only = model.forward_packed([(torch.tensor([[tc]]), torch.tensor([[9]]), views[2])])
        torch.testing.assert_close(only[0][0], alone(c, tc), atol=1e-4, rtol=1e-4)
