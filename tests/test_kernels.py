"""The Triton paged-decode kernel against a float32 torch reference (TRITON_INTERPRET=1 on CPU)."""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
HERE = os.path.dirname(__file__)


def in_interpreter(code: str) -> str:
    """Run `code` in a child process under TRITON_INTERPRET=1 (it must be set before triton is
    imported), with this folder importable; return its stdout, failing the test on an error."""
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r)\n" % HERE + code],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return out.stdout


def check_cases(name: str, cases: str, tol: float, then: str = "") -> None:
    """Every case of `cases` (a list in this module) through `name`: error below tol, in the interpreter;
    then `then` (more code, silent) in the same process."""
    stdout = in_interpreter(
        f"from test_kernels import {name}, {cases}\n"
        f"for case in {cases}:\n"
        f"    err = {name}(*case)\n"
        f"    print(case, err)\n"
        f"    assert err < {tol}, (case, err)\n" + then)
    assert stdout.count("\n") == len(globals()[cases])


def reference(q, k_cache, v_cache, tables, lens, scale):
    out = torch.zeros_like(q, dtype=torch.float32)
    bs = k_cache.shape[1]
    for b, n in enumerate(lens.tolist()):
        if n == 0:
            continue
        blocks = tables[b, : -(-n // bs)]
        k = k_cache[blocks].flatten(0, 1)[:n].float()  # [n, KV, D]
        v = v_cache[blocks].flatten(0, 1)[:n].float()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        att = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", att.softmax(-1), v)
    return out


def run_case(batch, kv_heads, group, dim, block_size, max_len, splits, rope=False, dtype=torch.float32, device="cpu",
             seed=0, prefetch=None):
    """Max error of the kernel's output and of its cache writes against the torch reference
    (with rope: q and the new k are rotated by the kernel, as the model's Rotary would)."""
    from ptp.kernels.paged_attention import paged_decode
    from ptp.models.llama import _rotate

    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    max_blocks = -(-max_len // block_size)
    num_blocks = batch * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    # k and v as the model hands them over: views into one [B, 2 * KV * D] projection output
    k_new, v_new = torch.randn(batch, 2 * kv_heads * dim, generator=g).to(dtype).view(batch, 2, kv_heads, dim).unbind(1)
    lens = torch.randint(1, max_len + 1, (batch,), generator=g)
    lens[0] = max_len
    if batch > 2:
        lens[-1] = 0                     # a padded row
        lens[1] = block_size * 2 + 1     # the new token opens a block
    perm = torch.randperm(num_blocks, generator=g)   # random physical blocks
    tables = perm[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    scratch = int(perm[-1]) * block_size
    slots = torch.tensor([int(tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else scratch
                          for b, n in enumerate(lens.tolist())])
    cos_sin = None
    q_ref, k_ref = q, k_new
    if rope:
        freqs = torch.outer(torch.arange(max_len).float(), 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        pos = (lens - 1).clamp(min=0)
        cos, sin = cos_sin[pos].unsqueeze(1).chunk(2, dim=-1)
        q_ref, k_ref = _rotate(q, cos, sin), _rotate(k_new, cos, sin)
    # reference: write the new k, v, then attend over the cache
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    assert batch == 1 or not k_new.is_contiguous()
    ref_k.view(-1, kv_heads, dim)[slots] = k_ref
    ref_v.view(-1, kv_heads, dim)[slots] = v_new
    scale = dim ** -0.5
    want = reference(q_ref.float(), ref_k.float(), ref_v.float(), tables.long(), lens, scale)
    kc, vc = k_cache.to(device), v_cache.to(device)
    got = paged_decode(q.to(device), k_new.to(device), v_new.to(device), slots.to(device), kc, vc,
                       tables.to(device), lens.to(device, torch.int32), scale, splits,
                       cos_sin=cos_sin.to(device) if rope else None, prefetch=prefetch)
    cache_err = max((kc.cpu() - ref_k).abs().max().item(), (vc.cpu() - ref_v).abs().max().item())
    return max((got.float().cpu() - want).abs().max().item(), cache_err)


CASES = [  # batch, kv heads, GQA group, head dim, block size, max length, splits, rope, (dtype, device, seed,) prefetch
    (3, 2, 1, 64, 16, 50, 1, False),
    (4, 1, 4, 64, 16, 100, 3, True),
    (2, 2, 8, 128, 16, 130, 4, False),
    (3, 1, 4, 128, 8, 37, 2, True),
    (3, 2, 2, 64, 32, 90, 2, False),  # row 1 has 65 tokens: its second 64-token chunk is only the new one
    (2, 2, 4, 64, 16, 300, 2, True),  # 5 chunks dealt to 2 splits: split 0 takes chunks 0, 2 and 4
    (2, 1, 8, 64, 16, 200, 1, False),  # one split walks all 4 chunks
]
# the same with chunks dealt in turn and each split's first read ahead (before the PDL wait, on a GPU);
# with 8 splits over at most 304 tokens the chunks are 32 tokens: 10 of them, split 0 takes 0 and 8
CASES += [case + (torch.float32, "cpu", 0, True) for case in CASES + [(3, 2, 4, 64, 16, 300, 8, True)]]


def test_paged_decode_kernel_matches_reference_in_interpreter():
    check_cases("run_case", "CASES", 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dim", [64, 128])
def test_paged_decode_kernel_on_gpu(group, dim):
    for batch, max_len, splits, rope in [(1, 4096, 16, True), (8, 1000, 4, False), (64, 600, 1, True),
                                         (128, 2000, 8, True)]:
        for prefetch in (False, True):
            err = run_case(batch, 8 // group if group < 8 else 1, group, dim, 16, max_len, splits, rope,
                           dtype=torch.bfloat16, device="cuda", prefetch=prefetch)
            assert err < 2e-2, (batch, max_len, prefetch, err)


def backend_case(seed=0):
    """The triton backend's decode step against the torch backend's: outputs and cache writes."""
    from ptp.attention.meta import DecodeMeta
    from ptp.attention.torch_sdpa import TorchAttention
    from ptp.attention.triton_backend import TritonAttention
    from ptp.kv_cache import KVCache

    g = torch.Generator().manual_seed(seed)
    layers, blocks, bs, kv, d, batch = 2, 12, 4, 2, 64, 3
    caches = []
    for _ in range(2):
        c = KVCache(layers, blocks + 1, bs, kv, d, torch.float32, "cpu")
        caches.append(c)
    caches[0].data.copy_(torch.randn(caches[0].data.shape, generator=g))
    caches[1].data.copy_(caches[0].data)
    lens = torch.tensor([9, 4, 1], dtype=torch.int32)
    tables = torch.tensor([[3, 7, 1], [5, 0, 0], [9, 0, 0]], dtype=torch.int32)
    slots = torch.tensor([int(tables[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens.tolist())])
    meta = DecodeMeta(slots, tables, lens)
    q = torch.randn(batch, 8, d, generator=g)
    k, v = torch.randn(batch, 2, kv, d, generator=g).unbind(1)
    errors = []
    from ptp.models.llama import _rotate
    freqs = torch.outer(torch.arange(16).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    cos, sin = cos_sin[(lens - 1).long()].unsqueeze(1).chunk(2, dim=-1)
    for layer in range(layers):  # layer 1: the triton kernel applies RoPE itself
        q_rot, k_rot = (_rotate(q, cos, sin), _rotate(k, cos, sin)) if layer == 1 else (q, k)
        want = TorchAttention(caches[0], None).forward(meta, layer, q_rot, k_rot, v)
        got = TritonAttention(caches[1], None).forward(meta, layer, q, k, v, cos_sin if layer == 1 else None)
        errors.append((got - want).abs().max().item())
    errors.append((caches[0].data - caches[1].data).abs().max().item())
    return max(errors)


def test_triton_backend_matches_torch_backend_in_interpreter():
    in_interpreter("from test_kernels import backend_case\n"
                   "err = backend_case()\n"
                   "assert err < 1e-4, err\n")


SKINNY_CASES = [  # rows, N, K, bias, block_n, block_k
    (1, 40, 256, False, 8, 64),
    (1, 37, 200, True, 16, 64),     # N and K not multiples of the tile
    (2, 24, 128, False, 4, 32),
    (3, 19, 96, True, 8, 64),       # 3 rows, padded to 4
    (4, 64, 192, False, 32, 64),
    (1, 9, 300, True, 1, 512),      # one tile wider than K
]


def skinny_case(rows, n, k, bias, block_n, block_k, dtype=torch.float32, device="cpu", seed=0):
    """Max relative error of the skinny matmul against a float64 x @ w.T + b."""
    from ptp.kernels.skinny_gemm import skinny_linear

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    got = skinny_linear(x.to(device), w.to(device), b.to(device) if bias else None, block_n, block_k)
    assert got.shape == (rows, n) and got.dtype == dtype
    return ((got.double().cpu() - want).abs().max() / want.abs().max()).item()


def test_skinny_gemm_matches_float64_in_interpreter():
    check_cases("skinny_case", "SKINNY_CASES", 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 3])
def test_skinny_gemm_on_gpu(rows):
    """Real 8B shapes through the default tile; fp32 on two of them; then every tile on offer."""
    from ptp.kernels.skinny_gemm import configs_for

    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (1000, 1000)]:
        for dtype, tol in [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)]:
            if dtype == torch.float32 and n not in (1000, 4096):
                continue
            err = skinny_case(rows, n, k, n == 1000, None, None, dtype=dtype, device="cuda")
            assert err < tol, (rows, n, k, dtype, err)
    for block_n, block_k, _, _ in configs_for(rows):  # every tile the tuner may choose, K a multiple of none
        err = skinny_case(rows, 1000, 14000, True, block_n, block_k, dtype=torch.bfloat16, device="cuda")
        assert err < 1e-2, (rows, block_n, block_k, err)


NORM_CASES = [  # rows, dim, residual, dtype
    (1, 100, True, torch.float32), (2, 256, False, torch.float32), (1, 4096, True, torch.float32),
    (1, 100, True, torch.bfloat16), (3, 128, False, torch.bfloat16),
]


def norm_case(rows, dim, residual, dtype, device="cpu", seed=0):
    """Max relative error of ptp's RMSNorm kernel (with the residual add) against the model's RMSNorm."""
    from ptp.kernels.rms_norm import add_rms_norm
    from ptp.models.llama import RMSNorm

    g = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(rows, dim, generator=g).to(dtype) for _ in range(2))
    norm = RMSNorm(dim, 1e-5).to(dtype)
    norm.weight.data = torch.randn(dim, generator=g).to(dtype)
    with torch.no_grad():
        want = _reference_norm(norm, x, r if residual else None)
    got, new_r = add_rms_norm(x.to(device), r.to(device) if residual else None, norm.weight.to(device), 1e-5)
    assert got.dtype == dtype and (new_r is None) == (not residual)
    errors = [((got.cpu().float() - want[0].float()).abs().max() / want[0].float().abs().max()).item()]
    if residual:
        errors.append((new_r.cpu().float() - want[1].float()).abs().max().item() / want[1].float().abs().max().item())
    return max(errors)


def _reference_norm(norm, x, residual):
    """The model's RMSNorm arithmetic, in torch on CPU (not through ptp's kernel)."""
    if residual is not None:
        x = x + residual
    h = x.float()
    out = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)
    return out, x


def test_rms_norm_kernel_matches_model_in_interpreter():
    # bf16 within one rounding step: the interpreter truncates float32 -> bfloat16 (the GPU rounds to
    # nearest, and its test below asks for equality)
    # and float32 to within rounding (one interpreter process for both)
    check_cases("norm_case", "NORM_CASES", 0.02, then="import torch\n"
                                                      "err = norm_case(1, 256, True, torch.float32)\n"
                                                      "assert err < 1e-6, err\n")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rms_norm_kernel_on_gpu():
    for case in NORM_CASES + [(1, 4096, True, torch.bfloat16), (1, 8192, False, torch.bfloat16)]:
        err = norm_case(*case, device="cuda")
        assert err < (1e-6 if case[3] == torch.float32 else 0.005), (case, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pdl_chain_in_a_cuda_graph_on_gpu():
    """A batch-1 layer's worth of PDL-launched kernels (norm -> projection -> norm -> gate_up, SwiGLU ->
    down projection, each reading the one before), 20 times over in one CUDA graph: the same values
    as the same kernels launched one by one without capture."""
    from ptp.kernels.rms_norm import add_rms_norm
    from ptp.kernels.skinny_gemm import skinny_linear

    g = torch.Generator(device="cuda").manual_seed(0)
    d, inter = 4096, 14336
    w_up = torch.randn(2 * inter, d, device="cuda", generator=g, dtype=torch.bfloat16) / d ** 0.5
    w_down = torch.randn(d, inter, device="cuda", generator=g, dtype=torch.bfloat16) / inter ** 0.5
    w_o = torch.randn(d, d, device="cuda", generator=g, dtype=torch.bfloat16) / d ** 0.5
    nw = torch.rand(d, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    x0 = torch.randn(1, d, device="cuda", generator=g, dtype=torch.bfloat16)

    def chain(x):
        h, res = add_rms_norm(x, torch.zeros_like(x), nw, 1e-5)
        for _ in range(20):
            h = skinny_linear(h, w_o)
            h, res = add_rms_norm(h, res, nw, 1e-5)
            gate, up = skinny_linear(h, w_up).chunk(2, dim=-1)
            h = skinny_linear(torch.nn.functional.silu(gate) * up, w_down)
            h, res = add_rms_norm(h, res, nw, 1e-5)
        return h

    want = chain(x0.clone())
    torch.cuda.synchronize()
    static_x = x0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(static_x)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)


SKINNY_MODEL = """
import torch, ptp
import ptp.kernels.skinny_gemm as sg
from helpers import ptp_logits, rel_err
import ptp.kernels.rms_norm as rn
calls, norms = [], []
kernel, norm_kernel = sg.skinny_linear, rn.add_rms_norm
# A 64x64 tile: the interpreter runs each program as Python, and its default 4-column tile makes 100
# programs of the vocabulary projection alone. With 64 columns every projection still spans several
# programs or masks its last one (389 vocabulary rows), and the 128-wide down projection still walks K.
sg.skinny_linear = lambda *a, **k: calls.append(1) or kernel(*a, **{"block_n": 64, "block_k": 64, **k})
rn.add_rms_norm = lambda *a, **k: norms.append(1) or norm_kernel(*a, **k)
folder, prompt, ref_tokens, ref_logits = torch.load(REFERENCE)
llm = ptp.LLM(str(folder), dtype="float32", device="cpu", torch_compile="on", torch_compile_prefill="off",
              cuda_graph_max_bs=4)  # the decode step compiled; the prefill eager (its compile adds nothing here)
err = max(rel_err(g, r) for g, r in zip(ptp_logits(llm, prompt, ref_tokens), ref_logits))
out = llm.generate([prompt], ptp.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].token_ids
print(len(calls), len(norms), err, out == ref_tokens)
assert calls and norms and err <= 1e-4 and out == ref_tokens, (len(calls), err, out, ref_tokens)
"""


def test_model_through_skinny_gemm_in_interpreter(ckpt_root, tmp_path):
    """Batch-1 decode steps, compiled, with every projection through the skinny kernel's custom op
    and every norm through ptp's norm kernel: logits and greedy tokens still equal transformers'."""
    from helpers import hf_greedy, hf_model, make_checkpoint, tokenizer

    # the model and transformers' answer are made here: the interpreter's process only runs ptp
    folder = make_checkpoint(ckpt_root, "qwen2")   # qkv bias: the bias path too
    prompt = tokenizer().encode("Paris is the capital of")
    reference = tmp_path / "reference.pt"
    torch.save((str(folder), prompt, *hf_greedy(hf_model(folder), prompt, 5)), reference)
    in_interpreter(f"REFERENCE = {str(reference)!r}\n" + SKINNY_MODEL)


def test_skinny_choices_round_trip_through_the_machine_cache(tmp_path, monkeypatch):
    import ptp.ops as ops
    import ptp.parallel.comm as comm

    monkeypatch.setattr(comm, "machine_cache_file", lambda kind: tmp_path / f"{kind}.json")
    offered = list(ops._offered(1))  # as a cache entry holds it (JSON)
    monkeypatch.setattr(ops, "_CHOICE", {"(1, 4096)x(4096, 4096) bfloat16 pdl": {
        "config": [8, 512, 4, 1], "skinny_us": 7.6, "skinny_tile": [8, 512, 4, 1], "torch_us": 9.5,
        "tiles": {"8x512x4x1": 7.6}, "offered": offered}})
    comm.save_machine_cache("skinny-gemm", ops._CHOICE)
    assert comm.load_machine_cache("skinny-gemm") == ops._CHOICE
    # entries another version of ptp wrote (other fields, a tile of another length, a choice among
    # other tiles) are measured again
    assert ops._valid_choice(ops._CHOICE["(1, 4096)x(4096, 4096) bfloat16 pdl"], 1)
    assert ops._valid_choice({"config": None, "torch_us": 9.5, "offered": offered}, 1)
    for stale in [{"skinny": True}, {"config": [4, 1024, 4, 1, 0], "offered": offered},
                  {"config": "4x1024", "offered": offered}, None, {"config": [8, 512, 4, 1]},
                  {"config": [8, 512, 4, 1], "offered": offered[:-1]}]:
        assert not ops._valid_choice(stale, 1)
    (tmp_path / "skinny-gemm.json").write_text("{not json")
    assert comm.load_machine_cache("skinny-gemm") == {}  # a damaged cache is measured again, not an error


def hopper_ptx(fn, pointers: dict, constexprs: dict, floats=(), num_warps=4, num_stages=3) -> str:
    """Compile a Triton kernel for an H100/H200 (sm_90) on this machine, GPU or not: the PTX.

    The interpreter runs kernels as Python, so it misses what only the compiler rejects (a loop-carried
    variable that changes type, say) and what only the compiled code shows (where loads are issued)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("s_"):  # strides: Triton specialises those divisible by 16, as real ones are
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages}).asm["ptx"]


def _before_wait(ptx: str) -> str:
    return ptx.split("griddepcontrol.wait")[0]


@pytest.mark.parametrize("prefetch", [False, True])
def test_decode_kernel_compiles_for_hopper_and_reads_ahead_only_with_prefetch(prefetch):
    from ptp.kernels.paged_attention import _decode_merge, _decode_partial

    for dtype, rope, one_split in [("bf16", True, False), ("bf16", False, True), ("fp32", True, False)]:
        pointers = dict(Q=dtype, KN=dtype, VN=dtype, SLOTS="i64", K=dtype, V=dtype, BT="i32", LENS="i32",
                        O="fp32", M="fp32", L="fp32", COS_SIN="fp32", OUT=dtype, SEQ="i32")
        ptx = hopper_ptx(_decode_partial, pointers, dict(
            GROUP=4, GROUP_PAD=16, D=128, BLOCK_SIZE=16, TOKENS=32 if prefetch else 64, IEEE=dtype == "fp32",
            ROPE=rope, USE_PDL=True, PREFETCH=prefetch, ONE_SPLIT=one_split, FIXED_SPLIT=False, HAS_SEQ=False,
            WRITE_ONLY=False), floats=("scale",))
        # the first chunk's keys and values (vector loads) are requested before the wait, or none is
        wide_loads_before = _before_wait(ptx).count("ld.global.v4")
        assert (wide_loads_before >= 2) if prefetch else (wide_loads_before == 0), (dtype, rope, wide_loads_before)
        assert "st.global" not in _before_wait(ptx)
    ptx = hopper_ptx(_decode_merge, dict(O="fp32", M="fp32", L="fp32", OUT="bf16"),
                     dict(SPLITS_PAD=16, D=128, USE_PDL=True))
    assert "ld.global" not in _before_wait(ptx)  # everything it reads comes from the kernel before


def test_skinny_and_norm_kernels_compile_for_hopper():
    from ptp.kernels.rms_norm import _add_rms_norm
    from ptp.kernels.skinny_gemm import _skinny_mm, configs_for

    for block_n, block_k, warps, stages in configs_for(1):
        ptx = hopper_ptx(_skinny_mm, dict(X="bf16", W="bf16", B="bf16", Y="bf16"), dict(
            ROWS=1, HAS_BIAS=False, EVEN_K=True, USE_PDL=True, BLOCK_N=block_n, BLOCK_K=block_k),
            num_warps=warps, num_stages=stages)
        before = _before_wait(ptx)
        assert "ld.global" in before and "st.global" not in before  # weights ahead, no write before the wait
    ptx = hopper_ptx(_add_rms_norm, dict(X="bf16", R="bf16", W="bf16", OUT="bf16", NEW_R="bf16"),
                     dict(HAS_RESIDUAL=True, BLOCK=4096, USE_PDL=True), floats=("eps",))
    assert "st.global" not in _before_wait(ptx)


def prefill_case(kv_heads, group, dim, block_size, starts, query_lens, window=None, seed=0, dtype=torch.float32,
                 device="cpu"):
    """The triton backend's paged prefill (PTP_PAGED_PREFILL=1) against the torch backend's padded SDPA
    on the same step: rows of the given starts and query lengths, scattered blocks; outputs and caches."""
    from ptp.attention.meta import PrefillMeta
    from ptp.attention.torch_sdpa import TorchAttention
    from ptp.attention.triton_backend import TritonAttention
    from ptp.kv_cache import KVCache

    g = torch.Generator().manual_seed(seed)
    heads, tokens = kv_heads * group, sum(query_lens)
    need = [-(-(s + n) // block_size) for s, n in zip(starts, query_lens)]
    blocks = sum(need) + 5
    perm = torch.randperm(blocks, generator=g).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at: at + n])
        at += n
    slots = torch.tensor([tables[b][p // block_size] * block_size + p % block_size
                          for b, (s, n) in enumerate(zip(starts, query_lens)) for p in range(s, s + n)], device=device)
    caches = [KVCache(1, blocks, block_size, kv_heads, dim, dtype, device) for _ in range(2)]
    caches[0].data.copy_(torch.randn(caches[0].data.shape, generator=g))
    caches[1].data.copy_(caches[0].data)
    q = torch.randn(tokens, heads, dim, generator=g).to(device, dtype)
    k, v = torch.randn(tokens, 2, kv_heads, dim, generator=g).to(device, dtype).unbind(1)
    meta = PrefillMeta.build(starts, query_lens, tables, slots, block_size, window, device)
    assert not meta.causal
    want = TorchAttention(caches[0], window).forward(meta, 0, q, k, v)
    import ptp.kernels.paged_prefill as kernel

    launches, launch = [], kernel.paged_prefill
    kernel.paged_prefill = lambda *args, **kw: launches.append(args) or launch(*args, **kw)
    before = os.environ.get("PTP_PAGED_PREFILL")
    os.environ["PTP_PAGED_PREFILL"] = "1"
    try:
        got = TritonAttention(caches[1], window).forward(meta, 0, q, k, v)
    finally:
        kernel.paged_prefill = launch
        if before is None:
            os.environ.pop("PTP_PAGED_PREFILL")
        else:
            os.environ["PTP_PAGED_PREFILL"] = before
    assert len(launches) == 1 and got.shape == want.shape  # the step went through the kernel
    # the kernel again, with query tiles of 16 tokens whatever the group (more tiles per row)
    again = launch(q, *caches[1].layer(0), meta.block_tables, meta.q_offsets, meta.q_lens, meta.q_starts,
                   meta.q_index.shape[1], dim ** -0.5, window, block_q=16)
    return max((got.float() - want.float()).abs().max().item(), (again.float() - want.float()).abs().max().item(),
               (caches[0].data.float() - caches[1].data.float()).abs().max().item())


PREFILL_CASES = [  # kv heads, GQA group, head dim, block size, starts, query lengths, sliding window
    # from 0, inside a block, at a block boundary; rows longer than one 16-token query tile and shorter
    (2, 4, 64, 16, [0, 21, 32], [40, 5, 17], None),
    (2, 1, 64, 16, [0, 7, 48, 3], [70, 9, 2, 33], None),  # 1:1: 64-token query tiles, row 0 spans two
    (1, 4, 32, 8, [13, 0, 40], [30, 12, 25], 20),          # sliding window shorter than the context
    (2, 2, 32, 16, [100], [19], 64),                       # one chunk after a cached prefix, window
]


def test_paged_prefill_kernel_matches_padded_sdpa_in_interpreter():
    check_cases("prefill_case", "PREFILL_CASES", 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("group", [1, 4, 8])
def test_paged_prefill_kernel_on_gpu(group):
    starts, lens = [0, 2048, 37, 512, 16], [300, 128, 90, 1, 513]
    for window in (None, 1000):
        err = prefill_case(8 // group if group < 8 else 1, group, 128, 16, starts, lens, window,
                           dtype=torch.bfloat16, device="cuda")
        assert err < 3e-2, (group, window, err)


def test_paged_prefill_kernel_compiles_for_hopper():
    from ptp.kernels.paged_prefill import _prefill_fwd

    pointers = dict(Q="bf16", K="bf16", V="bf16", O="bf16", BT="i32", Q_OFF="i32", Q_LEN="i32", START="i32")
    for group, window in [(4, False), (1, True)]:
        ptx = hopper_ptx(_prefill_fwd, pointers, dict(
            GROUP=group, GROUP_PAD=group, D=128, BLOCK_SIZE=16, BLOCK_Q=max(16, 64 // group), BLOCK_N=64,
            WINDOW=window, IEEE=False), floats=("scale",), num_stages=2)
        assert "mma" in ptx and "st.global" in ptx, group  # the dots on tensor cores
