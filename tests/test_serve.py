"""`swattn serve` running as a subprocess on loopback, driven by the official openai client and raw HTTP."""

import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from chat_fixtures import write_chat_checkpoint
from swattn.chat import ChatTemplate, encode_rendered
from swattn.generate import generate
from swattn.models.loading import load


LONG_PREFIX = "The quick brown fox jumps over the lazy dog. " * 4  # ~180 tokens with the character tokenizer


def start_server(model_dir, *extra, env=None):
    """Starts `swattn serve` on a free loopback port; gives (process, base URL) once /health says 200."""
    proc = subprocess.Popen([sys.executable, "-m", "swattn.cli", "serve", "--model", str(model_dir), "--port", "0",
                             "--dtype", "float32", *extra], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    url = None
    while url is None:
        assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
        line = proc.stderr.readline()
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        url = found.group(1) if found else None
    while httpx.get(url + "/health").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.1)
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    return proc, url


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(model_dir):
    proc, url = start_server(model_dir, "--parallel", "4", "--ctx-size", "512", "--snapshot-every", "32",
                             "--prefill-chunk", "48", "--name", "serve")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(model_dir):
    """What `swattn generate` gives (greedy, fp32): the truth the server must match."""
    model = load(model_dir, dtype="float32")
    template = ChatTemplate.from_checkpoint(model_dir)

    def run(prompt=None, messages=None, max_tokens=12):
        ids = (encode_rendered(model.tokenizer, template.render(messages)) if messages is not None
               else model.tokenizer.encode(prompt).ids)
        tokens = generate(model, [ids], max_new_tokens=max_tokens, stop_tokens=model.stop_tokens).tokens[0]
        text_tokens = [t for t in tokens if t not in model.stop_tokens]
        return model.tokenizer.decode(text_tokens), len(ids), tokens

    return run


def test_chat_completion_equals_generate(client, reference):
    messages = [{"role": "user", "content": "Hi there"}]
    got = client.chat.completions.create(model="serve", messages=messages, max_tokens=12, temperature=0)
    text, prompt_len, tokens = reference(messages=messages)
    assert got.choices[0].message.content == text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == prompt_len and got.usage.completion_tokens == len(tokens)
    assert got.choices[0].finish_reason in ("stop", "length") and got.object == "chat.completion"


