"""Decode latency per batch size: ms per step, tokens/s, % of the memory-bandwidth limit, TTFT, start-up.

    python bench/latency.py --model llama-3.1-8b --load-format dummy --batch-sizes 1,8,64 --tp 1
"""
from __future__ import annotations

import time

T0 = time.time()  # launch, for "launch to first token"

import torch  # noqa: E402

from common import bandwidth, build_llm, engine_parser, print_table, random_prompts, write_json  # noqa: E402


def main() -> None:
    from ptp.log import setup_logging

    setup_logging()
    parser = engine_parser(__doc__)
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per batch size (the best counts)")
    ns = parser.parse_args()
    import ptp

    start = time.perf_counter()
    llm, args = build_llm(ns)
    startup = time.perf_counter() - start
    engine = llm.engine
    config, runner = engine.config, engine.runner
    vocab = config.vocab_size
    first = llm.generate([random_prompts(1, ns.input_len, vocab)[0]], ptp.SamplingParams(max_tokens=1), use_tqdm=False)
    assert first[0].token_ids
    launch_to_first_token = time.time() - T0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    bw = bandwidth(device)
    embed_bytes = runner.model.model.embed_tokens.weight.numel() * runner.model.model.embed_tokens.weight.element_size()
    kv_bytes_per_token = runner.kv_cache.data[:, :, 0, 0].numel() * runner.kv_cache.data.element_size()
    expert_bytes = sum(p.numel() * p.element_size() for name, p in runner.model.named_parameters()
                       if name.endswith(("experts.w13", "experts.w2")))
    rows = []
    for bs in [int(b) for b in ns.batch_sizes.split(",")]:
        # new prompts for every timed run: a repeat of earlier ones would find them in the prefix cache
        seeds = iter(range(bs * 1000, bs * 1000 + 2 * ns.repeat))
        prefill = min(_timed(llm, random_prompts(bs, ns.input_len, vocab, seed=next(seeds)), 1) for _ in range(ns.repeat))
        total = min(_timed(llm, random_prompts(bs, ns.input_len, vocab, seed=next(seeds)), ns.output_len)
                    for _ in range(ns.repeat))
        step = (total - prefill) / (ns.output_len - 1)
        avg_ctx = ns.input_len + ns.output_len / 2
        # bytes one decode step reads per rank: every weight but the embedding table (of a MoE model's
        # experts, those the batch's tokens are expected to pick), and the KV cache
        step_bytes = (runner.weight_bytes - embed_bytes - expert_bytes * (1 - experts_read(config, bs))
                      + bs * avg_ctx * kv_bytes_per_token)
        limit = step_bytes / bw if bw else None
        graph_ms = _graph_ms(runner, bs)
        graph_varied_ms = _graph_ms(runner, bs, vary=True)
        rows.append({
            "label": ns.label, "device": device, "tp": args.tp, "batch": bs, "ms_per_step": step * 1e3, "graph_ms": graph_ms,
            "graph_varied_ms": graph_varied_ms,
            "tokens_per_s": bs / step, "limit_tokens_per_s": bs / limit if limit else None,
            "pct_of_limit": 100 * limit / step if limit else None, "ttft_ms": prefill * 1e3,
            "startup_s": startup, "launch_to_first_token_s": launch_to_first_token,
            "graphs": runner.decode is not None and runner.decode.graphs_on,
            "attention": runner.attention.name, "input_len": ns.input_len, "output_len": ns.output_len,
        })
    print_table(rows, ["label", "tp", "batch", "ms_per_step", "graph_ms", "graph_varied_ms", "tokens_per_s", "limit_tokens_per_s", "pct_of_limit",
                       "ttft_ms", "startup_s", "launch_to_first_token_s"])
    print(f"device: {device}; bandwidth for the limit: {bw / 1e12 if bw else '?'} TB/s; "
          f"bytes per step = weights without the embedding (MoE: the experts a batch is expected to pick) + KV read; graph_ms = GPU time of a graph replay alone, "
          f"the same tokens each replay (graph_varied_ms: other tokens each replay; a MoE model's other experts)")
    write_json(ns.json, rows)
    llm.shutdown()


def experts_read(config, tokens: int) -> float:
    """The expected fraction of a layer's experts that `tokens` tokens pick, each choosing top-k of E
    uniformly: 1 - (1 - k/E)^tokens (1 for a dense model)."""
    if not config.num_experts:
        return 1.0
    return 1 - (1 - config.num_experts_per_tok / config.num_experts) ** tokens


def _graph_ms(runner, bs: int, vary: bool = False) -> float | None:
    """GPU time of one replay of the decode graph of this batch size (no host work between replays).
    Before each replay a small copy sets the token ids: the same ones every time, or (vary) other
    ones, which for a MoE model routes each replay to other experts, as real steps do."""
    decode = runner.decode
    if decode is None or not decode.graphs_on or bs not in decode.graphs or runner.d.world_size > 1:
        return None  # at tp > 1 the other ranks would have to replay in step
    graph = decode.graphs[bs][0]
    ids = decode.ids[:bs]
    saved = ids.clone()
    g = torch.Generator(device=ids.device).manual_seed(bs)
    tokens = torch.randint(100, runner.config.vocab_size - 100, (21, bs), device=ids.device, generator=g)
    if not vary:
        tokens[:] = tokens[0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ids.copy_(tokens[0])
    graph.replay()
    start.record()
    for i in range(1, 21):
        ids.copy_(tokens[i])
        graph.replay()
    end.record()
    end.synchronize()
    ids.copy_(saved)
    return start.elapsed_time(end) / 20


def _timed(llm, prompts, max_tokens: int) -> float:
    import ptp

    params = ptp.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == max_tokens for o in outs)
    return elapsed


if __name__ == "__main__":
    main()
