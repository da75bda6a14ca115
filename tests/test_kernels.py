"""The Triton paged-decode kernel against a float32 torch reference (TRITON_INTERPRET=1 on CPU)."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
HERE = os.path.dirname(__file__)


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


def run_case(batch, kv_heads, group, dim, block_size, max_len, splits, dtype=torch.float32, device="cpu", seed=0):
    from ptp.kernels.paged_attention import paged_decode

    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    num_blocks = batch * (-(-max_len // block_size)) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device, dtype)
    q = torch.randn(batch, heads, dim, generator=g).to(device, dtype)
    lens = torch.randint(1, max_len + 1, (batch,), generator=g)
    lens[0] = max_len
    if batch > 2:
        lens[-1] = 0                     # a padded row
        lens[1] = block_size * 2 + 1     # ends just past a block boundary
    perm = torch.randperm(num_blocks, generator=g)   # random physical blocks
    max_blocks = -(-max_len // block_size)
    tables = perm[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    scale = dim ** -0.5
    got = paged_decode(q, k_cache, v_cache, tables.to(device), lens.to(device, torch.int32), scale, splits)
    want = reference(q.cpu().float(), k_cache.cpu().float(), v_cache.cpu().float(), tables.long(), lens, scale)
    return (got.float().cpu() - want).abs().max().item()


CASES = [  # batch, kv heads, GQA group, head dim, block size, max length, splits
    (3, 2, 1, 64, 16, 50, 1),
    (4, 1, 4, 64, 16, 100, 3),
    (2, 2, 8, 128, 16, 130, 4),
    (3, 1, 4, 128, 8, 37, 2),
]


def test_paged_decode_kernel_matches_reference_in_interpreter():
    """Runs in a child process: TRITON_INTERPRET must be set before triton is imported."""
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from test_kernels import run_case, CASES\n"
        "for case in CASES:\n"
        "    err = run_case(*case)\n"
        "    print(case, err)\n"
        "    assert err < 1e-4, (case, err)\n"
    ) % HERE
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.count("\n") == len(CASES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dim", [64, 128])
def test_paged_decode_kernel_on_gpu(group, dim):
    for batch, max_len, splits in [(1, 4096, 16), (8, 1000, 4), (64, 600, 1)]:
        err = run_case(batch, 8 // group if group < 8 else 1, group, dim, 16, max_len, splits,
                       dtype=torch.bfloat16, device="cuda")
        assert err < 2e-2, (batch, max_len, err)
