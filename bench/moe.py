"""Mixture-of-experts checks and measurements (kernels/fused_moe.py, models/moe.py).

    # the kernel alone at the Qwen3-30B-A3B shape, bf16: error against a float32 per-expert reference,
    # GPU time in a CUDA graph, and % of memory bandwidth on the expert bytes each batch reads; then
    # the router kernel alone (kernels/moe_router.py) beside the torch routing it replaces
    python bench/moe.py kernel --batch-sizes 1,4,16,64
    # compiled + graphed greedy tokens equal eager (and transformers) on a tiny fp32 checkpoint written here
    python bench/moe.py check
    # whole-model decode at the Qwen3-30B-A3B shape (dummy bf16 weights): bench/latency.py, e.g.
    python bench/latency.py --model qwen3-30b-a3b --load-format dummy --batch-sizes 1,64 --input-len 512 --output-len 128

On CPU, `kernel --tiny` runs the kernel under TRITON_INTERPRET=1 at a small shape and `check --device cpu`
compares the compiled step (no graphs) with eager: both only show that the script runs.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

from common import bandwidth, print_table, write_json

QWEN3_30B = dict(experts=128, top_k=8, hidden=2048, width=768)
TINY = dict(experts=8, top_k=2, hidden=64, width=32)


def reference(x, w13, w2, weights, ids):
    """float32, one expert at a time: sum_k weights[t, k] * down(silu(gate(x)) * up(x))."""
    import torch
    import torch.nn.functional as F

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in ids.unique().tolist():
        rows, slot = (ids == e).nonzero(as_tuple=True)
        gate, up = F.linear(xf[rows], w13[e].float()).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e].float())
        out.index_add_(0, rows, y * weights[rows, slot, None].float())
    return out


def kernel(ns) -> None:
    if ns.tiny:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from ptp.kernels.fused_moe import default_config, fused_moe
    from ptp.kernels.moe_router import FUSED_ALIGN_MAX_TOKENS

    shape = TINY if ns.tiny else QWEN3_30B
    device = "cpu" if ns.tiny else "cuda"
    dtype = torch.float32 if ns.tiny else torch.bfloat16
    e, k, h, i = shape["experts"], shape["top_k"], shape["hidden"], shape["width"]
    gen = torch.Generator(device=device).manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device=device) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=gen, device=device) / i ** 0.5).to(dtype)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    bw = bandwidth(device_name)
    rows, router_rows = [], []
    for bs in [int(b) for b in ns.batch_sizes.split(",")]:
        x = torch.randn(bs, h, generator=gen, device=device).to(dtype)
        routings = []  # a different routing each timed call: the experts read are mostly not in L2
        for _ in range(8 if device == "cuda" else 1):
            probs = torch.randn(bs, e, generator=gen, device=device).softmax(-1)
            weights, ids = probs.topk(k, dim=-1)
            routings.append((weights / weights.sum(-1, keepdim=True), ids))
        weights, ids = routings[0]
        want = reference(x, w13, w2, weights, ids)
        config = default_config(bs * k)  # under the interpreter: both kinds of kernel at the batch sizes asked
        if device == "cuda":
            from ptp.models.moe import _config
            config = _config(x, w13, w2, k) or config  # measured (or cached) as the model would pick it
        got = fused_moe(x, w13, w2, weights, ids, config).float()
        err = float((got - want).abs().max() / want.abs().max())
        read = sum(int(i.unique().numel()) for _, i in routings) / len(routings)
        kind = "one-slot" if config[0] == 1 else "grouped"
        row = {"batch": bs, "experts_read": round(read, 1), "rel_err": err, "kernels": kind, "config": config}
        if device == "cuda":
            from ptp.parallel.comm import time_in_graph

            turn = itertools.count()

            def run():
                w, i = routings[next(turn) % len(routings)]
                return fused_moe(x, w13, w2, w, i, config)

            us = time_in_graph(run, 24)
            nbytes = read * expert_bytes + x.numel() * x.element_size() * 2
            row.update(us=us, gb_s=nbytes / us / 1e3, pct_of_bandwidth=100 * nbytes / us / 1e-6 / bw if bw else None)
        rows.append(row)
        router_rows.append(router_row(x, e, k, config[0], gen))
    print_table(rows, ["batch", "experts_read", "rel_err", "us", "gb_s", "pct_of_bandwidth", "kernels", "config"])
    print(f"device: {device_name}; shape {shape}, {dtype}; bytes = experts read (mean over 8 routings, one per "
          f"call) x {expert_bytes / 1e6:.1f} MB + activations in and out; bandwidth for the %: "
          f"{bw / 1e12 if bw else '?'} TB/s; rel_err = max |kernel - float32 per-expert reference| / max |reference|")
    print_table(router_rows, ["batch", "block_m", "ids_equal", "weights_err", "router_us", "torch_us"])
    print("router: kernels/moe_router.py (softmax, top-k, renormalisation, and the slot sort for block_m > 1 up to "
          f"{FUSED_ALIGN_MAX_TOKENS} tokens) in one launch; torch_us: softmax + topk + renormalisation + moe_align "
          "as torch ops; ids_equal / weights_err against route_torch on float32 logits")
    print(f"command: python bench/moe.py kernel --batch-sizes {ns.batch_sizes}{' --tiny' if ns.tiny else ''}")
    write_json(ns.json, [{"bench": "moe_kernel", "device": device_name, **r, "config": list(r["config"] or [])}
                         for r in rows] + [{"bench": "moe_router", "device": device_name, **r} for r in router_rows])
    bad = [r for r in rows if r["rel_err"] > (1e-5 if dtype == torch.float32 else 2e-2)]
    bad += [r for r in router_rows if not r["ids_equal"] or r["weights_err"] > 1e-2]
    if bad:
        sys.exit(f"kernel error too large: {bad}")


def router_row(x, experts: int, top_k: int, block_m: int, gen) -> dict:
    """The router kernel on random logits in x's dtype, against route_torch on the same logits in
    float32, and its GPU time beside the torch routing (route_torch + moe_align) it replaces."""
    import torch

    from ptp.kernels.fused_moe import moe_align
    from ptp.kernels.moe_router import route, route_torch

    logits = torch.randn(x.shape[0], experts, generator=gen, device=x.device).to(x.dtype)
    weights, ids, aligned = route(logits, top_k, True, torch.float32, block_m=block_m)
    want_w, want_ids = route_torch(logits.float(), top_k, True, torch.float32)
    ids_equal = torch.equal(ids.long(), want_ids)
    if aligned is not None:
        ids_equal = ids_equal and all(torch.equal(a, b) for a, b in zip(aligned, moe_align(want_ids, experts, block_m)))
    row = {"batch": x.shape[0], "block_m": block_m, "ids_equal": ids_equal,
           "weights_err": float((weights - want_w).abs().max())}
    if x.is_cuda:
        from ptp.parallel.comm import time_in_graph

        def torch_routing():
            w, i = route_torch(logits, top_k, True, torch.float32)
            return moe_align(i, experts, block_m) if block_m > 1 else w

        row.update(router_us=time_in_graph(lambda: route(logits, top_k, True, torch.float32, block_m=block_m), 50),
                   torch_us=time_in_graph(torch_routing, 50))
    return row


def check(ns) -> None:
    """Greedy tokens of the compiled (and, on CUDA, graphed) decode step equal eager ones, and
    transformers', on a tiny float32 checkpoint of each MoE architecture written here."""
    import torch
    import transformers

    import ptp

    prompts = [[5 + i, 17, 42 + 3 * i, 9, 77] for i in range(ns.batches)]
    params = ptp.SamplingParams(temperature=0, max_tokens=ns.tokens, ignore_eos=True)
    rows = []
    configs = {
        "Qwen3MoeConfig": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, head_dim=32,
                               norm_topk_prob=True),
        "Qwen2MoeConfig": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                               shared_expert_intermediate_size=96, mlp_only_layers=[1], num_hidden_layers=3),
        "MixtralConfig": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64),
    }
    with tempfile.TemporaryDirectory() as root:
        for name, extra in configs.items():
            fields = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          initializer_range=0.2, eos_token_id=None, bos_token_id=None, pad_token_id=None)
            fields.update(extra)
            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**fields),
                                                               dtype=torch.float32).eval()
            folder = Path(root) / name
            hf.save_pretrained(folder)
            with torch.no_grad():
                want = [hf.generate(torch.tensor([p]), max_new_tokens=ns.tokens, do_sample=False,
                                    attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
                        for p in prompts]
            common = dict(dtype="float32", device=ns.device, max_model_len=256, num_kv_blocks=64)
            outs = {}
            for mode, flags in (("eager", dict(torch_compile="off", disable_cuda_graph=True)),
                                ("compiled", dict(torch_compile="on", cuda_graph_max_bs=8))):
                with ptp.LLM(str(folder), **common, **flags) as llm:
                    outs[mode] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                    graphs = llm.engine.runner.decode is not None and llm.engine.runner.decode.graphs_on
            rows.append({"model": name.removesuffix("Config"), "batch": len(prompts), "tokens": ns.tokens,
                         "compiled_eq_eager": outs["compiled"] == outs["eager"], "graphs": graphs,
                         "eager_eq_transformers": outs["eager"] == want})
    print_table(rows, ["model", "batch", "tokens", "graphs", "compiled_eq_eager", "eager_eq_transformers"])
    write_json(ns.json, [{"bench": "moe_check", **r} for r in rows])
    if not all(r["compiled_eq_eager"] and r["eager_eq_transformers"] for r in rows):
        sys.exit("greedy tokens differ (see the table)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    k = sub.add_parser("kernel", help="the fused kernel alone: error, time, %% of bandwidth")
    k.add_argument("--batch-sizes", default="1,4,16,64")
    k.add_argument("--tiny", action="store_true", help="a small shape under TRITON_INTERPRET=1 on CPU")
    c = sub.add_parser("check", help="compiled + graphed greedy tokens equal eager and transformers")
    c.add_argument("--device", default="cuda")
    c.add_argument("--batches", type=int, default=3)
    c.add_argument("--tokens", type=int, default=32)
    for p in (k, c):
        p.add_argument("--json", default=None, help="append one JSON line per result to this file")
    ns = parser.parse_args()
    {"kernel": kernel, "check": check}[ns.mode](ns)


if __name__ == "__main__":
    main()
