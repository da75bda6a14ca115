"""Greedy tokens of every fast path against plain eager ptp, on a checkpoint this script writes.

For each variant (compiled + CUDA graphs, attention backends, tp=2, 4 and 8, NCCL-only all-reduce) and
each batch size (every graph bucket up to 32, padded ones included): how many prompts give
exactly the eager tp=1 tokens. bf16, so a near-tie may flip a token; the table says how often.

    python bench/check_gpu.py --tp-list 1,2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import print_table, random_prompts, write_json

BATCHES = [1, 2, 3, 4, 5, 8]  # every graph bucket up to 8, and padded ones (3, 5)


def write_checkpoint(root: Path) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, rope_theta=500000.0,
        initializer_range=0.05, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    folder = root / "llama-check"
    model.save_pretrained(folder)
    return folder


def run_variant(folder: Path, prompts_by_batch, new_tokens: int, dtype: str, margins: bool = False, **kwargs) -> dict:
    """{batch: [tokens of each prompt]}; with margins, {batch: {"tokens": ..., "margins": ...}} where a
    margin is the log-probability gap between the best and the second-best token at each step."""
    import ptp

    # 2048 tokens: the triton decode kernel then runs as at batch 1 of the 8B model (8 splits of 32-token
    # chunks dealt in turn, each split's first read ahead of the PDL wait)
    llm = ptp.LLM(str(folder), dtype=dtype, max_model_len=2048, cuda_graph_max_bs=8, num_kv_blocks=8192,
                  **kwargs)
    greedy = ptp.SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=2 if margins else None)
    out = {}
    for bs, prompts in prompts_by_batch.items():
        outs = [o.outputs[0] for o in llm.generate(prompts, greedy, use_tqdm=False)]
        tokens = [o.token_ids for o in outs]
        if margins:
            gaps = [[_gap(entry) for entry in o.logprobs] for o in outs]
            out[bs] = {"tokens": tokens, "margins": gaps}
        else:
            out[bs] = tokens
    llm.shutdown()
    return out


def compare(tokens: list[list[int]], reference: dict, near_tie: float) -> dict:
    """How many prompts give exactly the reference's tokens, how many tokens agree, and, where a prompt
    first differs, the reference's gap between its two best tokens there (small: a near-tie)."""
    ref_tokens, gaps = reference["tokens"], reference["margins"]
    same = sum(a == b for a, b in zip(tokens, ref_tokens))
    agree = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(tokens, ref_tokens))
    split = [gaps[j][next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)]
             for j, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b]
    return {"exact_prompts": f"{same}/{len(ref_tokens)}", "tokens_equal": f"{agree}/{sum(map(len, ref_tokens))}",
            "margins_where_first_differs": " ".join(f"{m:.3f}" for m in split),
            "not_near_ties": sum(m > near_tie for m in split)}


def _gap(entry: dict[int, float]) -> float:
    best = sorted(entry.values(), reverse=True)
    return best[0] - best[1] if len(best) > 1 else float("inf")


