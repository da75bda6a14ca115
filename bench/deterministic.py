"""--enable-deterministic-inference: is a request's result independent of its batch, and what does it cost?

Runs the same checks with the flag off and on (one engine after the other, same process):
- needles: each of --needles prompts (greedy, chosen-token logprobs) alone, then inside batches of
  the --batches sizes (other prompts of mixed lengths around it); a needle counts as identical when
  its logprobs in every batch equal those alone, bit for bit;
- sampled: one request (temperature 0.8, a seed) run --runs times in batches of random sizes; the
  number of distinct outputs (1 is the goal);
- cost: offline throughput (--num-prompts prompts, greedy) and batch-1 decode (ms per token).

The matmul's tile rule (kernels/batch_invariant.py, TILE_FOLLOWS_ROWS) is printed with the results;
PTP_DET_TILE_FOLLOWS_ROWS=1 runs with the tile following the row count.

    python bench/deterministic.py --model llama-3.1-8b --load-format dummy --dtype bfloat16
    python bench/deterministic.py ... --only on --parts checks      # the checks alone, with the flag
"""
from __future__ import annotations

import random
import time

from common import build_llm, engine_parser, print_table, random_prompts, write_json


def others(rng: random.Random, n: int, vocab: int, longest: int) -> list[list[int]]:
    return [[rng.randrange(100, vocab - 100) for _ in range(rng.randrange(8, longest))] for _ in range(n)]


def run_mixed(llm, wanted: list[list[int]], wanted_params, fillers: list[list[int]], rng: random.Random, out_len: int):
    """wanted prompts among fillers (greedy, 1..out_len tokens), shuffled; the wanted prompts' outputs."""
    import ptp

    prompts = list(wanted) + fillers
    params = list(wanted_params) + [ptp.SamplingParams(temperature=rng.choice([0.0, 1.0]), ignore_eos=True,
                                                       max_tokens=rng.randrange(1, out_len + 1)) for _ in fillers]
    order = list(range(len(prompts)))
    rng.shuffle(order)
    outs = llm.generate([prompts[i] for i in order], [params[i] for i in order], use_tqdm=False)
    return [outs[order.index(i)].outputs[0] for i in range(len(wanted))]


def needles_check(llm, ns, vocab: int) -> tuple[int, int]:
    """(needles identical in every batch, needles)."""
    import ptp

    rng = random.Random(3)
    needles = others(rng, ns.needles, vocab, ns.longest)
    greedy = ptp.SamplingParams(temperature=0, max_tokens=ns.output_len, ignore_eos=True, logprobs=0)

    def logprobs(out):
        return [next(iter(d.values())) for d in out.logprobs]

    alone = [logprobs(run_mixed(llm, [n], [greedy], [], rng, ns.output_len)[0]) for n in needles]
    same = [True] * len(needles)
    for batch in ns.batches:
        if batch <= 1:
            continue
        if batch < len(needles):  # each needle in its own batch of `batch`
            for i, n in enumerate(needles):
                got = run_mixed(llm, [n], [greedy], others(rng, batch - 1, vocab, ns.longest), rng, ns.output_len)
                same[i] &= logprobs(got[0]) == alone[i]
        else:  # every needle in one batch
            got = run_mixed(llm, needles, [greedy] * len(needles), others(rng, batch - len(needles), vocab, ns.longest),
                            rng, ns.output_len)
            for i, g in enumerate(got):
                same[i] &= logprobs(g) == alone[i]
    return sum(same), len(needles)


def sampled_check(llm, ns, vocab: int) -> int:
    """Distinct outputs of one seeded, sampled request over --runs batches of random sizes."""
    import ptp

    rng = random.Random(4)
    prompt = others(rng, 1, vocab, ns.longest)[0]
    params = ptp.SamplingParams(temperature=0.8, seed=42, max_tokens=ns.output_len, ignore_eos=True)
    outputs = set()
    for _ in range(ns.runs):
        fillers = others(rng, rng.randrange(0, max(ns.batches)), vocab, ns.longest)
        outputs.add(tuple(run_mixed(llm, [prompt], [params], fillers, rng, ns.output_len)[0].token_ids))
    return len(outputs)


def throughput(llm, ns, vocab: int) -> float:
    import ptp

    prompts = random_prompts(ns.num_prompts, ns.input_len, vocab, seed=1, jitter=0.5)
    rng = random.Random(2)
    params = [ptp.SamplingParams(temperature=0, ignore_eos=True, max_tokens=max(1, int(ns.output_len * rng.uniform(0.5, 1.5))))
              for _ in prompts]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / seconds


