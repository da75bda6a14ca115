"""Offline throughput: N prompts of random tokens through LLM.generate; input and output tokens/s.

    python bench/throughput.py --model llama-3.1-8b --load-format dummy --num-prompts 256
    python bench/throughput.py --model llama-3.1-8b --load-format dummy --num-prompts 1000 --dataset chat-lengths

Lengths: --dataset random (default) draws them around --input-len / --output-len (± --jitter);
--dataset chat-lengths draws them shaped like ShareGPT chat traffic (bench/workloads.py chat_lengths:
means near 220 prompt and 200 output tokens, a long tail up to 2,048 / 1,024; fixed seed).
"""
from __future__ import annotations

import time

from common import build_llm, engine_parser, print_table, random_prompts, write_json
from workloads import chat_lengths


def main() -> None:
    from ptp.log import setup_logging

    setup_logging()
    parser = engine_parser(__doc__)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--jitter", type=float, default=0.5, help="lengths vary by up to this fraction")
    parser.add_argument("--dataset", default="random", choices=("random", "chat-lengths"),
                        help="how lengths are drawn (chat-lengths: shaped like ShareGPT; ignores the lengths above)")
    ns = parser.parse_args()
    import random

    import ptp
    from ptp.replica import warm_up

    llm, args = build_llm(ns)
    vocab = llm.engine.config.vocab_size
    if ns.dataset == "chat-lengths":
        lengths = chat_lengths(ns.num_prompts, seed=1, max_prompt=min(2048, llm.engine.max_model_len // 2))
        rng = random.Random(1)
        prompts = [[rng.randrange(100, vocab - 100) for _ in range(n)] for n, _ in lengths]
        outputs = [min(m, llm.engine.max_model_len - n) for n, m in lengths]
    else:
        prompts = random_prompts(ns.num_prompts, ns.input_len, vocab, seed=1, jitter=ns.jitter)
        rng = random.Random(2)
        outputs = [max(1, int(ns.output_len * rng.uniform(1 - ns.jitter, 1 + ns.jitter))) for _ in prompts]
    params = [ptp.SamplingParams(temperature=0, ignore_eos=True, max_tokens=m) for m in outputs]
    # Warm up as a server does (every kind of step compiled), then on the first four requests' shapes
    # (first calls of kernels, cuDNN plans and tile tuning at those sizes) with other token ids: the
    # timed prompts themselves would then hit the prefix cache.
    warm_up(llm.engine)
    llm.generate([[(t + 1) % vocab for t in p] for p in prompts[:4]], params[:4], use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(o.token_ids) for o in outs)
    row = {"label": ns.label, "dataset": ns.dataset, "tp": args.tp, "prompts": ns.num_prompts, "input_tokens": n_in, "output_tokens": n_out,
           "seconds": seconds, "input_tok_s": n_in / seconds, "output_tok_s": n_out / seconds,
           "preemptions": llm.engine.scheduler.num_preemptions}
    print_table([row], list(row))
    write_json(ns.json, [row])
    llm.shutdown()


if __name__ == "__main__":
    main()