EAGER = dict(torch_compile="off", disable_cuda_graph=True)
VARIANTS = {  # "env": environment of the variant's process
    "eager tp=1, torch attention, cuBLAS, no overlap (reference)": dict(
        EAGER, attention_backend="torch", disable_overlap_schedule=True, env={"PTP_DISABLE_SKINNY_GEMM": "1"},
        margins=True),
    "eager, torch attention (skinny GEMM, overlap)": dict(EAGER, attention_backend="torch"),
    "eager, triton attention": dict(torch_compile="off", disable_cuda_graph=True, attention_backend="triton"),
    "graphs (no compile), triton": dict(torch_compile="off", attention_backend="triton"),
    "compile + graphs, triton": dict(attention_backend="triton"),
    "compile + graphs, torch attention": dict(attention_backend="torch"),
    "compile + graphs, triton, no overlap": dict(attention_backend="triton", disable_overlap_schedule=True),
    # 16 tokens per step, and prompt chunks share steps with decodes (MixedMeta: each row through its own path)
    "compile + graphs, triton, mixed steps": dict(attention_backend="triton", chunked_prefill_size=16,
                                                  enable_mixed_chunk=True),
    # the variants above compile prefill (and mixed) steps too (--torch-compile-prefill auto); this one does not
    "compile + graphs, triton, eager prefill": dict(attention_backend="triton", torch_compile_prefill="off"),
    "compile, flex attention (no graphs)": dict(attention_backend="flex"),
    "tp=2 eager, torch attention": dict(tp=2, torch_compile="off", disable_cuda_graph=True, attention_backend="torch"),
    "tp=2 compile + graphs, triton": dict(tp=2, attention_backend="triton"),
    "tp=2 compile + graphs, NCCL only": dict(tp=2, attention_backend="triton", disable_custom_all_reduce=True),
    "tp=2 compile, flex attention": dict(tp=2, attention_backend="flex"),
    "tp=2 compile + graphs, triton, eager prefill": dict(tp=2, attention_backend="triton", torch_compile_prefill="off"),
    # 4 KV heads: at tp=8 each is held by two ranks
    "tp=4 compile + graphs, triton": dict(tp=4, attention_backend="triton"),
    "tp=8 compile + graphs, triton": dict(tp=8, attention_backend="triton"),
}


def main() -> None:
    from ptp.log import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp-list", default="1")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="float32 (TF32 off) makes any difference a bug rather than a near-tie")
    parser.add_argument("--near-tie", type=float, default=0.05,
                        help="log-probability gap below which a first difference is put down to rounding")
    parser.add_argument("--only", default=None, help="run only the variants whose name contains this, or one of these (comma-separated), and the reference")
    parser.add_argument("--json", default=None)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)   # child mode
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    prompts = {bs: random_prompts(bs, 40, 8192, seed=bs, jitter=0.5) for bs in BATCHES}
    if ns.variant:  # one variant in its own process, so that a crash is its own
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        kwargs = {k: v for k, v in VARIANTS[ns.variant].items() if k != "env"}  # margins stays
        got = run_variant(Path(ns.folder), prompts, ns.new_tokens, dtype=ns.dtype, **kwargs)
        Path(ns.out).write_text(json.dumps({str(k): v for k, v in got.items()}))
        return
    tps = [int(t) for t in ns.tp_list.split(",")]
    root = Path(tempfile.mkdtemp())
    folder = write_checkpoint(root)
    results = {}
    for name, kwargs in VARIANTS.items():
        is_reference = name == next(iter(VARIANTS))  # always runs
        if not is_reference and (kwargs.get("tp", 1) not in tps or (ns.only and not any(part in name for part in ns.only.split(",")))):
            continue
        out = root / "out.json"
        proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--variant", name, "--folder",
                               str(folder), "--out", str(out), "--new-tokens", str(ns.new_tokens),
                               "--dtype", ns.dtype], env={**os.environ, **kwargs.get("env", {})})
        results[name] = json.loads(out.read_text()) if proc.returncode == 0 else f"exit status {proc.returncode}"
        out.unlink(missing_ok=True)
    reference = results.pop(next(iter(VARIANTS)))
    rows = []
    for name, got in results.items():
        for bs in BATCHES:
            if isinstance(got, str) or isinstance(reference, str):
                rows.append({"variant": name, "batch": bs, "exact_prompts": got if isinstance(got, str) else reference})
                continue
            rows.append({"variant": name, "batch": bs, **compare(got[str(bs)], reference[str(bs)], ns.near_tie)})
    print(f"reference: eager tp=1, torch attention, {ns.dtype}; {ns.new_tokens} greedy tokens per prompt; "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; a difference where the reference's two best tokens were "
          f"more than {ns.near_tie} apart (log-probability) counts as not a near-tie")
    print_table(rows, ["variant", "batch", "exact_prompts", "tokens_equal", "margins_where_first_differs",
                       "not_near_ties"])
    write_json(ns.json, rows)


if __name__ == "__main__":
    main()
