"""Prefix caching: the radix tree over KV blocks, the scheduler around it (with a fake runner that
checks every step reads the keys and values of its own tokens), and the engine's greedy tokens with
and without the cache, at tp=1 and tp=2."""
import random

import pytest

import ptp
from helpers import make_checkpoint
from ptp.kv_cache import BlockAllocator, slot
from ptp.prefix_cache import PrefixCache, check_blocks
from ptp.sampling import SamplingParams
from ptp.scheduler import Scheduler, Sequence, Status

GREEDY = ptp.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


# --- the tree alone ------------------------------------------------------------------------------
def _cached_chain(alloc, cache, tokens):
    """A sequence that computed `tokens` (whole blocks) and finished: its blocks left in the tree."""
    table = []
    alloc.grow(table, len(tokens))
    node = cache.insert(cache.root, tokens, table)
    blocks = list(table)
    alloc.release(table)
    return node, blocks


def test_match_takes_whole_blocks_up_to_the_limit():
    alloc = BlockAllocator(16, 4)
    cache = PrefixCache(alloc)
    _, blocks = _cached_chain(alloc, cache, list(range(1, 13)))
    assert [n.block for n in cache.match(list(range(1, 13)), 3)] == blocks
    assert [n.block for n in cache.match(list(range(1, 13)), 2)] == blocks[:2]  # the limit
    assert [n.block for n in cache.match([1, 2, 3, 4, 5, 6, 0, 8, 9], 5)] == blocks[:1]  # diverges mid-block
    assert cache.match([9, 2, 3, 4], 1) == []
    assert alloc.num_free == 16 and len(alloc.free) == 13 and cache.num_evictable == 3
    check_blocks(alloc, cache, [])


def test_eviction_takes_least_recently_used_leaves_first():
    alloc = BlockAllocator(6, 2)
    cache = PrefixCache(alloc)
    _, a = _cached_chain(alloc, cache, [1, 1, 2, 2, 3, 3])  # blocks a0 <- a1 <- a2
    _, b = _cached_chain(alloc, cache, [1, 1, 5, 5])  # its first block's copy gives way to a0: only b1 is new
    assert b[0] == a[0] and b[1] not in a and alloc.num_free == 6 and len(alloc.free) == 2
    seq = []
    hit = cache.match([1, 1, 2, 2, 3, 3, 4], 3)  # the longer chain is used again: b1 is now the oldest leaf
    cache.acquire(hit, seq)
    assert seq == a and cache.num_evictable == 1
    table = []
    alloc.grow(table, 6)  # 2 free blocks + the one evicted
    assert cache.match([1, 1, 5, 5], 2) == cache.match([1, 1], 1)  # b1 went, a0 (held) stayed
    assert alloc.num_free == 0
    check_blocks(alloc, cache, [_Holder(seq, hit[-1], [1, 1, 2, 2, 3, 3]), _Holder(table, None, [])])
    alloc.release(seq)
    alloc.release(table)
    table = []
    alloc.grow(table, 12)  # everything: the tree gives its chain up leaf first
    assert not cache.nodes and cache.num_evictable == 0 and sorted(table) == list(range(6))
    alloc.release(table)
    check_blocks(alloc, cache, [])


class _Holder:
    """The fields check_blocks reads from a sequence."""
    _ids = iter(range(10**6))

    def __init__(self, table, node, tokens):
        self.block_table, self.cache_node, self.all_ids = table, node, tokens
        self.num_computed, self.seq_id = len(tokens), next(self._ids)


def test_check_blocks_names_what_is_wrong():
    alloc = BlockAllocator(8, 2)
    cache = PrefixCache(alloc)
    _cached_chain(alloc, cache, [1, 2, 3, 4])
    alloc.free.append(alloc.free[0])
    with pytest.raises(AssertionError, match="twice"):
        check_blocks(alloc, cache, [])
    alloc.free.pop()
    alloc.refs[next(iter(cache.nodes))] += 1
    with pytest.raises(AssertionError, match="refs differ"):
        check_blocks(alloc, cache, [])


# --- the scheduler with a fake runner ------------------------------------------------------------
def _kv_of(ids, p):
    return hash(tuple(ids[: p + 1]))  # what the K/V at position p depends on: the tokens up to it