def batch1_ms_per_token(llm, vocab: int, tokens: int) -> float:
    import ptp

    timed = []
    for seed, n in ((5, 1), (6, tokens + 1)):  # two prompts: the second must not find the first in the prefix cache
        prompt = random_prompts(1, 128, vocab, seed=seed)[0]
        start = time.perf_counter()
        llm.generate([prompt], ptp.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        timed.append(time.perf_counter() - start)
    return (timed[1] - timed[0]) / tokens * 1e3


def main() -> None:
    from ptp.log import setup_logging

    setup_logging()
    parser = engine_parser(__doc__)
    parser.add_argument("--needles", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--runs", type=int, default=50, help="runs of the sampled request")
    parser.add_argument("--longest", type=int, default=1024, help="longest prompt of the checks")
    parser.add_argument("--output-len", type=int, default=32, help="tokens per needle / sampled request")
    parser.add_argument("--num-prompts", type=int, default=256, help="prompts of the throughput run")
    parser.add_argument("--input-len", type=int, default=512, help="mean prompt length of the throughput run")
    parser.add_argument("--throughput-output-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens timed at batch 1")
    parser.add_argument("--only", choices=("off", "on"), default=None, help="run one mode only")
    parser.add_argument("--parts", default="checks,cost",
                        help="checks (needles and the sampled request), cost (throughput and batch 1), or both")
    ns = parser.parse_args()
    parts = set(ns.parts.split(","))
    if not parts or parts - {"checks", "cost"}:
        parser.error(f"--parts takes checks, cost or checks,cost; got {ns.parts!r}")
    rows = []
    for mode in ("off", "on"):
        if ns.only not in (None, mode):
            continue
        ns.enable_deterministic_inference = mode == "on"
        llm, args = build_llm(ns)
        vocab = llm.engine.config.vocab_size
        warm(llm, vocab)
        row = {"flag": mode, "tile_rule": tile_rule(), "batches": len(ns.batches)}
        began = time.perf_counter()

        def progress(what: str) -> None:  # each part as it ends: a run cut short still says something
            print(f"flag {mode}, {time.perf_counter() - began:.0f} s: {what}", flush=True)

        if "checks" in parts:
            same, total = needles_check(llm, ns, vocab)
            row["needles_identical"] = f"{same}/{total}"
            progress(f"{same} of {total} needles identical alone and in batches of {ns.batches}")
            distinct = sampled_check(llm, ns, vocab)
            row["sampled_distinct"] = f"{distinct} of {ns.runs}"
            progress(f"the sampled request gave {distinct} distinct outputs in {ns.runs} runs")
        if "cost" in parts:
            row["output_tok_s"] = throughput(llm, argparse_copy(ns, output_len=ns.throughput_output_len), vocab)
            progress(f"{row['output_tok_s']:.0f} output tokens/s offline")
            row["batch1_ms_per_tok"] = batch1_ms_per_token(llm, vocab, ns.decode_tokens)
            progress(f"{row['batch1_ms_per_tok']:.2f} ms per token at batch 1")
        rows.append(row)
        llm.shutdown()
    if len(rows) == 2 and "cost" in parts:
        off, on = rows
        on["throughput_cost_%"] = 100 * (1 - on["output_tok_s"] / off["output_tok_s"])
        on["batch1_cost_%"] = 100 * (on["batch1_ms_per_tok"] / off["batch1_ms_per_tok"] - 1)
    print_table(rows, ["flag", "tile_rule", "needles_identical", "batches", "sampled_distinct", "output_tok_s",
                       "batch1_ms_per_tok", "throughput_cost_%", "batch1_cost_%"])
    write_json(ns.json, rows)


def warm(llm, vocab: int) -> None:
    """First calls outside the timings: the server's own warm-up (each kind of step compiled), then
    steps like those the timings run, so that Triton's kernels are built for them. The matmul's tile
    follows the row count (kernels/batch_invariant.py): a step of up to 128 rows (a 100-token prompt),
    of up to 512 (four of 64) and of more (four of 200) each use their own."""
    from ptp.replica import warm_up

    warm_up(llm.engine)
    for n, length in ((1, 100), (4, 64), (4, 200)):
        llm.generate(random_prompts(n, length, vocab, seed=9 + length), None, use_tqdm=False)


def tile_rule() -> str:
    """How the batch-invariant matmul picks its tile: by the weight's shape alone, or following M too."""
    from ptp.kernels import batch_invariant as bi

    return "follows the rows (K-chunk per weight shape)" if bi.TILE_FOLLOWS_ROWS else "weight shape"


def argparse_copy(ns, **changes):
    import argparse

    return argparse.Namespace(**{**vars(ns), **changes})


if __name__ == "__main__":
    main()