def test_streamed_chat_with_usage_equals_the_whole_reply(client, reference):
    messages = [{"role": "user", "content": "Tell me more"}]
    chunks = list(client.chat.completions.create(model="serve", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(messages=messages)[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions_streamed_and_not(client, reference):
    text = reference(prompt="abc abc", max_tokens=10)[0]
    got = client.completions.create(model="serve", prompt="abc abc", max_tokens=10, temperature=0)
    assert got.choices[0].text == text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="serve", prompt="abc abc", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == text


def test_eight_concurrent_streams_give_what_each_gives_alone(client, reference):
    prompts = [f"stream {i}: " + "xyz" * i for i in range(8)]
    alone = [reference(prompt=p, max_tokens=16)[0] for p in prompts]
    results = [None] * 8

    def run(i):
        stream = client.completions.create(model="serve", prompt=prompts[i], max_tokens=16, temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == alone


def metric(url, name):
    text = httpx.get(url + "/metrics").text
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1))


def test_closed_streams_free_their_slots_and_others_continue(server, client, reference):
    expected = reference(prompt="keep going", max_tokens=40)[0]
    kept = []
    survivor = threading.Thread(target=lambda: kept.append("".join(
        c.choices[0].text for c in client.completions.create(model="serve", prompt="keep going", max_tokens=40,
                                                             temperature=0, stream=True) if c.choices)))
    survivor.start()
    for _ in range(3):  # streams that ask for many tokens and leave after a few
        body = {"prompt": "leave early", "max_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 0}
        with httpx.stream("POST", server + "/v1/completions", json=body) as response:
            for i, _line in enumerate(response.iter_lines()):
                if i > 4:
                    break
    survivor.join(timeout=120)
    assert kept == [expected]
    deadline = time.monotonic() + 10
    while metric(server, "swattn_requests_running") != 0:
        assert time.monotonic() < deadline, "a slot stayed busy"
        time.sleep(0.05)
    cancelled = metric(server, 'swattn_requests_total{reason="cancelled"}')
    assert cancelled >= 3
    generated = metric(server, "swattn_generated_tokens_total")
    time.sleep(0.5)
    assert metric(server, "swattn_generated_tokens_total") == generated  # nothing computed for them afterwards


def test_a_shared_prefix_is_reused_and_gives_the_cold_tokens(client, reference):
    first = client.completions.create(model="serve", prompt=LONG_PREFIX + "first question", max_tokens=8,
                                      temperature=0)
    second = client.completions.create(model="serve", prompt=LONG_PREFIX + "another one", max_tokens=8,
                                       temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == 128  # the last snapshot boundary (32, 64, 128, 256: doubling) in the ~180 shared tokens
    assert second.choices[0].text == reference(prompt=LONG_PREFIX + "another one", max_tokens=8)[0]
    again = client.completions.create(model="serve", prompt=LONG_PREFIX + "first question", max_tokens=8,
                                      temperature=0)
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1 or \
        again.usage.prompt_tokens_details.cached_tokens >= cached


def test_models_health_metrics_tokenize(server, client, model_dir):
    assert [m.id for m in client.models.list().data] == ["serve"]
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    text = httpx.get(server + "/metrics").text
    for name in ("swattn_requests_running", "swattn_requests_waiting", "swattn_prompt_tokens_total",
                 "swattn_generated_tokens_total", "swattn_prefix_cache_hits_total", "swattn_kv_cache_bytes_used",
                 "swattn_time_to_first_token_seconds_bucket", "swattn_inter_token_latency_seconds_bucket"):
        assert name in text
    tokens = httpx.post(server + "/tokenize", json={"content": "abc"}).json()["tokens"]
    assert len(tokens) == 3
    assert httpx.post(server + "/detokenize", json={"tokens": tokens}).json() == {"content": "abc"}


@pytest.mark.parametrize("body,status,words", [
    ({"prompt": "x" * 600, "max_tokens": 10}, 400, ["600", "10", "512"]),
    ({"prompt": "abc", "max_tokens": 600}, 400, ["max_tokens", "600"]),
    ({"prompt": "abc", "temperature": 3}, 400, ["temperature"]),
    ({"prompt": "abc", "temperature": "hot"}, 400, ["temperature"]),
    ({"prompt": "abc", "top_p": 0}, 400, ["top_p"]),
    ({"prompt": "abc", "n": 2}, 400, ["'n'"]),
    ({"prompt": "abc", "stop": ["a", "b", "c", "d", "e"]}, 400, ["stop"]),
    ({"prompt": 5}, 400, ["prompt"]),
    ({"prompt": "abc", "model": "gpt-4"}, 404, ["gpt-4"]),
])
def test_bad_completion_requests(server, body, status, words):
    response = httpx.post(server + "/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert all(w in error["message"] for w in words), error


def test_malformed_json_and_refused_conversations(server):
    bad = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    system = httpx.post(server + "/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
    assert system.status_code == 400 and "System role not supported" in system.json()["error"]["message"]
    wrong = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "messages[0].content"
    huge = httpx.post(server + "/v1/completions", content=b"x" * (9 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413


def test_api_key_queue_limit_and_shutdown_while_streaming(model_dir):
    # the second request waits only while the first runs: 16,000 tokens (about 14 s here; the test
    # stops the server long before) leave a wide window to see it waiting, where 4,000 (3.4 s)
    # were once missed under a loaded machine
    proc, url = start_server(model_dir, "--parallel", "1", "--max-queue", "1", "--ctx-size", "16384",
                             "--api-key", "sekret")
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        auth = {"authorization": "Bearer sekret"}
        long = {"prompt": "go", "max_tokens": 16000, "temperature": 0, "stream": True, "ignore_eos": True}
        streams, seen = [], []

        def hold(i):
            with httpx.stream("POST", url + "/v1/completions", json=long, headers=auth, timeout=60) as response:
                for line in response.iter_lines():
                    seen.append((i, line))

        for i in range(2):  # one in the slot, one waiting
            streams.append(threading.Thread(target=hold, args=(i,)))
            streams[-1].start()
        deadline = time.monotonic() + 20
        while metric_with(url, auth, "swattn_requests_waiting") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        full = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}, headers=auth)
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        proc.send_signal(signal.SIGTERM)  # shutdown with requests running
        assert proc.wait(timeout=20) == 0
        for t in streams:
            t.join(timeout=20)
            assert not t.is_alive()
    finally:
        stop_server(proc)


def metric_with(url, headers, name):
    text = httpx.get(url + "/metrics", headers=headers).text
    return float(re.search(rf"^{name} ([0-9.e+]+)$", text, re.M).group(1))


def test_serve_refuses_bad_options_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "swattn.cli", "serve", "--model", str(tmp_path), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "config.json" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "swattn.cli", "serve", "--parallel", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--parallel" in proc.stderr


def test_health_says_503_until_the_model_is_loaded():
    from fastapi.testclient import TestClient

    from swattn.serve.api import ServerState, create_app

    state = ServerState(model_name="m")
    client = TestClient(create_app(state))
    assert client.get("/health").status_code == 503
    busy = client.post("/v1/completions", json={"prompt": "x"})
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "loading"
    state.load_error = "could not load the model: no config.json"
    assert client.get("/health").json()["error"] == state.load_error


def test_quantized_weights_and_int8_caches_serve_what_generate_gives(model_dir):
    """--weights q8 --kv-dtype int8: the server's reply equals generate() on the same quantized model."""
    proc, url = start_server(model_dir, "--parallel", "2", "--ctx-size", "256", "--weights", "q8", "--kv-dtype", "int8")
    try:
        model = load(model_dir, dtype="float32", weights="q8", kv_dtype="int8")
        ids = model.tokenizer.encode("abc abc").ids
        tokens = generate(model, [ids], max_new_tokens=10, stop_tokens=model.stop_tokens).tokens[0]
        want = model.tokenizer.decode([t for t in tokens if t not in model.stop_tokens])
        got = httpx.post(url + "/v1/completions", json={"prompt": "abc abc", "max_tokens": 10, "temperature": 0},
                         timeout=60).json()
        assert got["choices"][0]["text"] == want
    finally:
        stop_server(proc)


def test_prefill_flops_add_up_and_count_what_each_query_sees():
    from swattn.profiling import prefill_flops

    cfg = load().cfg  # the built-in model: local layers of window 256 and global ones
    assert prefill_flops(cfg, 0, 300) + prefill_flops(cfg, 300, 700) == pytest.approx(prefill_flops(cfg, 0, 700))
    one = prefill_flops(cfg, 1000, 1001) - prefill_flops(cfg, 10, 11)  # the same token, further along
    seen = sum((1001 if w is None else min(w, 1001)) - (11 if w is None else min(w, 11)) for w in cfg.windows)
    assert one == pytest.approx(4 * cfg.num_heads * cfg.head_dim * seen)


def _engine_with_a_stream(model_dir, prompt_chunk=64):
    from swattn.generate import Sampling
    from swattn.serve.engine import Engine, Request

    engine = Engine(load(model_dir, dtype="float32"), parallel=3, ctx_size=512, prefill_chunk=prompt_chunk,
                    prefix_cache_bytes=0)
    make = lambda n: Request(prompt=list(range(3, 3 + n)), max_tokens=200, sampling=Sampling(),  # noqa: E731
                             on_event=lambda kind, data: None, ignore_eos=True)
    stream = make(10)
    engine.submit(stream)
    for _ in range(3):
        engine.step()  # prefilled, then decoding: the engine has measured both kinds of step
    assert engine.slots[0].decoding and engine._flop_s is not None and engine._decode_s
    return engine, make


def test_long_prompts_are_chunked_to_keep_the_streams_pace_and_short_ones_go_whole(model_dir):
    from swattn.profiling import prefill_flops
    from swattn.serve.engine import MIN_CHUNK

    engine, make = _engine_with_a_stream(model_dir)
    # a slow prefill estimate: a long prompt gets MIN_CHUNK tokens per step beside the stream
    engine._flop_s = 1.0
    long, short = make(300), make(60)
    engine.submit(long)
    engine.step()
    assert engine.slots[1].prefilled == MIN_CHUNK
    engine.submit(short)  # fits in one chunk: prefilled in one step, though it slows that step
    engine.step()
    assert engine.slots[2].prefilled == 60 and engine.slots[1].prefilled == MIN_CHUNK
    # a fast one: as many tokens as fit in (itl_factor - 1) decode steps' time, fewer deeper in
    rows = 2
    engine._flop_s = engine._prefill_seconds(rows) / prefill_flops(engine.model.cfg, 0, 40) / 1.0001
    near = engine._fit(0, 64, engine._prefill_seconds(rows), least=0)
    far = engine._fit(400, 464, engine._prefill_seconds(rows), least=0)
    assert near == 40 and 400 < far < 440
    assert engine._fit(400, 464, -1.0, least=MIN_CHUNK) == 400 + MIN_CHUNK


def test_snapshot_boundaries_double(model_dir):
    from swattn.serve.engine import Engine

    engine = Engine(load(model_dir, dtype="float32"), parallel=1, ctx_size=512, snapshot_every=32,
                    prefix_cache_bytes=0)
    assert [engine._next_snapshot(p) for p in (0, 31, 32, 63, 64, 127, 128, 300)] == [32, 32, 64, 64, 128, 128, 256,
                                                                                      512]
