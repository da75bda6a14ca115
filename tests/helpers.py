"""Tiny random checkpoints written with transformers, with a tokenizer trained on the spot."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Tensor parallelism splits every layer across several GPUs.",
    "def add(a, b):\n    return a + b\n",
    "Héllo wörld, naïve café — 日本語 and emoji 🚀 too.",
    "1234567890 + 42 = 1234567932",
] * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 389  # not a multiple of 2, 3 or 4: vocabulary shards are uneven


@functools.lru_cache(maxsize=1)
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


ARCHS = {
    "llama": dict(cls="LlamaConfig", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(cls="MistralConfig", sliding_window=None),
    "qwen2": dict(cls="Qwen2Config"),
    "qwen3": dict(cls="Qwen3Config", head_dim=16),
}
# Mixtures of experts (tests/test_moe.py): 8 experts, so that --ep 2 and 4 place them evenly; expert
# widths divisible by 4; Qwen2-MoE with a dense layer (mlp_only_layers) beside its sparse one.
MOE_ARCHS = {
    "mixtral": dict(cls="MixtralConfig", num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                    sliding_window=None),
    "qwen2_moe": dict(cls="Qwen2MoeConfig", num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_hidden_layers=3, mlp_only_layers=[1],
                      norm_topk_prob=False),
    "qwen3_moe": dict(cls="Qwen3MoeConfig", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                      head_dim=16, norm_topk_prob=True),
}


def make_checkpoint(root: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny random `arch` model (4 heads, 2 KV heads unless overridden) with its tokenizer."""
    import transformers

    spec = dict(ARCHS[arch] if arch in ARCHS else MOE_ARCHS[arch])
    cls = getattr(transformers, spec.pop("cls"))
    tok = tokenizer()
    fields = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.2,
    )
    fields.update(spec)
    fields.update(overrides)
    config = cls(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # visible norm weights and biases, so that a wrong load shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    folder = root / f"{arch}-{seed}-{abs(hash(tuple(sorted(map(str, overrides.items()))))) % 10**6}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def hf_model(folder: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the last-position logits before each one, by full recompute (no cache).

    A causal model's logits at position i see only the ids up to i, so one forward over the prompt
    and the tokens gives every step's logits at once. transformers' cache only proposes the tokens;
    the forward checks each is its logits' argmax, and from a token that is not, proposes again."""
    ids, end = list(prompt), len(prompt) + steps
    while True:
        seq = ids + _cached_greedy(model, ids, end - len(ids))
        logits = model(torch.tensor([seq[:-1]]), use_cache=False).logits[0, len(prompt) - 1:].float()
        best = logits.argmax(-1).tolist()
        wrong = [i for i in range(len(ids) - len(prompt), steps) if best[i] != seq[len(prompt) + i]]
        if not wrong:
            return seq[len(prompt):], list(logits)
        ids = seq[:len(prompt) + wrong[0]] + [best[wrong[0]]]


def _cached_greedy(model, ids: list[int], steps: int) -> list[int]:
    out, past, x = [], None, torch.tensor([ids])
    for _ in range(steps):
        # the cache is the 4th argument and the output's 2nd field: transformers renamed it
        logits, past = model(x, None, None, past, use_cache=True, return_dict=False)[:2]
        out.append(int(logits[0, -1].argmax()))
        x = torch.tensor([[out[-1]]])
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def ptp_logits(llm, prompt: list[int], continuation: list[int]) -> list[torch.Tensor]:
    """ptp's logits after the prompt (one prefill) and after each continuation token (decode steps)."""
    from ptp.step import StepBatch

    engine = llm.engine
    alloc = engine.scheduler.allocator
    table: list[int] = []
    alloc.grow(table, len(prompt) + len(continuation))
    try:
        # copies: a step's logits are valid until the next step
        out = [engine.execute(StepBatch([list(prompt)], [0], [table], [True]))[0].clone()]
        for i, tok in enumerate(continuation[:-1]):
            out.append(engine.execute(StepBatch([[tok]], [len(prompt) + i], [table], [True]))[0].clone())
        return out
    finally:
        alloc.release(table)
