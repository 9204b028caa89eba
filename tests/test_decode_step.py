"""The decode step as a function of tensors: custom operators, device-resident metadata,
torch.compile (fullgraph), padded batch buckets and CUDA graphs.

References: the model's own dense forward (sdpa, float32) and the runner's eager paged
forward. Tolerance 1e-4 on logits of order 1, as in test_runner.py (a wrong key, slot or
position moves logits by > 1e-2). Compiled steps use ``backend="aot_eager"`` (the whole
graph is traced, so a graph break or a host sync fails the test, without inductor's C++
build time).
"""

from __future__ import annotations

import random

import pytest
import torch
from test_runner import tiny_model

from powerfast.runtime import attention
from powerfast.runtime.runner import BATCH_BUCKETS, PAD_ROW, ModelRunner, batch_bucket
from powerfast.samplers.decoding import SeedStream, sample_continuations, sample_step

ATOL = RTOL = 1e-4


def dense_next_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    runner.restore_attention()
    try:
        with torch.no_grad():
            return runner.model(torch.tensor([ids])).logits[0, -1]
    finally:
        runner._attach()


def assert_rows_match_host(runner: ModelRunner, seqs) -> None:
    """The device metadata row of every live sequence equals its host table and length."""
    for seq in seqs:
        row = runner._rows[seq.seq_id]
        assert int(runner._seq_lens[row]) == seq.length, seq
        width = len(seq.page_table)
        assert runner._page_tables[row, :width].tolist() == seq.page_table, seq


# --------------------------------------------------------------------- custom operators


@pytest.mark.slow
def test_attention_and_kv_write_are_custom_operators():
    attention.register()
    for name in ("write_kv", "paged_attention", "sample_tokens"):
        assert hasattr(torch.ops.powerfast, name), name
    # the fake (meta) implementations agree with the real ones (shapes, dtypes, mutations)
    torch.manual_seed(0)
    num_pages, page_size, kv_heads, heads, dim = 6, 4, 2, 4, 8
    key_cache = torch.randn(num_pages, page_size, kv_heads, dim)
    value_cache = torch.randn(num_pages, page_size, kv_heads, dim)
    key, value = torch.randn(3, kv_heads, dim), torch.randn(3, kv_heads, dim)
    slots = torch.tensor([5, -1, 9])
    torch.library.opcheck(torch.ops.powerfast.write_kv, (key_cache, value_cache, key, value, slots, False))
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    seq_lens = torch.tensor([9, 7], dtype=torch.int32)
    args = (torch.randn(2, heads, dim), key_cache, value_cache, tables, seq_lens,
            torch.tensor([0, 9, 16], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32),
            torch.tensor([0, 1]), torch.tensor([8, 6]), 0.3, 1, 9, 0, "torch")
    torch.library.opcheck(torch.ops.powerfast.paged_attention, args + (0.0,))
    torch.library.opcheck(torch.ops.powerfast.paged_attention, args + (5.0,))  # soft-capped (Gemma 2)
    torch.library.opcheck(torch.ops.powerfast.paged_attention, args + (0.0, 4))  # a sliding window of 4
    logits = torch.randn(3, 11)
    torch.library.opcheck(
        torch.ops.powerfast.sample_tokens,
        (logits, torch.arange(3), torch.ones(3, dtype=torch.bool), torch.zeros(3), 0.7, 2),
    )


def test_write_kv_skips_slot_minus_one():
    attention.register()
    key_cache = torch.zeros(2, 4, 1, 3)
    value_cache = torch.zeros(2, 4, 1, 3)
    key = torch.randn(3, 1, 3)
    torch.ops.powerfast.write_kv(key_cache, value_cache, key, key * 2, torch.tensor([6, -1, 1]), False)
    flat = key_cache.view(8, 1, 3)
    torch.testing.assert_close(flat[6], key[0], rtol=0, atol=0)
    torch.testing.assert_close(flat[1], key[2], rtol=0, atol=0)
    assert int((flat.abs().sum(dim=(1, 2)) > 0).sum()) == 2  # nothing else written
    torch.testing.assert_close(value_cache.view(8, 1, 3)[6], 2 * key[0], rtol=0, atol=0)


