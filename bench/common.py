"""Shared pieces of the bench scripts: engine flags, random prompts, rooflines, tables."""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))

# Achievable memory bandwidth (device-to-device copy, bytes read + written), bytes/s.
BANDWIDTH = {"H200": 4.3e12, "H100": 3.0e12}


def engine_parser(description: str) -> argparse.ArgumentParser:
    from ptp.args import EngineArgs

    parser = argparse.ArgumentParser(description=description)
    EngineArgs.add_cli_args(parser.add_argument_group("engine"))
    parser.add_argument("--json", default=None, help="append one JSON line per result to this file")
    parser.add_argument("--label", default="", help="a name for this configuration in the table")
    return parser


def build_llm(ns: argparse.Namespace):
    """The LLM that the engine flags of `ns` describe; returns (llm, EngineArgs)."""
    import ptp
    from ptp.args import EngineArgs

    ns.model = resolve_config_path(ns.model)
    args = EngineArgs.from_cli(ns)
    return ptp.LLM(**vars(args)), args


def resolve_config_path(model: str | None) -> str | None:
    """`--model llama-3.1-8b` means bench/configs/llama-3.1-8b (config only: use --load-format dummy)."""
    if model and (BENCH / "configs" / model).is_dir():
        return str(BENCH / "configs" / model)
    return model


def random_prompts(n: int, length: int, vocab: int, seed: int = 0, jitter: float = 0.0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = length if not jitter else max(1, int(length * rng.uniform(1 - jitter, 1 + jitter)))
        out.append([rng.randrange(100, vocab - 100) for _ in range(size)])
    return out


def bandwidth(device_name: str) -> float | None:
    return next((bw for key, bw in BANDWIDTH.items() if key in device_name), None)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return "" if v is None else str(v)


def write_json(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def eager_us(fn, iters: int, warmup: int = 1) -> float:
    """Mean microseconds of fn() over `iters` eager CUDA calls, launches included, after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def decode_case(batch: int, context: int, max_len: int, kv_heads: int, head_dim: int, block: int = 16):
    """A decode step's attention inputs on the GPU, bf16: the KV cache [2, blocks + 1, block, kv_heads,
    head_dim] (the last block spare: the step's new k, v go there), new k = v [batch, kv_heads, head_dim],
    the spare slots [batch], random block tables for max_len tokens per sequence, lengths = context.
    Returns (cache, new, spare, tables, lens)."""
    import torch

    per_seq = max_len // block
    blocks = batch * per_seq
    cache = torch.randn(2, blocks + 1, block, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    new = torch.randn(batch, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    spare = torch.full((batch,), blocks * block, device="cuda")
    tables = torch.randperm(blocks, device="cuda").view(batch, per_seq).int()
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    return cache, new, spare, tables, lens