def _run_fake_step(seqs, batch, kv, block_size):
    """Write each row's 'keys and values' and check that it reads those of its own tokens."""
    for seq, toks, start, table in zip(seqs, batch.token_ids, batch.starts, batch.block_tables):
        ids = seq.all_ids
        assert toks, "a row with no tokens to compute (its logits need at least its last token)"
        assert toks == ids[start: start + len(toks)]
        for p in range(start, start + len(toks)):
            kv[slot(table, p, block_size)] = _kv_of(ids, p)
        for p in range(start + len(toks)):
            assert kv.get(slot(table, p, block_size)) == _kv_of(ids, p), f"seq {seq.seq_id} reads wrong K/V at {p}"


def _simulate(requests, num_blocks, block_size, budget, mix, max_running, aborts=(), cache=True, check_each=True):
    """Run requests [(arrival step, prompt, max_tokens)] through a Scheduler and a fake runner whose
    'model' appends a token that depends on every token before it. Returns each request's tokens."""
    alloc = BlockAllocator(num_blocks, block_size)
    sched = Scheduler(alloc, budget, max_running, mix=mix, prefix_cache=cache)
    kv, seqs, pending, step = {}, [], sorted(enumerate(requests), key=lambda r: r[1][0]), 0
    while pending or sched.has_work():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, max_tokens) = pending.pop(0)
            seq = Sequence(str(i), 0, list(prompt), SamplingParams(temperature=0), max_tokens)
            seqs.append(seq)
            sched.add(seq)
        for i in aborts:
            if step == 3 * i + 2 and i < len(seqs) and seqs[i].status is not Status.FINISHED:
                sched.finish(seqs[i], "abort")
        scheduled = sched.schedule()
        if scheduled is not None:
            chosen, batch = scheduled
            _run_fake_step(chosen, batch, kv, block_size)
            for seq, sample in zip(chosen, batch.sample):
                if sample:
                    seq.output_ids.append(1 + hash(tuple(seq.all_ids)) % 3)
                    if len(seq.output_ids) >= seq.max_tokens:
                        sched.finish(seq, "length")
        if check_each:
            sched.check()
        step += 1
        assert step < 5000, "the scheduler made no progress"
    sched.check()
    assert alloc.num_free == num_blocks and len(alloc.free) + (sched.cache.num_evictable if cache else 0) == num_blocks
    # an aborted request's tokens are cut wherever it was: None
    return [s.output_ids if s.finish_reason != "abort" else None
            for s in sorted(seqs, key=lambda s: int(s.request_id))], sched


def _admissions(max_tokens: list[int], max_running: int, batching: bool = True) -> list[tuple[int, int, int]]:
    """Run sequences of these output lengths through a Scheduler (all waiting at the start); for each
    step that admitted some while others decoded: (step, sequences admitted, queue length before)."""
    alloc = BlockAllocator(8192, 4)
    sched = Scheduler(alloc, 4096, max_running, prefix_cache=False)
    if not batching:
        sched.admit_batch = 1
    for i, n in enumerate(max_tokens):
        sched.add(Sequence(str(i), i, [1 + i % 3, 2, 3], SamplingParams(temperature=0), n))
    out, step = [], 0
    while sched.has_work():
        waiting, running = len(sched.waiting), len(sched.running)
        chosen, batch = sched.schedule()
        admitted = sum(1 for st in batch.starts if st == 0)
        if admitted and running:
            out.append((step, admitted, waiting))
        for seq, sample in zip(chosen, batch.sample):
            if sample:
                seq.output_ids.append(7)
                if len(seq.output_ids) >= seq.max_tokens:
                    sched.finish(seq, "length")
        step += 1
    assert alloc.num_free == 8192
    return out


def test_a_full_batch_admits_its_queue_in_batches():
    """With the running batch full and a queue waiting, room gathers until an eighth of the batch (or
    the whole queue) fits: not one prefill step per finishing sequence."""
    lengths = [2 + (i * 7) % 37 for i in range(300)]  # sequences finish a few per step
    batched = _admissions(lengths, 64)
    assert all(n >= min(8, waiting) for _, n, waiting in batched), batched
    one_by_one = _admissions(lengths, 64, batching=False)
    assert len(one_by_one) > 2 * len(batched), (len(one_by_one), len(batched))


def test_admission_waits_a_bounded_number_of_steps():
    """One sequence's room frees up while the others decode for long: the queue's first request is
    admitted after ADMIT_MAX_DEFER steps, not when an eighth of the batch is free."""
    from ptp.scheduler import ADMIT_MAX_DEFER

    lengths = [3] + [200] * 63 + [5] * 4
    (step, n, waiting), *_ = _admissions(lengths, 64)
    assert n == 1 and waiting == 4
    assert step == 3 + ADMIT_MAX_DEFER  # freed after step 2 (prefill, then two decode steps)