def test_the_model_builds_no_mask(monkeypatch):
    """Under the paged implementation transformers hands the attention function no mask and
    runs no data-dependent mask preparation (its packed-sequence detection syncs with the device)."""
    import transformers.masking_utils as masking_utils

    detections = []
    original = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: detections.append(1) or original(p))
    masks = []
    original_forward = attention.paged_attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        masks.append(attention_mask)
        return original_forward(module, query, key, value, attention_mask, *args, **kwargs)

    from transformers import AttentionInterface

    runner = ModelRunner(tiny_model("llama"), num_pages=16, backend="torch")
    monkeypatch.setitem(AttentionInterface._global_mapping, attention.ATTENTION_NAME, spy)
    seqs, _ = runner.prefill([[1, 2, 3, 4], [5, 6]])
    runner.decode(seqs, [7, 8])
    runner.free(seqs)
    assert masks and all(mask is None for mask in masks), masks
    assert detections == []


# ------------------------------------------------------------------ device-resident metadata


def test_no_upload_in_a_decode_step_without_page_boundary():
    runner = ModelRunner(tiny_model("llama"), page_size=8, num_pages=64, backend="torch")
    prompt = [random.randrange(1, 300) for _ in range(10)]  # 10 positions: page boundary at 16
    seqs, logits = runner.prefill([prompt])
    children = runner.fork(seqs[0], 3)
    tokens = torch.tensor([4, 5, 6])
    runner.decode(children, tokens)  # first step: copy-on-write of the shared last page, batch rows
    steps = []
    for _ in range(8):  # positions 11..18: the step writing position 16 starts a new page
        before = runner.upload_bytes
        runner.decode(children, tokens)
        steps.append(runner.upload_bytes - before)
    boundary = [i for i, n in enumerate(steps) if n]
    assert boundary == [5], steps  # length 16 -> the token at position 16 needs a page
    assert steps[5] == 3 * 3 * 8  # one (row, col, page id) int64 triple per sequence
    assert_rows_match_host(runner, seqs + children)
    runner.free(children + seqs)
    assert runner.cache.pages_in_use == 0


@pytest.mark.parametrize("bucketing", [False, True])
def test_device_rows_follow_the_host_tables(bucketing):
    """Random forks, decodes (a run of steps of one sequence, or one step of a batch) and frees:
    every live row equals its host table, and the decode logits equal the dense forward."""
    rng = random.Random(1234)
    runner = ModelRunner(tiny_model("qwen2"), page_size=4, num_pages=200, backend="torch", cuda_graphs=bucketing)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randrange(1, 9))] for _ in range(3)]
    seqs, _ = runner.prefill(prompts)
    ids = {seq.seq_id: list(p) for seq, p in zip(seqs, prompts)}
    live = list(seqs)
    for _ in range(12):
        action = rng.random()
        if action < 0.3 and len(live) < 40:
            parent = rng.choice(live)
            length = rng.randrange(1, parent.length + 1)
            kids = runner.fork(parent, rng.randrange(1, 4), length)
            for kid in kids:
                ids[kid.seq_id] = ids[parent.seq_id][:length]
            live.extend(kids)
        elif action < 0.4 and len(live) > 2:
            gone = live.pop(rng.randrange(len(live)))
            runner.free([gone])
        elif action < 0.5:
            seq = rng.choice(live)
            new = [rng.randrange(1, 300) for _ in range(rng.randrange(1, 6))]
            for token in new:
                runner.decode([seq], [token])
            ids[seq.seq_id] += new
        else:
            batch = rng.sample(live, rng.randrange(1, len(live) + 1))
            tokens = [rng.randrange(1, 300) for _ in batch]
            logits = runner.decode(batch, tokens)
            for seq, token in zip(batch, tokens):
                ids[seq.seq_id].append(token)
            check = rng.randrange(len(batch))
            torch.testing.assert_close(
                logits[check], dense_next_logits(runner, ids[batch[check].seq_id]), atol=ATOL, rtol=RTOL
            )
        assert_rows_match_host(runner, live)
    runner.free(live)
    assert runner.cache.pages_in_use == 0


