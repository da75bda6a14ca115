"""The Hugging Face transformers baseline: `generate` (eager, default cache) on the same model shape, random
weights, measured as bench/latency.py measures ptp (decode ms per step = (time of N tokens - time of 1) / (N - 1)).

    python bench/hf_generate.py --model llama-3.1-8b --batch-sizes 1,16,64 --input-len 128 --output-len 128
"""
from __future__ import annotations

import argparse
import time

import torch

from common import print_table, random_prompts, resolve_config_path, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b", help="a folder with config.json, or a name in bench/configs")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--label", default="")
    ns = parser.parse_args()
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = transformers.AutoConfig.from_pretrained(resolve_config_path(ns.model))
    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, ns.dtype)).eval()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = []
    for bs in [int(b) for b in ns.batch_sizes.split(",")]:
        ids = torch.tensor(random_prompts(bs, ns.input_len, config.vocab_size, seed=bs), device=device)
        _timed(model, ids, 2)  # warm up
        prefill = min(_timed(model, ids, 1) for _ in range(2))
        total = min(_timed(model, ids, ns.output_len) for _ in range(2))
        step = (total - prefill) / (ns.output_len - 1)
        rows.append({"engine": f"transformers {transformers.__version__}", "label": ns.label, "device": name,
                     "tp": 1, "batch": bs, "input_len": ns.input_len, "output_len": ns.output_len,
                     "ms_per_step": step * 1e3, "tokens_per_s": bs / step, "ttft_ms": prefill * 1e3})
    print_table(rows, ["engine", "batch", "ms_per_step", "tokens_per_s", "ttft_ms"])
    write_json(ns.json, rows)


@torch.inference_mode()
def _timed(model, ids: torch.Tensor, new_tokens: int) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if ids.is_cuda:
        torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