def _workload(rng: random.Random) -> dict:
    """A random workload: a few base prompts over 3 token ids (so that prefixes repeat), requests that
    take part of one and add their own tokens, arriving over the first steps; a small cache."""
    block_size = rng.choice([1, 2, 4])
    num_blocks = rng.randint(4, 24)
    capacity = num_blocks * block_size
    tokens = lambda n: [rng.randint(1, 3) for _ in range(n)]  # noqa: E731
    bases = [tokens(rng.randint(0, 12)) for _ in range(rng.randint(1, 3))]
    requests = []
    for _ in range(rng.randint(1, 8)):
        base = rng.choice(bases)
        prompt = (base[: rng.randint(0, len(base))] + tokens(rng.randint(0, 6)) or [1])[: capacity - 1]
        requests.append((rng.randint(0, 6), prompt, rng.randint(1, max(1, min(6, capacity - len(prompt))))))
    return dict(requests=requests, num_blocks=num_blocks, block_size=block_size, budget=rng.choice([-1, 3, 8]),
                mix=rng.random() < 0.5, max_running=rng.randint(1, 4),
                aborts=rng.sample(range(8), rng.randint(0, 2)))


@pytest.mark.parametrize("seed", range(4))
def test_scheduler_with_the_cache_reads_only_its_own_tokens(seed):
    """Random mixes of shared prefixes, chunk budgets, small caches (eviction, preemption) and aborts:
    every step reads the K/V of its own tokens, the bookkeeping holds after each step, nothing leaks,
    and the tokens equal those without the cache."""
    rng = random.Random(seed)
    for _ in range(40):
        work = _workload(rng)
        with_cache, _ = _simulate(**work)
        without, _ = _simulate(**work, cache=False, check_each=False)
        assert all(a == b for a, b in zip(with_cache, without) if a is not None and b is not None), work


def test_simulated_hits_evictions_and_preemptions_happen(monkeypatch):
    """The workloads of the property test reach the cases it is about: hits, evictions, preemptions."""
    evicted = []
    evict = PrefixCache.evict
    monkeypatch.setattr(PrefixCache, "evict", lambda self, n: evicted.append(n) or evict(self, n))
    rng = random.Random(0)
    system = [rng.randint(1, 3) for _ in range(10)]
    requests = [(i, system + [rng.randint(1, 3) for _ in range(rng.randint(0, 5))], 5) for i in range(12)]
    _, sched = _simulate(requests, num_blocks=10, block_size=2, budget=4, mix=False, max_running=3)
    assert sched.prefix_hit_tokens > 0 and sched.num_preemptions > 0 and sum(evicted) > 0



def test_decode_steps_leave_the_tree_alone(monkeypatch):
    """A prompt's blocks join the tree as its prefill fills them (a request beside it shares them at
    once); its output's blocks only when it finishes: decode steps do no tree work."""
    inserts = []
    insert = PrefixCache.insert
    monkeypatch.setattr(PrefixCache, "insert", lambda self, *a: inserts.append(a) or insert(self, *a))
    sched = Scheduler(BlockAllocator(32, 4), -1, 4)
    first = Sequence("0", 0, list(range(1, 11)), SamplingParams(temperature=0), 9)
    second = Sequence("1", 0, list(range(1, 10)) + [77], SamplingParams(temperature=0), 2)
    sched.add(first)
    decode_inserts, step = 0, 0
    while sched.has_work():
        if step == 3:
            sched.add(second)
        before = len(inserts)
        seqs, batch = sched.schedule()
        decode_inserts += batch.is_decode and len(inserts) - before
        for seq, sample in zip(seqs, batch.sample):
            if sample:
                seq.output_ids.append(100 + step)
                if len(seq.output_ids) >= seq.max_tokens:
                    sched.finish(seq, "length")
        sched.check()
        step += 1
    assert second.num_cached_tokens == 8  # the first's prompt blocks, while it was decoding
    assert decode_inserts == 0
    # the first computed its 10 prompt and 8 of its 9 output tokens: 4 whole blocks are in the tree
    assert len(sched.cache.match(first.all_ids, 10)) == 4


# --- the engine ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(ckpt_root):
    return make_checkpoint(ckpt_root, "llama", seed=5, max_position_embeddings=2048)