# ------------------------------------------------------------------ padded batch buckets


def test_batch_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 33, 49, 512)] == [1, 2, 4, 8, 48, 64, 512]
    assert batch_bucket(513) is None
    assert list(BATCH_BUCKETS) == sorted(BATCH_BUCKETS)


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: the kernels under the interpreter
@pytest.mark.slow
def test_padded_buckets_give_the_unpadded_logits_and_tokens_and_write_no_real_kv(backend):
    torch.manual_seed(0)
    model = tiny_model("llama")
    results = {}
    for bucketing in (False, True):
        runner = ModelRunner(model, page_size=8, num_pages=64, backend=backend, cuda_graphs=bucketing)
        prompt = list(range(3, 23))
        seqs, logits = runner.prefill([prompt])
        children = runner.fork(seqs[0], 3)  # 3 rows: padded to 4
        out = sample_continuations(runner, children, logits.expand(3, -1), 6, SeedStream(7), want_last_logits=True)
        # one more decode: snapshot the pools around it, only the real rows' slots may change
        keys_before = [k.clone() for k in runner.cache.key_caches]
        values_before = [v.clone() for v in runner.cache.value_caches]
        last = runner.decode(children, out.tokens[:, -1])
        slots = {seq.page_table[(seq.length - 1) // 8] * 8 + (seq.length - 1) % 8 for seq in children}
        for before, after in zip(keys_before + values_before, runner.cache.key_caches + runner.cache.value_caches):
            changed = (before != after).flatten(2).any(-1).flatten().nonzero().flatten().tolist()
            assert set(changed) == slots, (changed, slots)
        if bucketing:
            assert runner._batch_rows(children, 4).tolist()[3] == PAD_ROW
            assert int(runner._seq_lens[PAD_ROW]) == 0
        results[bucketing] = (out, last)
        runner.free(children + seqs)
        assert runner.cache.pages_in_use == 0
    (plain, plain_last), (padded, padded_last) = results[False], results[True]
    assert torch.equal(plain.tokens, padded.tokens)
    torch.testing.assert_close(plain.base_logliks, padded.base_logliks, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(plain.last_logits, padded.last_logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(plain_last, padded_last, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_decode_forward_equals_eager_and_dense(family):
    torch._dynamo.reset()
    model = tiny_model(family)
    eager = ModelRunner(model, page_size=8, num_pages=64, backend="torch")
    compiled = ModelRunner(model, page_size=8, num_pages=64, backend="torch", compile="aot_eager", cuda_graphs=True)
    prompt = list(range(5, 17))
    outputs = {}
    for name, runner in (("eager", eager), ("compiled", compiled)):
        seqs, _ = runner.prefill([prompt])
        kids = runner.fork(seqs[0], 3)
        steps = []
        for step in range(5):  # crosses the page boundary at 16
            steps.append(runner.decode(kids, [10 + step, 20 + step, 30 + step]))
        outputs[name] = steps
        runner.free(kids + seqs)
    for step in range(5):
        torch.testing.assert_close(outputs["compiled"][step], outputs["eager"][step], atol=ATOL, rtol=RTOL)
    for row, base in enumerate((10, 20, 30)):
        ids = prompt + [base + step for step in range(5)]
        torch.testing.assert_close(outputs["compiled"][4][row], dense_next_logits(eager, ids), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_compiled_decode_with_sliding_windows_equals_dense():
    """Windowed layers (a per-layer constant passed to the custom op) compile in one graph,
    and the padded, bucketed step sees the window past its width."""
    from test_architectures import tiny_windowed_gemma3

    torch._dynamo.reset()
    model = tiny_windowed_gemma3(0, window=4)
    compiled = ModelRunner(model, page_size=8, num_pages=64, backend="torch", compile="aot_eager", cuda_graphs=True)
    prompt = list(range(5, 17))
    seqs, _ = compiled.prefill([prompt])
    kids = compiled.fork(seqs[0], 3)
    steps = [compiled.decode(kids, [10 + step, 20 + step, 30 + step]) for step in range(6)]
    assert compiled._decode_fn is not compiled._decode_core  # still compiled: no failure fell back to eager
    compiled.free(kids + seqs)
    for row, base in enumerate((10, 20, 30)):
        ids = prompt + [base + step for step in range(6)]
        torch.testing.assert_close(steps[-1][row], dense_next_logits(compiled, ids), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_a_whole_sampler_step_compiles_fullgraph():
    """sample (fused op) -> accumulate -> forward -> next logits, as one graph: no host sync inside."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    runner = ModelRunner(model, page_size=8, num_pages=64, backend="torch")
    eager_runner = ModelRunner(model, page_size=8, num_pages=64, backend="torch")

    def step(runner, logits, seed, counter, active, logliks, rows, max_seq_len: int):
        out = sample_step(logits, seed, counter, active, logliks, 0.8, 3)
        return out.tokens, runner._decode_core(out.tokens, rows, max_seq_len)

    compiled_step = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    state = {}
    for name, r, fn in (("compiled", runner, compiled_step), ("eager", eager_runner, step)):
        seqs, logits = r.prefill([list(range(1, 12))])
        kids = r.fork(seqs[0], 2)
        logits = logits.expand(2, -1).contiguous()
        seed, counter = torch.tensor(1234), torch.tensor(0)
        active, logliks = torch.ones(2, dtype=torch.bool), torch.zeros(2)
        tokens_seen = []
        with torch.inference_mode():
            for _ in range(3):
                batch = r.prepare_decode(kids)
                tokens, logits = fn(r, logits, seed, counter, active, logliks, batch.rows, 256)
                tokens_seen.append(tokens.clone())
        state[name] = (torch.stack(tokens_seen), logits, logliks, int(counter))
        r.free(kids + seqs)
    assert torch.equal(state["compiled"][0], state["eager"][0])
    torch.testing.assert_close(state["compiled"][1], state["eager"][1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state["compiled"][2], state["eager"][2], atol=ATOL, rtol=RTOL)
    assert state["compiled"][3] == state["eager"][3] == 3


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.cuda
def test_cuda_graph_decode_equals_eager_on_cuda():
    """CPU twin: test_padded_buckets_give_the_unpadded_logits_and_tokens_and_write_no_real_kv."""
    model = tiny_model("llama").cuda()
    results = {}
    for graphs in (False, True):
        runner = ModelRunner(model, page_size=16, num_pages=64, cuda_graphs=graphs)
        seqs, logits = runner.prefill([list(range(3, 40))])
        kids = runner.fork(seqs[0], 3)
        out = sample_continuations(runner, kids, logits.expand(3, -1), 20, SeedStream(3), want_last_logits=True)
        if graphs:
            assert runner._graphs, "no graph was captured"
        results[graphs] = out
        runner.free(kids + seqs)
        assert runner.cache.pages_in_use == 0
    assert torch.equal(results[False].tokens, results[True].tokens)
    torch.testing.assert_close(results[False].last_logits, results[True].last_logits, atol=ATOL, rtol=RTOL)


def test_forward_counts_in_stats():
    from powerfast.samplers.ancestral import AncestralSampler

    sampler = AncestralSampler(tiny_model("llama"), seed=0, page_size=8, num_pages=64, backend="torch")
    [result] = sampler.generate([[1, 2, 3]], max_new_tokens=5, ignore_eos=True)
    # prefill + 4 decode steps (the 5th token needs no forward), one row each
    assert result.stats.num_forwards == 5
    assert result.stats.mean_batch_size == 1.0
    assert result.stats.to_dict()["num_forwards"] == 5


def test_metadata_rows_grow_past_their_initial_count():
    from powerfast.runtime.runner import _INITIAL_ROWS

    runner = ModelRunner(tiny_model("llama"), page_size=8, num_pages=2 * _INITIAL_ROWS + 64, backend="torch")
    prompt = list(range(1, 12))
    seqs, _ = runner.prefill([prompt])
    children = runner.fork(seqs[0], _INITIAL_ROWS + 5)  # past the rows allocated up front
    assert runner._page_tables.shape[0] > _INITIAL_ROWS
    tokens = [(7 * i) % 300 + 1 for i in range(len(children))]
    logits = runner.decode(children, tokens)
    for row in (0, len(children) - 1):
        torch.testing.assert_close(logits[row], dense_next_logits(runner, prompt + [tokens[row]]), atol=ATOL, rtol=RTOL)
    assert_rows_match_host(runner, seqs + children)
    runner.free(children + seqs)
    assert runner.cache.pages_in_use == 0


def test_metadata_grown_in_a_forward_can_be_forked_outside_inference_mode():
    """Rows grown inside a forward (inference mode) stay normal tensors: a later fork,
    outside inference mode, updates them in place."""
    from powerfast.runtime.runner import _INITIAL_ROWS

    runner = ModelRunner(tiny_model("llama"), page_size=8, num_pages=_INITIAL_ROWS + 64, backend="torch")
    seqs, _ = runner.prefill([[1 + i % 7] for i in range(_INITIAL_ROWS + 2)])  # grows the rows in a forward
    assert not runner._page_tables.is_inference()
    children = runner.fork(seqs[-1], 2, length=1)
    assert_rows_match_host(runner, seqs + children)
    runner.free(children + seqs)


def test_a_failed_capture_warns_once_and_decodes_eagerly():
    """Capture cannot work on the CPU: forcing it exercises the fallback (one warning, then
    eager steps with the same logits as a runner that never tried)."""
    import warnings

    model = tiny_model("llama")
    plain = ModelRunner(model, page_size=8, num_pages=64, backend="torch", cuda_graphs=True)
    forced = ModelRunner(model, page_size=8, num_pages=64, backend="torch", cuda_graphs=True)
    forced._capture = True  # as on CUDA
    outputs = {}
    for name, runner in (("plain", plain), ("forced", forced)):
        seqs, _ = runner.prefill([list(range(2, 14))])
        kids = runner.fork(seqs[0], 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            steps = [runner.decode(kids, [5 + step, 6, 7]) for step in range(3)]
        outputs[name] = (steps, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
        runner.free(kids + seqs)
        assert runner.cache.pages_in_use == 0
    assert outputs["plain"][1] == []
    [message] = outputs["forced"][1]
    assert "capture" in message and "eagerly" in message
    assert forced._capture is False and not forced._graphs
    for got, want in zip(outputs["forced"][0], outputs["plain"][0]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_a_failed_compilation_warns_once_and_decodes_eagerly():
    import warnings

    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("this backend compiles nothing")

    torch._dynamo.reset()
    model = tiny_model("llama")
    plain = ModelRunner(model, page_size=8, num_pages=64, backend="torch")
    broken = ModelRunner(model, page_size=8, num_pages=64, backend="torch", compile="aot_eager")
    broken._decode_fn = torch.compile(broken._decode_core, fullgraph=True, backend=failing_backend)
    outputs = {}
    for name, runner in (("plain", plain), ("broken", broken)):
        seqs, _ = runner.prefill([list(range(2, 14))])
        kids = runner.fork(seqs[0], 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            steps = [runner.decode(kids, [5 + step, 6]) for step in range(2)]
        outputs[name] = (steps, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
        assert_rows_match_host(runner, seqs + kids)
        runner.free(kids + seqs)
    [message] = outputs["broken"][1]
    assert "compile" in message and "without compile" in message
    for got, want in zip(outputs["broken"][0], outputs["plain"][0]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
