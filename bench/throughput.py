"""Offline throughput: N prompts of random lengths through LLM.generate; input and output tokens/s.

    python bench/throughput.py --model llama-3.1-8b --load-format dummy --num-prompts 256
"""
from __future__ import annotations

import time

from common import build_llm, engine_parser, print_table, random_prompts, write_json


def main() -> None:
    from ptp.log import setup_logging

    setup_logging()
    parser = engine_parser(__doc__)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--jitter", type=float, default=0.5, help="lengths vary by up to this fraction")
    ns = parser.parse_args()
    import random

    import ptp

    llm, args = build_llm(ns)
    vocab = llm.engine.config.vocab_size
    prompts = random_prompts(ns.num_prompts, ns.input_len, vocab, seed=1, jitter=ns.jitter)
    rng = random.Random(2)
    params = [ptp.SamplingParams(temperature=0, ignore_eos=True,
                                 max_tokens=max(1, int(ns.output_len * rng.uniform(1 - ns.jitter, 1 + ns.jitter))))
              for _ in prompts]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(o.token_ids) for o in outs)
    row = {"label": ns.label, "tp": args.tp, "prompts": ns.num_prompts, "input_tokens": n_in, "output_tokens": n_out,
           "seconds": seconds, "input_tok_s": n_in / seconds, "output_tok_s": n_out / seconds,
           "preemptions": llm.engine.scheduler.num_preemptions}
    print_table([row], list(row))
    write_json(ns.json, [row])
    llm.shutdown()


if __name__ == "__main__":
    main()
