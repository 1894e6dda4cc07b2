"""Sequence-parallel attention across 2, 3 and 4 CPU processes (gloo on loopback) against one process."""

import datetime
import io
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import swattn
from swattn import distributed as sd

TIMEOUT = datetime.timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, case, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    try:  # tensors travel as bytes: a queued tensor's shared memory would vanish with this process
        buf = io.BytesIO()
        torch.save(case["fn"](rank, world, case), buf)
        results.put((rank, buf.getvalue()))
    except Exception:  # noqa: BLE001 - the parent asserts on it
        results.put((rank, RuntimeError(traceback.format_exc())))
    finally:
        dist.destroy_process_group()


def run_ranks(world, fn, **case):
    """Runs ``fn(rank, world, case)`` in ``world`` processes; gives their results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    case["fn"] = fn
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, case, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(timeout=30)
    return [out[r] if isinstance(out[r], Exception) else torch.load(io.BytesIO(out[r]), weights_only=True)
            for r in range(world)]


def _inputs(case, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    n = sum(case["lengths"])
    b, h, hkv, d = case.get("batch", 1), case["heads"], case["heads_kv"], case.get("head_dim", 16)
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, hkv, n, d, generator=gen)
    v = torch.randn(b, hkv, n, d, generator=gen)
    dout = torch.randn(b, h, n, d, generator=gen)
    return q, k, v, dout


def _slice_grads(rank, world, case):
    q, k, v, dout = (t.float() for t in _inputs(case))
    start = sum(case["lengths"][:rank])
    sl = slice(start, start + case["lengths"][rank])
    q, k, v = (t[:, :, sl].clone().requires_grad_() for t in (q, k, v))
    out = sd.sliding_window_attention(q, k, v, case["window"], softcap=case.get("softcap"))
    out.backward(dout[:, :, sl])
    return out.detach(), q.grad, k.grad, v.grad


CASES = {
    "window shorter than a slice": dict(lengths=[40, 40, 40], window=9),
    "window longer than a slice": dict(lengths=[10, 7, 12, 9], window=25),
    "window the whole sequence": dict(lengths=[13, 13], window=26),
    "global": dict(lengths=[11, 17, 5, 9], window=None),
    "uneven, GQA, soft-cap": dict(lengths=[30, 3, 21], window=12, heads=6, heads_kv=2, softcap=5.0, batch=2),
    "MQA, an empty rank": dict(lengths=[20, 0, 19], window=8, heads=4, heads_kv=1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_equal_one_process(name):
    case = {"heads": 4, "heads_kv": 2, **CASES[name]}
    world = len(case["lengths"])
    got = run_ranks(world, _slice_grads, **case)
    for r in got:
        assert not isinstance(r, Exception), r
    q, k, v, dout = (t.float() for t in _inputs(case))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    ref = swattn.sliding_window_attention(q, k, v, case["window"], softcap=case.get("softcap"))
    ref.backward(dout)
    for name_t, want, parts in zip(("out", "dq", "dk", "dv"), (ref, q.grad, k.grad, v.grad), zip(*got)):
        joined = torch.cat(parts, dim=2)
        err = ((joined - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, f"{name_t}: relative error {err:.2e}"


def _mismatched(rank, world, case):
    q, k, v, _ = (t.float() for t in _inputs(dict(lengths=[8], heads=4, heads_kv=2)))
    window = 4 if rank == 0 else 5
    try:
        sd.sliding_window_attention(q, k, v, window)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_ranks_that_disagree_get_the_same_clear_error():
    msgs = run_ranks(2, _mismatched)
    assert msgs[0] == msgs[1] and "ranks disagree on window: rank 0 has 4, rank 1 has 5" in msgs[0]


def test_no_process_group_is_a_clear_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sd.sliding_window_attention(q, q, q, 2)


def test_traffic_of_a_local_layer_does_not_grow_with_the_sequence():
    sizes = sd.TokenBytes.of(8, 4, 128, 2)
    for n in (65536, 262144, 1 << 20):
        lengths = [n // 4] * 4
        halo = max(sd.traffic(lengths, 4096, r, sizes)[0] for r in range(4))
        assert halo == 4095 * sizes.kv
        assert halo * 10 <= sd.ring_attention_bytes(lengths, sizes) or n < 262144


def _count_bytes(rank, world, case):
    q, k, v, dout = (t.float() for t in _inputs(case))
    start = sum(case["lengths"][:rank])
    sl = slice(start, start + case["lengths"][rank])
    q, k, v = (t[:, :, sl].clone().requires_grad_() for t in (q, k, v))
    sd.bytes_sent(reset=True)
    out = sd.sliding_window_attention(q, k, v, case["window"])
    fwd = sd.bytes_sent(reset=True)
    out.backward(dout[:, :, sl])
    return fwd, sd.bytes_sent()


@pytest.mark.parametrize("window", [6, None])
def test_bytes_sent_are_the_planned_ones(window):
    case = dict(lengths=[9, 4, 12, 7], window=window, heads=4, heads_kv=2)
    got = run_ranks(4, _count_bytes, **case)
    sizes = sd.TokenBytes.of(4, 2, 16, 4)
    assert [tuple(g) for g in got] == [sd.traffic(case["lengths"], window, r, sizes) for r in range(4)]


def _model_step(rank, world, case):
    from swattn.models.transformer import CausalLM
    from swattn.training.presets import PRESETS, gemma2_model_config

    torch.manual_seed(0)
    model = CausalLM(gemma2_model_config(PRESETS["tiny"], 16, {"pad": 0, "eos": 1, "bos": 2}))
    for p in model.parameters():  # randomise the norms too, or they prove little
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 512, (1, sum(case["lengths"]) + 1), generator=torch.Generator().manual_seed(1))
    start = sum(case["lengths"][:rank])
    end = start + case["lengths"][rank]
    with sd.sequence_parallel(model):
        logits = model(ids[:, start:end], pos=torch.arange(start, end)[None])
    loss = torch.nn.functional.cross_entropy(logits[0], ids[0, start + 1 : end + 1], reduction="sum")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    return logits.detach(), grads


def test_model_forward_and_training_step_equal_one_process():
    from swattn.models.transformer import CausalLM
    from swattn.training.presets import PRESETS, gemma2_model_config

    lengths = [23, 30, 17]
    got = run_ranks(3, _model_step, lengths=lengths)
    for r in got:
        assert not isinstance(r, Exception), r
    torch.manual_seed(0)
    model = CausalLM(gemma2_model_config(PRESETS["tiny"], 16, {"pad": 0, "eos": 1, "bos": 2}))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 512, (1, sum(lengths) + 1), generator=torch.Generator().manual_seed(1))
    logits = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum").backward()
    joined = torch.cat([g[0] for g in got], dim=1)
    assert ((joined - logits.detach()).abs().max() / logits.abs().max()).item() < 1e-5
    for name, p in model.named_parameters():
        err = ((got[0][1][name] - p.grad).abs().max() / p.grad.abs().max()).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("world,busiest", [(2, 1), (3, 1), (4, 2), (8, 4)])
def test_global_layers_spread_the_block_pairs_over_the_ranks(world, busiest):
    layout = sd.Layout(0, (100,) * world)
    work = [0] * world
    for i in range(world):
        for j in range(i):
            work[layout.computed_by(i, j)] += 1
    assert sum(work) == world * (world - 1) // 2 and max(work) == busiest  # without the balance: world - 1


def _torchrun(*args, procs=2):
    import subprocess
    import sys

    # --standalone: a rendezvous on this machine at a port torchrun picks itself (no race for a free port)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           "-m", "swattn.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_perplexity_under_torchrun_equals_one_process(tiny_trained, corpus_dir):
    import subprocess
    import sys

    model, _ = tiny_trained
    args = ["perplexity", "--model", str(model), "--file", str(corpus_dir / "decoder.py"), "--context", "300",
            "--kl-base", "float32"]
    one = subprocess.run([sys.executable, "-m", "swattn.cli", *args], capture_output=True, text=True, timeout=120)
    two = _torchrun(*args, procs=3)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    row_one, row_two = one.stdout.splitlines()[1].split(), two.stdout.splitlines()[1].split()
    assert "split across 3 ranks" in two.stderr
    assert row_one[:2] == row_two[:2] and row_one[-1] == row_two[-1]  # window, tokens, top-1 agreement
    assert abs(float(row_one[2]) - float(row_two[2])) < 2e-4  # the loss


def test_train_under_torchrun_follows_the_single_process_run(corpus_dir, tmp_path):
    import csv
    import subprocess
    import sys

    args = ["train", "--data", str(corpus_dir), "--preset", "tiny", "--steps", "4", "--eval-every", "2",
            "--precision", "fp32", "--save-dtype", "float32"]
    one = subprocess.run([sys.executable, "-m", "swattn.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=120)
    two = _torchrun(*args, "--out", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    rows = [list(csv.DictReader(open(tmp_path / name / "loss.csv"))) for name in ("one", "two")]
    for a, b in zip(*rows):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) < 1e-3


def _out_of_order(rank, world, case):
    from swattn.models.transformer import CausalLM
    from swattn.training.presets import PRESETS, gemma2_model_config

    model = CausalLM(gemma2_model_config(PRESETS["tiny"], 16, {"pad": 0, "eos": 1, "bos": 2}))
    ids = torch.zeros(1, 10, dtype=torch.int64)
    start = 10 * (world - 1 - rank)  # rank 0 holds the last slice: the wrong order
    msgs = []
    for pos in (torch.arange(start, start + 10)[None], None):
        try:
            with sd.sequence_parallel(model):
                model(ids, pos=pos)
            msgs.append("no error")
        except ValueError as exc:
            msgs.append(str(exc))
    return msgs


def test_slices_out_of_order_or_without_positions_are_errors():
    got = run_ranks(2, _out_of_order)
    assert got[0] == got[1]
    assert "do not follow each other in rank order: they start at positions [10, 0]" in got[0][0]
    assert "global positions" in got[0][1]
