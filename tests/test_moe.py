"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers, at tp=1, tp>1 and with
--ep; each rank reads only its experts; the fused MoE kernel against a float32 per-expert reference."""
import pytest
import torch

import ptp
from helpers import MOE_ARCHS, hf_greedy, hf_model, make_checkpoint, ptp_logits, rel_err, tokenizer

PROMPT = "Tensor parallelism splits every layer"


@pytest.fixture(scope="module")
def reference(ckpt_root):
    """Per architecture: checkpoint, transformers' 32 greedy tokens and its logits before each."""
    out = {}
    prompt = tokenizer().encode(PROMPT)
    for arch in MOE_ARCHS:
        folder = make_checkpoint(ckpt_root, arch, seed=5)
        tokens, logits = hf_greedy(hf_model(folder), prompt, 32)
        assert len(set(tokens)) > 4, tokens  # a model that repeats one token would hide routing errors
        out[arch] = (folder, tokens, logits)
    return out


def _check_against_transformers(llm, reference_entry, steps: int = 32):
    """Logits and greedy tokens of the first `steps` of the reference's 32 (greedy: a prefix of them)."""
    folder, tokens, logits = reference_entry
    tokens, logits = tokens[:steps], logits[:steps]
    assert len(set(tokens)) > 4, tokens  # routing errors must be able to show
    prompt = tokenizer().encode(PROMPT)
    errors = [rel_err(g, r) for g, r in zip(ptp_logits(llm, prompt, tokens), logits)]
    assert len(errors) == steps and max(errors) <= 1e-4, errors
    assert llm.generate([prompt], ptp.SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))[0].token_ids \
        == tokens


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_moe_equals_transformers(reference, arch):
    _check_against_transformers(ptp.LLM(str(reference[arch][0]), dtype="float32", device="cpu"), reference[arch])


def test_moe_in_the_compiled_decode_step(reference):
    """The experts' torch path traced by torch.compile (fullgraph, static shapes per batch bucket)."""
    llm = ptp.LLM(str(reference["qwen2_moe"][0]), dtype="float32", device="cpu", torch_compile="on",
                  cuda_graph_max_bs=4)
    _check_against_transformers(llm, reference["qwen2_moe"])


@pytest.mark.slow
@pytest.mark.parametrize("arch, tp, ep", [
    ("qwen2_moe", 2, 1),   # every expert sliced in two; the shared expert and the dense layer split as a dense MLP
    ("mixtral", 2, 2),     # whole experts: four per rank
    ("qwen2_moe", 2, 2),
    ("qwen3_moe", 4, 2),   # two groups of two ranks: four experts per group, each sliced in two
])
def test_moe_tp_and_ep_equal_transformers(reference, arch, tp, ep):
    with ptp.LLM(str(reference[arch][0]), dtype="float32", device="cpu", tp=tp, ep=ep) as llm:
        _check_against_transformers(llm, reference[arch], steps=12)  # gloo ranks on two cores: fewer steps
        per_rank = llm.engine.runner.rank_weight_bytes  # equal but for the uneven vocabulary shards
        assert len(per_rank) == tp and max(per_rank) - min(per_rank) <= 0.01 * max(per_rank), per_rank


class CountingSource:
    """A checkpoint source that counts the bytes it hands out, per (tensor name, dim, first row)."""

    def __init__(self, inner):
        self.inner, self.read = inner, {}

    def has(self, name):
        return self.inner.has(name)

    def rows(self, name, dim, start, stop):
        out = self.inner.rows(name, dim, start, stop)
        self.read[name, dim, start] = self.read.get((name, dim, start), 0) + out.numel() * out.element_size()
        return out


@pytest.mark.parametrize("tp, ep", [(2, 2), (4, 2), (4, 4), (2, 1)])
def test_each_rank_reads_only_its_experts(reference, tp, ep):
    """Over the ranks of one layout, the expert bytes each rank reads (and holds) are 1/tp of all the
    experts' bytes, from its own experts only, and together they cover every expert exactly once."""
    import dataclasses
    from contextlib import ExitStack

    from ptp.config import ModelConfig
    from ptp.hub import resolve
    from ptp.loader import SafetensorsSource, _read_experts
    from ptp.models.moe import ExpertPlacement

    files = resolve(str(reference["mixtral"][0]), None, need_weights=True)
    config = dataclasses.replace(ModelConfig.from_hf(files.hf_config()), ep_size=ep)
    h, width, experts = config.hidden_size, config.moe_intermediate_size, config.num_experts
    all_bytes = experts * 3 * h * width * 4  # one layer, float32
    seen = {}
    with ExitStack() as stack:
        inner = SafetensorsSource(files, stack, torch.device("cpu"))
        for rank in range(tp):
            placement = ExpertPlacement.for_rank(config, rank, tp)
            source = CountingSource(inner)
            w13 = _read_experts(source, config, "model.layers.0.block_sparse_moe.experts", "w13", placement)
            w2 = _read_experts(source, config, "model.layers.0.block_sparse_moe.experts", "w2", placement)
            held = (w13.numel() + w2.numel()) * 4
            assert sum(source.read.values()) == held == all_bytes // tp, (rank, source.read, held)
            mine = {f".experts.{e}." for e in range(placement.first, placement.first + placement.count)}
            assert all(any(m in key[0] for m in mine) for key in source.read), (rank, placement, sorted(source.read))
            for key, n in source.read.items():
                assert key not in seen, f"rank {rank} reads {key}, which another rank read"
                seen[key] = n
    assert len({key[0] for key in seen}) == experts * 3 and sum(seen.values()) == all_bytes