def _prompts(seed=0):
    """A 37-token prefix (9 blocks of 4 and one token), and prompts that share 0-100% of it, diverge
    in the middle of a block, or repeat it exactly."""
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(3, 380) for _ in range(n)]  # noqa: E731
    base = draw(37)
    return [base, base[:10] + draw(20), base[:16] + draw(5), draw(25), base + draw(9), list(base),
            base[:-1], base[:36] + draw(1), base[:2] + draw(3)]


def _generate(llm, prompts, params=GREEDY, one_by_one=True):
    if one_by_one:
        return [o.token_ids for p in prompts for o in llm.generate(p, params, use_tqdm=False)]
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _no_leak(llm):
    sched = llm.engine.scheduler
    sched.check()
    assert not sched.has_work()
    assert sched.allocator.num_free == sched.allocator.num_blocks
    assert len(sched.allocator.free) + sched.cache.num_evictable == sched.allocator.num_blocks


@pytest.fixture(scope="module")
def reference(folder):
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", block_size=4, disable_radix_cache=True)
    assert llm.engine.scheduler.cache is None
    return {"one": _generate(llm, _prompts()), "batch": _generate(llm, _prompts(1), one_by_one=False)}


def _checked(llm):
    """Check the bookkeeping after every scheduling decision of this engine."""
    sched = llm.engine.scheduler
    schedule = sched.schedule

    def checked(*args, **kwargs):
        step = schedule(*args, **kwargs)
        sched.check()
        return step
    sched.schedule = checked
    return llm


@pytest.mark.parametrize("kwargs", [
    {},
    {"chunked_prefill_size": 7},
    {"num_kv_blocks": 24},               # 96 slots: prompts evict each other's blocks
    {"num_kv_blocks": 24, "disable_overlap_schedule": True},
], ids=["plain", "chunked-prefill", "eviction", "eviction-synchronous"])
def test_greedy_tokens_with_the_cache_equal_those_without(folder, reference, kwargs):
    llm = _checked(ptp.LLM(str(folder), dtype="float32", device="cpu", block_size=4, **kwargs))
    evicted = []
    evict = llm.engine.scheduler.cache.evict
    llm.engine.scheduler.cache.evict = lambda n: evicted.append(n) or evict(n)
    assert _generate(llm, _prompts()) == reference["one"]
    sched = llm.engine.scheduler
    # prompts 1-8 find 8, 16, 0, 36, 36 (an exact repeat: all but its last token's block), 32, 36, 0
    if "num_kv_blocks" in kwargs:
        assert sched.prefix_hit_tokens > 0
    else:
        assert sched.prefix_hit_tokens == 8 + 16 + 36 + 36 + 32 + 36, sched.prefix_hit_tokens
    assert _generate(llm, _prompts(1), one_by_one=False) == reference["batch"]  # side by side
    assert (sum(evicted) > 0) == ("num_kv_blocks" in kwargs), evicted
    _no_leak(llm)


def _evicted_while_waiting(llm, reference):
    """A request waits (one running at a time) while others take the blocks of its cached prefix;
    admitted, it finds less cached and computes the rest: the same tokens."""
    prompts, sched = _prompts(), llm.engine.scheduler
    assert sched.allocator.num_blocks == 24
    running, sched.max_running = sched.max_running, 1
    assert _generate(llm, prompts[:1]) == reference["one"][:1]
    rng = random.Random(7)
    fill = [[rng.randrange(3, 380) for _ in range(40)] for _ in range(2)]  # 2 x 12 blocks: all 24
    outs = llm.generate(fill + [prompts[4]], GREEDY, use_tqdm=False)
    sched.max_running = running
    assert outs[2].token_ids == reference["one"][4]
    assert outs[2].num_cached_tokens < 36  # its 36-token prefix was cached when it arrived


def test_a_prefix_evicted_while_its_request_waits_is_recomputed(folder, reference):
    llm = _checked(ptp.LLM(str(folder), dtype="float32", device="cpu", block_size=4, num_kv_blocks=24))
    _evicted_while_waiting(llm, reference)
    _no_leak(llm)


