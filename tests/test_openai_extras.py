"""Prompt logprobs (ptp.LLM and the completions `echo`), checked against Hugging Face transformers."""
from __future__ import annotations

import pytest
import torch

import ptp
from helpers import hf_model, make_checkpoint, tokenizer


@pytest.fixture(scope="module")
def folder(ckpt_root):
    return make_checkpoint(ckpt_root, "llama", seed=3)


@torch.no_grad()
def hf_prompt_logprobs(model, prompt: list[int]) -> list[float]:
    logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    return [float(logp[i - 1, prompt[i]]) for i in range(1, len(prompt))]


PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, and Berlin",
           "def add(a, b):\n    return a + b\n" * 3]


@pytest.mark.parametrize("kwargs", [{}, {"chunked_prefill_size": 7, "block_size": 4}])
def test_prompt_logprobs_equal_transformers(folder, kwargs):
    """Every prompt token's logprob (None for the first), also with prompts split into chunks and a
    prefix cache that holds the same prompt (a request asking for prompt logprobs takes no cached blocks)."""
    model = hf_model(folder)
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", **kwargs)
    llm.generate(PROMPTS, ptp.SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)  # fills the cache
    outs = llm.generate(PROMPTS, ptp.SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2), use_tqdm=False)
    for out in outs:
        ids = out.prompt_token_ids
        lps = out.prompt_logprobs
        assert len(lps) == len(ids) and lps[0] is None
        want = hf_prompt_logprobs(model, ids)
        got = [lps[i][ids[i]] for i in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
        assert all(len(e) >= 2 for e in lps[1:])  # the token's own and the top 2 (which may include it)
    plain = llm.generate(PROMPTS[:1], ptp.SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert plain[0].prompt_logprobs is None
    llm.shutdown()
