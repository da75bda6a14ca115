"""ptp against Hugging Face transformers on the same weights: logits and greedy tokens, fp32, tp=1."""
import pytest
import torch

import ptp
from helpers import ARCHS, hf_greedy, hf_model, make_checkpoint, ptp_logits, rel_err, tokenizer

PROMPT = "Paris is the capital of"
CASES = [(arch, {}) for arch in ARCHS] + [
    ("llama", {"num_key_value_heads": 4}),          # MHA
    ("qwen2", {"tie_word_embeddings": True}),       # tied embeddings
    ("mistral", {"sliding_window": 8}),            # sliding window shorter than the run
]


@pytest.mark.parametrize("arch,overrides", CASES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x)) or "base")
def test_logits_and_greedy_match_transformers(ckpt_root, arch, overrides):
    folder = make_checkpoint(ckpt_root, arch, **overrides)
    ref = hf_model(folder)
    prompt = tokenizer().encode(PROMPT)
    ref_tokens, ref_logits = hf_greedy(ref, prompt, 32)

    llm = ptp.LLM(str(folder), dtype="float32", device="cpu")
    got = ptp_logits(llm, prompt, ref_tokens)
    assert len(got) == 32
    errors = [rel_err(g, r) for g, r in zip(got, ref_logits)]
    assert max(errors) <= 1e-4, f"relative errors per step: {errors}"

    out = llm.generate([prompt], ptp.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert out.token_ids == ref_tokens
    assert out.finish_reason == "length"


def test_bf16_runs_and_mostly_agrees(ckpt_root):
    folder = make_checkpoint(ckpt_root, "llama")
    prompt = tokenizer().encode(PROMPT)
    ref_tokens, _ = hf_greedy(hf_model(folder), prompt, 8)
    llm = ptp.LLM(str(folder), dtype="bfloat16", device="cpu")
    assert llm.engine.runner.model.lm_head.weight.dtype == torch.bfloat16
    out = llm.generate([prompt], ptp.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids[:2] == ref_tokens[:2]


def test_dummy_weights_have_real_shapes(ckpt_root):
    folder = make_checkpoint(ckpt_root, "qwen3")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    llm = ptp.LLM(str(folder), load_format="dummy", device="cpu")
    assert llm.engine.runner.model.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    out = llm.generate("Paris", ptp.SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("mistral", {"sliding_window": 8}), ("qwen3", {})],
                         ids=["llama", "mistral-window", "qwen3"])
def test_flex_backend_equals_torch_backend(ckpt_root, arch, overrides):
    """--attention-backend flex: logits of prefill (whole and chunked) and decode equal the torch
    backend's, and so do greedy tokens of a batch."""
    folder = make_checkpoint(ckpt_root, arch, **overrides)
    prompt = tokenizer().encode(PROMPT)
    ref_tokens, ref_logits = hf_greedy(hf_model(folder), prompt, 16)
    prompts = [PROMPT, "Tensor parallelism splits the heads", "a"]
    outs = {}
    for backend in ("torch", "flex"):
        llm = ptp.LLM(str(folder), dtype="float32", device="cpu", attention_backend=backend, chunked_prefill_size=5)
        assert llm.engine.runner.attention.name == backend
        errors = [rel_err(g, r) for g, r in zip(ptp_logits(llm, prompt, ref_tokens), ref_logits)]
        assert max(errors) <= 1e-4, (backend, errors)
        outs[backend] = [o.token_ids for o in llm.generate(
            prompts, ptp.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
    assert outs["flex"] == outs["torch"]


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_mixed_step_equals_the_padded_prefill_step(backend):
    """A step of decodes and prompt chunks: its decode rows go through the decode path (MixedMeta);
    outputs and cache writes equal those of the whole step through the padded prefill path."""
    from ptp.attention import MixedMeta, PrefillMeta, make_backend, step_meta
    from ptp.attention.meta import Bound
    from ptp.kv_cache import KVCache

    g = torch.Generator().manual_seed(0)
    block, kv, heads, dim = 4, 2, 4, 16
    starts, lens = [5, 0, 9, 3, 2], [1, 6, 1, 4, 1]  # rows 0, 2, 4 decode; rows 1, 3 bring prompt chunks
    perm = torch.randperm(30, generator=g).tolist()
    tables = [perm[6 * i: 6 * i + -(-(s + n) // block)] for i, (s, n) in enumerate(zip(starts, lens))]
    slots = torch.tensor([t[p // block] * block + p % block for t, s, n in zip(tables, starts, lens)
                          for p in range(s, s + n)])
    tokens = sum(lens)
    q = torch.randn(tokens, heads, dim, generator=g)
    k, v = torch.randn(2, tokens, kv, dim, generator=g).unbind(0)
    caches = [KVCache(1, 31, block, kv, dim, torch.float32, "cpu") for _ in range(2)]
    caches[0].data.copy_(torch.randn(caches[0].data.shape, generator=g))
    caches[1].data.copy_(caches[0].data)
    no_rope = lambda positions, q, k: (q, k)  # noqa: E731
    padded = PrefillMeta.build(starts, lens, tables, slots, block, None, "cpu")
    want = Bound(make_backend(backend, caches[0], None, torch.device("cpu")), padded)(0, q, k, v, no_rope, None)
    mixed = step_meta(starts, lens, tables, slots, block, None, "cpu")
    assert isinstance(mixed, MixedMeta) and mixed.decode_tokens.tolist() == [0, 7, 12]
    got = Bound(make_backend(backend, caches[1], None, torch.device("cpu")), mixed)(0, q, k, v, no_rope, None)
    assert (got - want).abs().max().item() < 1e-5
    assert torch.equal(caches[0].data, caches[1].data)
    # a step of one kind only keeps its own metadata
    assert type(step_meta([3, 4], [1, 1], tables[:2], slots[:2], block, None, "cpu")).__name__ == "DecodeMeta"
    assert isinstance(step_meta([0], [6], tables[1:2], slots[1:7], block, None, "cpu"), PrefillMeta)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("lens", [[11], [11, 3, 6]])
def test_prompts_from_position_0_attend_causally_without_the_cache(window, lens):
    """Prompts from position 0 (no sliding window) are plain causal attention over their own k, v (one
    prompt as it comes, several padded to the longest); the result equals the general path (gather
    from the cache, boolean mask); a chunk after position 0, beside others or not, or a window take
    the general path."""
    from ptp.attention import PrefillMeta, make_backend
    from ptp.attention.meta import Bound
    from ptp.kv_cache import KVCache

    g = torch.Generator().manual_seed(1)
    block, kv, heads, dim = 4, 2, 4, 16
    tables = [[5, 2, 7], [9], [0, 8]]
    slots = torch.tensor([tables[b][p // block] * block + p % block for b, n in enumerate(lens) for p in range(n)])
    tokens = sum(lens)
    q = torch.randn(tokens, heads, dim, generator=g)
    k, v = torch.randn(2, tokens, kv, dim, generator=g).unbind(0)
    meta = PrefillMeta.build([0] * len(lens), lens, tables[:len(lens)], slots, block, window, "cpu")
    assert meta.causal == (window is None)
    assert not PrefillMeta.build([4], [7], tables[:1], slots[4:11], block, None, "cpu").causal
    assert not PrefillMeta.build([0, 4], [11, 7], [tables[0], tables[0]], torch.cat([slots[:11], slots[4:11]]),
                                 block, None, "cpu").causal
    no_rope = lambda positions, q, k: (q, k)  # noqa: E731
    outs, caches = [], []
    for causal in (meta.causal, False):
        cache = KVCache(1, 10, block, kv, dim, torch.float32, "cpu")
        meta.causal = causal
        outs.append(Bound(make_backend("torch", cache, window, torch.device("cpu")), meta)(0, q, k, v, no_rope, None))
        caches.append(cache.data)
    assert outs[0].shape == (tokens, heads, dim) and outs[0].is_contiguous()
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5
    assert torch.equal(caches[0], caches[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's varlen form runs on CUDA")
def test_prompts_from_position_0_attend_packed_cuda(monkeypatch):
    """On the GPU, prompts from position 0 attend packed as they come (flash attention's varlen form,
    grouped k, v heads as the 8B shape has them); the result equals SDPA over the prompts padded to the
    longest, and a float32 reference prompt by prompt."""
    import torch.nn.functional as F

    from ptp.attention import PrefillMeta, make_backend, torch_sdpa
    from ptp.attention.meta import Bound
    from ptp.kv_cache import KVCache

    g = torch.Generator(device="cuda").manual_seed(3)
    block, kv, heads, dim, lens = 16, 8, 32, 128, [37, 200, 1, 64, 129]
    tables = [[b * 16 + i for i in range(-(-n // block))] for b, n in enumerate(lens)]
    slots = torch.tensor([tables[b][p // block] * block + p % block for b, n in enumerate(lens) for p in range(n)],
                         device="cuda")
    q, k, v = (torch.randn(sum(lens), h, dim, generator=g, device="cuda", dtype=torch.bfloat16)
               for h in (heads, kv, kv))
    meta = PrefillMeta.build([0] * len(lens), lens, tables, slots, block, None, "cuda")
    assert meta.causal and torch_sdpa.varlen_fits(q)
    no_rope = lambda positions, q, k: (q, k)  # noqa: E731
    called, varlen = [], torch_sdpa.varlen_causal
    monkeypatch.setattr(torch_sdpa, "varlen_causal", lambda *a: called.append(1) or varlen(*a))
    outs = []
    for packed in (True, False):
        monkeypatch.setattr(torch_sdpa, "varlen_fits", lambda q, packed=packed: packed)
        cache = KVCache(1, 16 * len(lens), block, kv, dim, torch.bfloat16, "cuda")
        outs.append(Bound(make_backend("torch", cache, None, torch.device("cuda")), meta)(0, q, k, v, no_rope, None))
    assert called == [1], "the packed path did not run"
    assert outs[0].shape == (sum(lens), heads, dim) and outs[0].is_contiguous()
    ref, first = [], 0
    for n in lens:
        qs, ks, vs = (t[first: first + n].float().transpose(0, 1) for t in (q, k, v))
        ref.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True).transpose(0, 1))
        first += n
    ref = torch.cat(ref)
    for out in outs:
        assert (out.float() - ref).abs().max().item() < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's varlen form runs on CUDA")
def test_chunks_after_position_0_attend_packed_cuda():
    """On the GPU, a prefill step with rows past position 0 (later chunks, cached prefixes) beside
    whole prompts attends through flash attention's varlen form over each row's keys read from the
    cache by slot; it equals the general path (padded copy of the cache, boolean mask), and so does
    the cache it leaves."""
    from ptp.attention import PrefillMeta, make_backend
    from ptp.attention.meta import Bound
    from ptp.kv_cache import KVCache

    g = torch.Generator(device="cuda").manual_seed(4)
    block, kv, heads, dim = 16, 8, 32, 128
    starts, lens = [0, 100, 0, 700, 5, 16], [37, 200, 1, 64, 129, 1]
    need = [-(-(s + n) // block) for s, n in zip(starts, lens)]
    perm = torch.randperm(sum(need), generator=torch.Generator().manual_seed(0)).tolist()
    tables = [perm[sum(need[:b]): sum(need[:b + 1])] for b in range(len(need))]
    slots = torch.tensor([tables[b][p // block] * block + p % block for b, (s, n) in enumerate(zip(starts, lens))
                          for p in range(s, s + n)], device="cuda")
    q, k, v = (torch.randn(sum(lens), h, dim, generator=g, device="cuda", dtype=torch.bfloat16)
               for h in (heads, kv, kv))
    meta = PrefillMeta.build(starts, lens, tables, slots, block, None, "cuda")
    assert not meta.causal and meta.k_slots is not None
    assert meta.k_slots.shape[0] == sum(s + n for s, n in zip(starts, lens))
    prefix = torch.randn(1, sum(need), block, 2, kv, dim, generator=g, device="cuda").to(torch.bfloat16)
    no_rope = lambda positions, q, k: (q, k)  # noqa: E731
    outs, caches = [], []
    for packed in (True, False):
        cache = KVCache(1, sum(need), block, kv, dim, torch.bfloat16, "cuda")
        cache.data.copy_(prefix.view_as(cache.data))
        meta.k_slots = meta.k_slots if packed else None
        outs.append(Bound(make_backend("torch", cache, None, torch.device("cuda")), meta)(0, q, k, v, no_rope, None))
        caches.append(cache.data)
    assert outs[0].shape == (sum(lens), heads, dim) and outs[0].is_contiguous()
    assert (outs[0].float() - outs[1].float()).abs().max().item() < 2e-2
    assert torch.equal(caches[0], caches[1])


@pytest.mark.parametrize("starts", [[0, 0, 0, 0], [0, 9, 0, 30]], ids=["from-0", "past-0"])
def test_packed_prefill_feeds_varlen_the_right_rows(monkeypatch, starts):
    """The packed prefill path's plumbing on CPU: with torch's varlen call replaced by a reference (per
    sequence, causal rule aligned to the end of its keys, as flash attention's is), the queries' and
    keys' offsets, and the keys read from the cache by slot, give the general path's result. The
    GPU tests (`*_packed_cuda`) check flash attention itself."""
    import numpy as np
    import torch.nn.functional as F

    from ptp.attention import PrefillMeta, make_backend, torch_sdpa
    from ptp.attention.meta import Bound, key_slots
    from ptp.kv_cache import KVCache

    def reference(q, k, v, cu_q, cu_k, longest_q, longest_k, window_size, **_):
        assert window_size == (-1, 0) and cu_q.dtype == cu_k.dtype == torch.int32
        assert longest_q >= int((cu_q[1:] - cu_q[:-1]).max()) and longest_k >= int((cu_k[1:] - cu_k[:-1]).max())
        out = []
        for b in range(len(cu_q) - 1):
            qs, ks, vs = q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]
            allowed = torch.ones(len(qs), len(ks), dtype=torch.bool).tril(len(ks) - len(qs))
            out.append(F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                                      attn_mask=allowed, enable_gqa=True).transpose(0, 1))
        return torch.cat(out)

    g = torch.Generator().manual_seed(5)
    block, kv, heads, dim, lens = 4, 2, 4, 16, [5, 7, 1, 12]
    need = [-(-(s + n) // block) for s, n in zip(starts, lens)]
    tables = [list(range(sum(need[:b]), sum(need[:b + 1]))) for b in range(len(lens))]
    slots = torch.tensor([tables[b][p // block] * block + p % block for b, (s, n) in enumerate(zip(starts, lens))
                          for p in range(s, s + n)])
    q = torch.randn(sum(lens), heads, dim, generator=g)
    k, v = torch.randn(2, sum(lens), kv, dim, generator=g).unbind(0)
    prefix = torch.randn(1, 2, sum(need), block, kv, dim, generator=g)
    meta = PrefillMeta.build(starts, lens, tables, slots, block, None, "cpu")
    if not meta.causal:  # built on CUDA only: here by hand
        padded_tables = np.array([t + [0] * (max(need) - len(t)) for t in tables])
        meta.k_slots = torch.from_numpy(key_slots(padded_tables, np.array(starts) + np.array(lens), block))
    no_rope = lambda positions, q, k: (q, k)  # noqa: E731
    outs = []
    for packed in (True, False):
        monkeypatch.setattr(torch_sdpa, "varlen_fits", lambda q, packed=packed: packed)
        monkeypatch.setattr(torch_sdpa, "varlen_attn", reference)
        cache = KVCache(1, sum(need), block, kv, dim, torch.float32, "cpu")
        cache.data.copy_(prefix)
        outs.append(Bound(make_backend("torch", cache, None, torch.device("cpu")), meta)(0, q, k, v, no_rope, None))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def test_key_slots_follow_the_block_tables():
    """PrefillMeta.k_slots: each row's keys 0 .. start + query length - 1, row after row, through its table."""
    import numpy as np

    from ptp.attention.meta import key_slots

    tables = np.array([[5, 2, 7], [9, 0, 0], [1, 8, 0]])
    key_lens = np.array([9, 3, 5])
    want = [t[p // 4] * 4 + p % 4 for t, n in zip(tables.tolist(), key_lens) for p in range(n)]
    assert key_slots(tables, key_lens, 4).tolist() == want


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_op_matches_its_fake(causal):
    """torch.library.opcheck: the prefill op's real output has the sizes and strides its fake promises
    (inductor asserts them on the GPU). On CPU, SDPA's output follows its query's layout, so a
    transposed causal output that failed on an H200 passes here: the GPU check is bench/check_gpu.py."""
    from ptp.attention import PrefillMeta, make_backend
    from ptp.attention.meta import prefill_attention
    from ptp.kv_cache import KVCache

    g = torch.Generator().manual_seed(2)
    block, kv, heads, dim, n = 4, 2, 4, 16, 6
    table = [3, 1]
    slots = torch.tensor([table[p // block] * block + p % block for p in range(n)])
    meta = PrefillMeta.build([0], [n], [table], slots, block, None, "cpu")
    backend = make_backend("torch", KVCache(1, 5, block, kv, dim, torch.float32, "cpu"), None, torch.device("cpu"))
    backend.causal_prefill = causal
    q = torch.randn(n, heads, dim, generator=g)
    k, v = torch.randn(2, n, kv, dim, generator=g).unbind(0)
    args = (q, k, v, meta.slot_mapping, meta.block_tables, meta.q_index, meta.out_index, meta.mask, 0, backend.key,
            meta.q_rows)
    assert prefill_attention(*args).is_contiguous()
    torch.library.opcheck(prefill_attention, args, test_utils=("test_schema", "test_faketensor"))