def test_the_second_prompt_computes_only_its_new_tokens(folder):
    """Two prompts share a 1,000-token prefix: the runner computes all of the first, and of the
    second only the tokens after the cached whole blocks."""
    rng = random.Random(3)
    shared = [rng.randrange(3, 380) for _ in range(1000)]
    first, second = shared + [5, 6, 7], shared + [rng.randrange(3, 380) for _ in range(21)]
    want = [o.token_ids for o in ptp.LLM(str(folder), dtype="float32", device="cpu", disable_radix_cache=True)
            .generate([first, second], GREEDY, use_tqdm=False)]
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu")  # the default 16-token blocks
    runner, computed = llm.engine.runner, []
    execute = runner.execute
    runner.execute = lambda batch: computed.append(sum(map(len, batch.token_ids))) or execute(batch)
    out = llm.generate(first, GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and computed[0] == len(first)
    computed.clear()
    out2 = llm.generate(second, GREEDY, use_tqdm=False)[0]
    cached = 1000 // 16 * 16
    assert out2.num_cached_tokens == cached
    assert computed[0] == len(second) - cached == 21 + 1000 - cached  # the prefill step: new tokens only
    assert computed[1:] == [1] * (GREEDY.max_tokens - 1)
    assert [out.token_ids, out2.token_ids] == want
    sched = llm.engine.scheduler
    assert (sched.prefix_query_tokens, sched.prefix_hit_tokens) == (len(first) + len(second), cached)
    _no_leak(llm)


def test_a_step_starting_mid_prompt_takes_the_general_path(folder, reference, monkeypatch):
    """The padded whole-prompt path (PrefillGraphs) and the causal shortcut assume a prompt from
    position 0: a prompt that starts after cached blocks must take neither, and gives the same tokens."""
    import ptp.runner as runner_mod
    from ptp.graphs import PrefillGraphs
    from ptp.attention.meta import PrefillMeta

    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", block_size=4)
    runner = llm.engine.runner
    runner.prefill = PrefillGraphs(runner, False, 64)  # as on CPU with the compiled step
    padded, metas = [], []
    run = runner.prefill.run
    runner.prefill.run = lambda batch: padded.append(batch.starts[0]) or run(batch)
    step_meta = runner_mod.step_meta

    def spy(starts, *args):
        meta = step_meta(starts, *args)
        if isinstance(meta, PrefillMeta):
            metas.append((starts, meta.causal))
        return meta
    monkeypatch.setattr(runner_mod, "step_meta", spy)
    assert _generate(llm, _prompts()) == reference["one"]
    assert padded and set(padded) == {0}  # whole prompts from 0 were padded; none that started later
    later = [causal for starts, causal in metas if starts[0] > 0]
    assert later and not any(later)
    _no_leak(llm)


@pytest.mark.slow
def test_tp2_with_the_cache_equals_tp1_without(folder, reference):
    """At tp=2 rank 0 decides and the block ids travel in the steps: hits, a small cache's evictions
    and a prefix evicted while its request waits give tp=1's tokens without the cache."""
    prompts = _prompts()
    with ptp.LLM(str(folder), dtype="float32", device="cpu", block_size=4, tp=2, num_kv_blocks=24) as llm:
        _checked(llm)
        assert _generate(llm, prompts) == reference["one"]
        assert _generate(llm, _prompts(1), one_by_one=False) == reference["batch"]
        assert llm.engine.scheduler.prefix_hit_tokens > 100
        _evicted_while_waiting(llm, reference)
        _no_leak(llm)



def _computed_tokens(llm) -> list[int]:
    """Records the tokens each step computes, as rank 0 schedules them (every stage and rank runs the
    steps rank 0 sends, micro-batches too)."""
    sched, computed = llm.engine.scheduler, []
    schedule = sched.schedule

    def recorded(*args, **kwargs):
        step = schedule(*args, **kwargs)
        if step is not None:
            computed.append(sum(map(len, step[1].token_ids)))
        return step
    sched.schedule = recorded
    return computed


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "pp2-tp2"])
def test_pipeline_stages_with_the_cache_equal_tp1_without(folder, reference, tp):
    """pp=2 (each stage holds its layers' part of every cached block): hits, a small cache's
    evictions and prompts side by side give tp=1's tokens without the cache; a prompt whose prefix is
    cached computes only its new tokens on every stage."""
    prompts = _prompts()
    with ptp.LLM(str(folder), dtype="float32", device="cpu", block_size=4, pp_size=2, tp=tp, num_kv_blocks=24) as llm:
        _checked(llm)
        computed = _computed_tokens(llm)
        assert _generate(llm, prompts) == reference["one"]
        # prompt 5 repeats prompt 0 (37 tokens): 36 from the cache, its last token computed
        assert llm.generate(prompts[5], GREEDY, use_tqdm=False)[0].num_cached_tokens == 36
        assert computed[-GREEDY.max_tokens:] == [1] * GREEDY.max_tokens
        assert _generate(llm, _prompts(1), one_by_one=False) == reference["batch"]
        assert llm.engine.scheduler.prefix_hit_tokens > 100
        _no_leak(llm)


