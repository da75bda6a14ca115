"""Build a model on `meta`, split it with its TP plan, and fill each rank's shard from the checkpoint.

No rank ever materialises another rank's slice: safetensors slices are read with `get_slice`,
straight onto the target device. GGUF tensors are de-quantized one at a time and sliced.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack

import torch
from torch import nn

from ptp.config import ModelConfig
from ptp.errors import ModelNotFoundError, UnsupportedModelError
from ptp.hub import ModelFiles, open_gguf
from ptp.models.llama import MERGED
from ptp.models.moe import EXPERT_TENSORS, EXPERT_TENSORS_DEFAULT, ExpertPlacement
from ptp.models.registry import model_class
from ptp.parallel.plans import apply_tp, kv_heads_per_model, localize

log = logging.getLogger("ptp")


def load_model(config: ModelConfig, files: ModelFiles | None, *, dtype: torch.dtype, device: torch.device,
               tp_mesh, load_format: str, max_positions: int, seed: int = 0, stage=None) -> nn.Module:
    """stage (parallel/p2p.Stage): under pipeline parallelism, only that stage's layers are built and read."""
    tp = 1 if tp_mesh is None else tp_mesh.size()
    rank = 0 if tp_mesh is None else tp_mesh.get_local_rank()
    cls, plan = model_class(config)
    extra = {"placement": ExpertPlacement.for_rank(config, rank, tp)} if config.num_experts else {}
    with torch.device("meta"):
        model = cls(config, num_kv_heads=kv_heads_per_model(config, tp), max_positions=max_positions, **extra).to(dtype)
    if stage is not None and stage.count > 1:
        model.keep_stage(stage.layers, stage.first, stage.last)
    if tp > 1:
        apply_tp(model, tp_mesh, plan(config) if stage is None or stage.count == 1 else _stage_plan(model, plan(config)))
    local_bytes = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    if load_format == "dummy":
        log.info("filling %.2f GiB of random weights per rank (--load-format dummy)", local_bytes / 2**30)
    else:
        log.info("loading %.2f GiB of weights per rank from %s%s", local_bytes / 2**30, files.name,
                 " (de-quantizing the GGUF tensors)" if files.gguf_file is not None else "")
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.tie_weights()  # .to() and to_empty() make a new tensor per module
    model.model.rotary.init_buffers()
    with ExitStack() as stack:
        source = _source(files, load_format, stack, device)
        checkpoint_name = getattr(model, "checkpoint_name", lambda n: n)
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param.data
            module, _, leaf = name.rpartition(".")
            with torch.no_grad():
                if source is None:
                    _fill_dummy(name, local, seed * 1000 + rank)
                elif module.endswith(".experts"):
                    placement = model.get_submodule(module).placement
                    local.copy_(_checked(_read_experts(source, config, checkpoint_name(module), leaf, placement),
                                         name, local.shape))
                else:
                    local.copy_(_read_shard(source, config, checkpoint_name(name), param, local.shape, rank, tp))
    if tp > 1:
        localize(model, rank, tp)
    model.eval().requires_grad_(False)
    return model


def _source(files: ModelFiles | None, load_format: str, stack: ExitStack, device):
    if load_format == "dummy":
        return None
    if files.gguf_file is not None:
        return GGUFSource(open_gguf(files.gguf_file))
    if load_format == "gguf":
        raise ModelNotFoundError(f"--load-format gguf needs a .gguf file, got the folder {files.folder}.")
    return SafetensorsSource(files, stack, device)