def test_stacked_expert_tensors_load_too(reference, tmp_path):
    """A checkpoint with the experts stacked ({prefix}.gate_up_proj, {prefix}.down_proj, transformers'
    in-memory layout) loads to the same model as one tensor per expert."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = reference["qwen3_moe"][0]
    stacked = tmp_path / "stacked"
    shutil.copytree(folder, stacked)
    tensors = load_file(str(folder / "model.safetensors"))
    config = MOE_ARCHS["qwen3_moe"]
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts"
        parts = {p: [tensors.pop(f"{prefix}.{e}.{p}.weight") for e in range(config["num_experts"])]
                 for p in ("gate_proj", "up_proj", "down_proj")}
        tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(parts["gate_proj"], parts["up_proj"])])
        tensors[f"{prefix}.down_proj"] = torch.stack(parts["down_proj"])
    save_file(tensors, str(stacked / "model.safetensors"))
    _check_against_transformers(ptp.LLM(str(stacked), dtype="float32", device="cpu"), reference["qwen3_moe"])


def test_layouts_that_cannot_place_the_experts_are_refused(reference, ckpt_root):
    folder = reference["mixtral"][0]
    with pytest.raises(ptp.ConfigError, match=r"--ep 3 must divide --tp 4.*1, 2, 4"):
        ptp.LLM(str(folder), device="cpu", tp=4, ep=3)
    six = make_checkpoint(ckpt_root, "mixtral", seed=6, num_local_experts=6)
    with pytest.raises(ptp.ConfigError, match=r"tp=4 with --ep 4 .*6 experts cannot be placed evenly on --ep 4 ranks"):
        ptp.LLM(str(six), device="cpu", tp=4, ep=4)
    dense = make_checkpoint(ckpt_root, "llama", seed=6)
    with pytest.raises(ptp.ConfigError, match=r"--ep 2 .*LlamaForCausalLM has no experts"):
        ptp.LLM(str(dense), device="cpu", tp=2, ep=2)


# --- the fused kernel under TRITON_INTERPRET=1 ----------------------------------------------------

def kernel_case(tokens, experts, top_k, hidden, width, local=None, first=0, empty=0, seed=0, config=None):
    """Max error of kernels/fused_moe.py (and of its torch path) against a float32 per-expert loop.
    local/first: this rank holds experts [first, first + local) (expert parallelism); empty: that
    many experts get no token; config: the kernel's tile (BLOCK_M 1: the one-slot kernels)."""
    from ptp.kernels.fused_moe import fused_moe, fused_moe_torch, moe_align, moe_align_triton

    g = torch.Generator().manual_seed(seed)
    local = local or experts
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(local, 2 * width, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(local, hidden, width, generator=g) / width ** 0.5
    pool = experts - empty  # the last `empty` experts are never chosen
    ids = torch.stack([torch.randperm(pool, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    want = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(top_k):
            e = int(ids[t, j]) - first
            if 0 <= e < local:
                gate, up = (w13[e] @ x[t]).chunk(2)
                want[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    mine = ids - first
    mine = torch.where((mine >= 0) & (mine < local), mine, local)
    got = fused_moe(x, w13, w2, weights, mine, config)
    torch_path = fused_moe_torch(x, w13, w2, weights, mine)
    for block_m in (16, 32):  # the one-launch align (decode) lays out the slots as the torch one (prefill)
        if any(not torch.equal(a, b) for a, b in zip(moe_align(mine, local, block_m), moe_align_triton(mine, local, block_m))):
            return float("inf")
    scale = want.abs().max()
    return max(float((got - want).abs().max() / scale), float((torch_path - want).abs().max() / scale))


KERNEL_CASES = [  # tokens, experts, top-k, hidden, width, (local, first, empty)
    (1, 4, 1, 32, 16),
    (1, 16, 8, 64, 48),
    (5, 8, 2, 48, 40, None, 0, 5),       # 5 of 8 experts never chosen
    (17, 16, 4, 64, 24, 8, 8),           # expert parallelism: this rank holds experts 8-15
    (64, 8, 8, 32, 32),                  # every expert chosen by every token
    (33, 16, 3, 40, 16, 4, 4, 6),        # 4 local experts, some of them empty
    (64, 4, 2, 16, 16, 2, 0),
]


GEMV_CASES = [  # the one-slot-per-program kernels (BLOCK_M 1) of a few tokens; the tile last
    (1, 16, 8, 64, 48, None, 0, 0, 0, (1, 8, 16, 4, 1)),   # K not a multiple of BLOCK_K in down
    (3, 8, 2, 48, 40, None, 0, 5, 0, (1, 16, 32, 4, 1)),    # 5 of 8 experts never chosen
    (4, 16, 4, 64, 24, 8, 8, 0, 0, (1, 4, 32, 4, 1)),       # expert parallelism: experts 8-15 here
]


def router_case(tokens, experts, top_k, renormalize, ties, first=0, count=None, block_m=16, seed=0):
    """kernels/moe_router.py's route against route_torch (the model's CPU path): the same expert ids,
    weights within float32 rounding, and the slots sorted as moe_align sorts them. ties: scores
    drawn from three values, so that most top-k choices fall between equal probabilities."""
    from ptp.kernels.fused_moe import moe_align
    from ptp.kernels.moe_router import route, route_torch

    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 3, (tokens, experts), generator=g).float() if ties else torch.randn(tokens, experts, generator=g)
    count = experts if count is None else count
    weights, ids, aligned = route(logits, top_k, renormalize, torch.float32, first, count, block_m)
    want_w, want_ids = route_torch(logits, top_k, renormalize, torch.float32, first, count)
    if not torch.equal(ids.long(), want_ids):
        return float("inf")
    if aligned is not None and any(not torch.equal(a, b) for a, b in zip(aligned, moe_align(want_ids, count, block_m))):
        return float("inf")
    return float((weights - want_w).abs().max())


ROUTER_CASES = [  # tokens, experts, top-k, renormalise, ties, (first, count, BLOCK_M)
    (1, 128, 8, True, False),              # Qwen3-30B-A3B at batch 1, with the slot sort in the launch
    (1, 128, 8, False, True),
    (3, 4, 1, False, False, 0, None, 1),   # no slot sort (the one-slot kernels need none)
    (16, 8, 2, True, True, 4, 4, 32),      # Mixtral-like, expert parallelism: experts 4-7 here
    (64, 16, 8, True, True),               # past the fused sort: routing programs of ROWS tokens
    (37, 60, 4, False, False, 30, 30),
]


def test_router_and_one_slot_kernels_in_interpreter():
    """The router kernel equals route_torch (ties included), and the one-slot expert kernels equal a
    float32 per-expert loop, under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    from test_kernels import in_interpreter

    stdout = in_interpreter(
        "from test_moe import router_case, ROUTER_CASES, kernel_case, GEMV_CASES\n"
        "for case in ROUTER_CASES:\n"
        "    err = router_case(*case)\n"
        "    print(case, err)\n"
        "    assert err < 1e-6, (case, err)\n"
        "for case in GEMV_CASES:\n"
        "    err = kernel_case(*case)\n"
        "    print(case, err)\n"
        "    assert err < 1e-5, (case, err)\n")
    assert stdout.count("\n") == len(ROUTER_CASES) + len(GEMV_CASES)


def test_route_torch_is_the_reference_routing():
    """route_torch, as transformers routes (softmax in float32, top-k, renormalised or not, rounded to
    the model's dtype or not) on scores without ties; with ties, the lowest indices first."""
    from ptp.kernels.moe_router import route_torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 16, generator=g).to(torch.bfloat16) * 4
    for renormalize in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            want_w, want_ids = torch.topk(probs, 4, dim=-1)
            if renormalize:
                want_w = want_w / want_w.sum(-1, keepdim=True)
            weights, ids = route_torch(logits, 4, renormalize, dtype)
            assert torch.equal(ids, want_ids) and torch.equal(weights, want_w.to(dtype)), (renormalize, dtype)
    tied = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, 0.0, 2.0, 1.0]])
    assert route_torch(tied, 3, True, torch.float32)[1].tolist() == [[1, 3, 4]]
    assert route_torch(tied, 3, True, torch.float32, first=2, count=2)[1].tolist() == [[2, 1, 2]]


def test_fused_moe_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    from test_kernels import in_interpreter

    stdout = in_interpreter(
        "from test_moe import kernel_case, KERNEL_CASES\n"
        "for case in KERNEL_CASES:\n"
        "    err = kernel_case(*case)\n"
        "    print(case, err)\n"
        "    assert err < 1e-5, (case, err)\n")
    assert stdout.count("\n") == len(KERNEL_CASES)


def test_moe_align_pads_each_expert_to_whole_blocks():
    from ptp.kernels.fused_moe import align_capacity, moe_align

    ids = torch.tensor([[2, 0], [2, 4], [1, 2]])  # 4 = held elsewhere
    sorted_ids, experts = moe_align(ids, 4, 4)
    assert sorted_ids.shape == (align_capacity(6, 4, 4),) and experts.shape == (sorted_ids.shape[0] // 4,)
    assert sorted_ids[:12].tolist() == [1, 6, 6, 6, 4, 6, 6, 6, 0, 2, 5, 6]
    assert experts.tolist()[:3] == [0, 1, 2] and set(experts.tolist()[3:]) == {-1}
