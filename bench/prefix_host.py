"""Host cost of the prefix cache: microseconds of scheduler work per step, cache on and off.

No model and no device: a Scheduler over a BlockAllocator runs random prompts (no two share a
block, so the cache never hits) the way the engine drives it with overlap scheduling: each step
the sequences of the step before get a placeholder for their token in flight, the scheduler picks
the step, then the tokens of the step before replace their placeholders and finished sequences
leave (`Scheduler.finish`). Finished sequences are replaced by new ones, so that the batch stays
full; the KV cache is sized so that the cache's blocks must be evicted to make room. Timed:
`schedule()` and `finish()`, split into decode steps and steps that prefill.

    python bench/prefix_host.py                       # batch 64 and 256
    python bench/prefix_host.py --batch 8 --steps 50  # a quick look

Columns: decode us/step (scheduler work of a decode step of the whole batch), prefill us/step (of a
step that admits and prefills), us/step (over all steps), on - off (us/step), and tree us/step: the
time inside the prefix cache's own calls (lookups, insertions, evictions, blocks given back to the
tree), timed around each call in a run of its own: the cache's share, without the noise of the rest;
gc us/step: Python's cyclic garbage collector, whether inside the timed calls or not (every tree node
is an object it scans).
Configurations alternate, --repeat times each; the fastest run of each is shown.
"""
from __future__ import annotations

import argparse
import gc
import random
import time

import common  # noqa: F401  (puts src/ on the path)
from common import print_table, write_json
from ptp.kv_cache import BlockAllocator
from ptp.prefix_cache import PrefixCache
from ptp.sampling import SamplingParams
from ptp.scheduler import Scheduler, Sequence, Status


def clock() -> float:
    """Seconds of CPU time of this process: on a machine shared with other work, time spent waiting
    for a core does not count (on an idle machine this is the wall time of the scheduler's work)."""
    return time.process_time()


def run(batch: int, cache: bool, ns, seed: int = 0, after_warmup=None) -> dict:
    rng = random.Random(seed)
    bs = ns.block_size
    per_seq = -(-(ns.prompt_len + ns.output_len) // bs)
    # room for the running batch and as much again: the cache fills and then gives blocks back
    alloc = BlockAllocator(2 * batch * per_seq, bs)
    sched = Scheduler(alloc, ns.chunk, batch, prefix_cache=cache)
    params = SamplingParams(temperature=0)

    def new_seq(i: int) -> Sequence:
        # staggered output lengths: sequences finish on different steps, as in serving
        out = ns.output_len - (i * 7) % (ns.output_len // 2 + 1) if i < batch else ns.output_len
        return Sequence(str(i), 0, [rng.randrange(3, 120_000) for _ in range(ns.prompt_len)], params, out)

    for i in range(batch):
        sched.add(new_seq(i))
    started = batch
    times = {"decode": [], "prefill": []}
    gc_time, gc_start = [0.0], [0.0]

    def gc_clock(phase, info):  # Python's cyclic collector: the tree's nodes make its passes longer
        if phase == "start":
            gc_start[0] = clock()
        elif timing:
            gc_time[0] += clock() - gc_start[0]
    timing = False
    gc.callbacks.append(gc_clock)
    prev: list[Sequence] = []
    for step in range(ns.warmup + ns.steps):
        if step == ns.warmup:
            timing = True
            if after_warmup is not None:
                after_warmup()
        for row, seq in enumerate(prev):  # the engine's placeholders for the tokens in flight
            if seq.status is Status.RUNNING and len(seq.output_ids) + 1 < seq.max_tokens:
                seq.output_ids.append(-1 - row)
        t0 = clock()
        scheduled = sched.schedule()
        spent = clock() - t0
        if scheduled is None:
            raise AssertionError("the scheduler had nothing to run: the KV cache is too small for the batch")
        seqs, step_batch = scheduled
        kind = "decode" if step_batch.is_decode else "prefill"
        finished = 0
        for seq in prev:  # the step before's tokens arrive
            if seq.output_ids and seq.output_ids[-1] < 0:
                seq.output_ids.pop()
            if seq.status is Status.FINISHED:
                continue
            seq.output_ids.append(rng.randrange(3, 120_000))
            if len(seq.output_ids) >= seq.max_tokens:
                t0 = clock()
                sched.finish(seq, "length")
                spent += clock() - t0
                finished += 1
        for _ in range(finished):
            sched.add(new_seq(started))
            started += 1
        prev = [s for s, sample in zip(seqs, step_batch.sample) if sample]
        if step >= ns.warmup:
            times[kind].append(spent)
    gc.callbacks.remove(gc_clock)
    if ns.check:
        sched.check()
    mean = lambda xs: sum(xs) / len(xs) * 1e6 if xs else None  # noqa: E731
    return {"batch": batch, "cache": "on" if cache else "off", "decode us/step": mean(times["decode"]),
            "prefill us/step": mean(times["prefill"]), "us/step": mean(times["decode"] + times["prefill"]),
            "gc us/step": gc_time[0] / ns.steps * 1e6, "decode steps": len(times["decode"]), "finished": started - batch,
            "cached blocks": sched.cache.num_cached_blocks if cache else 0}


def tree_us_per_step(batch: int, ns) -> float:
    """Microseconds per step inside the prefix cache's calls, in a run with each of them timed."""
    spent = [0.0]

    def timed(fn):
        def call(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += clock() - t0
        return call
    wrapped = [(Scheduler, "_lookup"), (Scheduler, "_admit_cached"), (Scheduler, "_cache_computed"),
               (PrefixCache, "evict"), (PrefixCache, "unshared")]
    saved = [(cls, name, getattr(cls, name)) for cls, name in wrapped]
    for cls, name, fn in saved:
        setattr(cls, name, timed(fn))
    try:
        run(batch, True, ns, after_warmup=lambda: spent.__setitem__(0, 0.0))
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
    return spent[0] / ns.steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=8192, help="--chunked-prefill-size")
    parser.add_argument("--steps", type=int, default=1500, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=300, help="steps before timing (the cache fills)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; the fastest is shown")
    parser.add_argument("--check", action="store_true", help="check the block bookkeeping at the end of each run")
    parser.add_argument("--json", default=None, help="append one JSON line per result to this file")
    ns = parser.parse_args()
    rows = []
    for batch in ns.batch:
        runs = {False: [], True: []}
        for _ in range(ns.repeat):
            for cache in (False, True):  # alternating: a slow spell of the machine hits both
                runs[cache].append(run(batch, cache, ns))
        off, on = (min(runs[c], key=lambda r: r["us/step"]) for c in (False, True))
        on["on - off"] = on["us/step"] - off["us/step"]
        on["tree us/step"] = tree_us_per_step(batch, ns)
        rows += [off, on]
    print_table(rows, ["batch", "cache", "decode us/step", "prefill us/step", "us/step", "on - off", "tree us/step",
                       "gc us/step", "decode steps", "finished", "cached blocks"])
    write_json(ns.json, rows)


if __name__ == "__main__":
    main()