class SafetensorsSource:
    def __init__(self, files: ModelFiles, stack: ExitStack, device: torch.device):
        from safetensors import safe_open

        # Slices are read from the file straight onto the device (no full copy in host memory).
        device = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
        self.handles = {}
        for path in files.safetensors_files():
            handle = stack.enter_context(safe_open(str(path), framework="pt", device=device))
            for key in handle.keys():
                self.handles[key] = handle

    def has(self, name: str) -> bool:
        return name in self.handles

    def shape(self, name: str) -> list[int]:
        return self.handles[name].get_slice(name).get_shape()

    def rows(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        piece = self.handles[name].get_slice(name)
        if dim is None:
            return piece[:]
        index = [slice(None)] * len(piece.get_shape())
        index[dim] = slice(start, stop)
        return piece[tuple(index)]

    def block(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.handles[name].get_slice(name)[index]


class GGUFSource:
    def __init__(self, gguf):
        self.gguf = gguf

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def shape(self, name: str) -> list[int]:
        return [int(d) for d in reversed(self.gguf.tensors[name].shape)]

    def rows(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        full = self.gguf.tensor(name)
        return full if dim is None else full.narrow(dim, start, stop - start)

    def block(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.gguf.tensor(name)[index]


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _shard_dim(param) -> int | None:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return None
    shards = [p.dim for p in param.placements if isinstance(p, Shard)]
    return shards[0] if shards else None


def _read_shard(source, config: ModelConfig, name: str, param, local_shape, rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of parameter `name`; merged projections are built from their parts' slices."""
    dim = _shard_dim(param)
    module, _, leaf = name.rpartition(".")
    parent, _, short = module.rpartition(".")
    if short in MERGED:
        tensor = torch.cat([_read_part(source, config, f"{parent}.{part}.{leaf}", dim, rank, tp)
                            for part in MERGED[short]], dim=0)
    else:
        tensor = _read_part(source, config, name, dim, rank, tp)
    return _checked(tensor, name, local_shape)


def _checked(tensor: torch.Tensor, name: str, local_shape) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(local_shape):
        raise UnsupportedModelError(
            f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint (this rank's slice) but the "
            f"model expects {tuple(local_shape)}; does config.json match the weights?"
        )
    return tensor


def _stage_plan(model: nn.Module, plan: dict) -> dict:
    """The plan for the modules a pipeline stage's model holds, by their full names (a pattern would also
    reach the places of the layers other stages hold)."""
    from fnmatch import fnmatch

    names = [name for name, _ in model.named_modules()]
    return {name: style for key, style in plan.items() for name in names
            if fnmatch(name, key) and name.count(".") == key.count(".")}


def _tied_head(source, config: ModelConfig, name: str) -> str:
    """A tied lm_head on a last pipeline stage that has no embedding reads the embedding's tensor."""
    if name == "lm_head.weight" and config.tie_word_embeddings and not source.has(name):
        return "model.embed_tokens.weight"
    return name


def _read_experts(source, config: ModelConfig, prefix: str, leaf: str, placement: ExpertPlacement) -> torch.Tensor:
    """This rank's experts (placement.first ...) and its slice of their width, for `w13` (gate rows
    then up rows) or `w2`, from one tensor per expert (the Hub's layout: `{prefix}.E.gate_proj.weight`)
    or from stacked ones (`{prefix}.gate_up_proj` [experts, 2 * width, hidden], `{prefix}.down_proj`).
    Other ranks' experts are never read."""
    width = config.moe_intermediate_size // placement.slices
    lo, hi = placement.slice_index * width, (placement.slice_index + 1) * width
    experts = range(placement.first, placement.first + placement.count)
    gate, up, down = EXPERT_TENSORS.get(config.architecture, EXPERT_TENSORS_DEFAULT)
    if source.has(f"{prefix}.{placement.first}.{gate}.weight"):
        def one(e: int, part: str, dim: int) -> torch.Tensor:
            name = f"{prefix}.{e}.{part}.weight"
            if not source.has(name):
                raise UnsupportedModelError(f"the checkpoint has no tensor {name!r}, which {config.architecture} needs.")
            return source.rows(name, dim, lo, hi)
        if leaf == "w13":
            return torch.stack([torch.cat([one(e, gate, 0), one(e, up, 0)]) for e in experts])
        return torch.stack([one(e, down, 1) for e in experts])
    stacked = f"{prefix}.gate_up_proj" if leaf == "w13" else f"{prefix}.down_proj"
    if not source.has(stacked):
        raise UnsupportedModelError(
            f"the checkpoint has neither {prefix}.{placement.first}.{gate}.weight (one tensor per expert) nor "
            f"{stacked} (experts stacked), which {config.architecture} needs.")
    span = slice(experts.start, experts.stop)
    if leaf == "w13":
        full = config.moe_intermediate_size
        return torch.cat([source.block(stacked, (span, slice(lo, hi))),
                          source.block(stacked, (span, slice(full + lo, full + hi)))], dim=1)
    return source.block(stacked, (span, slice(None), slice(lo, hi)))


def _read_part(source, config: ModelConfig, name: str, dim: int | None, rank: int, tp: int) -> torch.Tensor:
    name = _tied_head(source, config, name)
    if not source.has(name):
        raise UnsupportedModelError(f"the checkpoint has no tensor {name!r}, which {config.architecture} needs.")
    if dim is None:
        return source.rows(name, None, 0, 0)
    if _is_kv_projection(name) and tp > config.num_kv_heads:
        # KV heads replicated: rank r holds checkpoint head r // (tp // kv_heads), whole.
        head = rank // (tp // config.num_kv_heads)
        return source.rows(name, 0, head * config.head_dim, (head + 1) * config.head_dim)
    full = source.shape(name)[dim]
    chunk = -(-full // tp)
    start = min(rank * chunk, full)
    return source.rows(name, dim, start, min(start + chunk, full))


def _is_kv_projection(name: str) -> bool:
    return ".k_proj." in name or ".v_proj." in name


def _fill_dummy(name: str, local: torch.Tensor, seed: int) -> None:
    if "norm" in name:
        local.fill_(1.0)
        return
    gen = torch.Generator(device=local.device)
    gen.manual_seed(seed + sum(map(ord, name)))
    local.normal_(0.0, 0.02, generator=gen)