# --- the deterministic mode ----------------------------------------------------------------------
def _needle_with_and_without_a_hit(llm, needle, other=None, max_tokens=6, sampled=True):
    """The needle's greedy logprobs (and, with `sampled`, seeded samples beside them): from a cold
    cache, after `other` left the shared prefix's blocks in the cache (if given), and repeated (its
    own blocks cached). Returns the runs and the cached token counts of the runs after the first."""
    params = [ptp.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)]
    if sampled:
        params.append(ptp.SamplingParams(temperature=0.8, seed=1234, max_tokens=max_tokens, ignore_eos=True))
    sched = llm.engine.scheduler

    def needle_run():
        outs = llm.generate([needle] * len(params), params, use_tqdm=False)
        g = outs[0].outputs[0]
        return ([g.token_ids, [next(iter(d.values())) for d in g.logprobs]] + [o.outputs[0].token_ids for o in outs[1:]],
                outs[0].num_cached_tokens)
    sched.cache.evict(sched.cache.num_evictable)  # cold
    cold, cached = needle_run()
    assert cached == 0
    runs, hits = [cold], []
    if other is not None:
        sched.cache.evict(sched.cache.num_evictable)
        llm.generate(other, ptp.SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        run, hit = needle_run()
        runs.append(run)
        hits.append(hit)
    run, hit = needle_run()  # the needle's own blocks cached
    _no_leak(llm)
    return runs + [run], tuple(hits + [hit])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_deterministic_mode_gives_the_same_bits_with_and_without_a_hit(folder, dtype):
    """--enable-deterministic-inference: a prompt whose first blocks come from the cache (they end in
    the middle of an attention split) gives the logprobs and samples of the same prompt computed
    from scratch, bit for bit."""
    rng = random.Random(11)
    prefix = [rng.randrange(3, 380) for _ in range(22)]
    needle, other = prefix + [rng.randrange(3, 380) for _ in range(3)], prefix + [7, 8, 9]
    with ptp.LLM(str(folder), dtype=dtype, device="cpu", block_size=4, enable_deterministic_inference=True,
                 max_model_len=256) as llm:
        llm.engine.runner.attention.split_tokens = 8  # hits of 5 and 7 blocks end mid-split
        runs, hits = _needle_with_and_without_a_hit(llm, needle, other)
    assert hits == (20, 24)
    assert runs[1] == runs[0], [a - b for a, b in zip(runs[1][1], runs[0][1])]
    assert runs[2] == runs[0], [a - b for a, b in zip(runs[2][1], runs[0][1])]


INTERPRETED = """
import random, tempfile
from pathlib import Path
import ptp
from helpers import make_checkpoint
from test_prefix_cache import _needle_with_and_without_a_hit
# one layer and one KV head: the interpreter runs a program per prompt row, KV head, split and layer
folder = make_checkpoint(Path(tempfile.mkdtemp()), "llama", seed=6, num_hidden_layers=1, num_key_value_heads=1)
rng = random.Random(12)
with ptp.LLM(str(folder), dtype="float32", device="cpu", attention_backend="triton", torch_compile="off",
             enable_deterministic_inference=True, max_model_len=256) as llm:
    llm.engine.runner.attention.split_tokens = 64  # the kernel's smallest: 90 tokens in 2 splits, a hit of 80 ends mid-split
    runs, hits = _needle_with_and_without_a_hit(llm, [rng.randrange(3, 380) for _ in range(90)], max_tokens=2,
                                                sampled=False)
print(hits, runs[0] == runs[1])
"""


@pytest.mark.slow
def test_deterministic_mode_with_a_hit_in_the_triton_kernels():
    """The same with the Triton attention (the fixed-split kernel over prompt rows), RMSNorm and
    log-softmax kernels, in the interpreter: a prompt computed whole, then again with all but its
    last 10 tokens from the cache."""
    from test_kernels import in_interpreter

    stdout = in_interpreter(INTERPRETED)
    assert stdout.split("\n")[-2] == "(80,) True", stdout
