"""Workloads for the serving bench, as token ids (the server takes token-id prompts; no tokenizer needed)."""
from __future__ import annotations

import random


def shared_prefix(conversations: int, turns: int, system_tokens: int, user_tokens: int = 64,
                  answer_tokens: int = 128, vocab: int = 32000, seed: int = 0) -> list[list[list[int]]]:
    """Chat conversations that share one system prompt: [conversation][turn] -> prompt token ids.

    Turn t of a conversation is the system prompt, then the earlier turns' user messages and answers,
    then its own user message, so each turn's prompt extends the previous one. The answers are fixed
    random tokens standing for the assistant's earlier replies (the model's own replies are not fed
    back), so a prefix cache holds of turn t + 1 what turn t's prompt left there: the system prompt and
    the history up to turn t's last whole block. Send a conversation's turns one after another, the
    conversations side by side."""
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(100, vocab - 100) for _ in range(n)]  # noqa: E731
    system = draw(system_tokens)
    out = []
    for _ in range(conversations):
        history, prompts = list(system), []
        for turn in range(turns):
            history += draw(user_tokens)
            prompts.append(list(history))
            history += draw(answer_tokens)
        out.append(prompts)
    return out


def chat_lengths(n: int, seed: int = 0, max_prompt: int = 2048, max_output: int = 1024) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of n requests shaped like ShareGPT chat traffic: both lengths
    drawn from log-normal distributions (medians 120 and 122 tokens, log-sigmas 1.1 and 1.05: most
    requests short, a long tail), clipped to [4, max_prompt] and [4, max_output]. The means come out
    near 220 prompt and 200 output tokens, those of ShareGPT conversations under a Llama tokenizer.
    A fixed seed gives the same requests in every run."""
    import math

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = min(max_prompt, max(4, round(math.exp(rng.gauss(math.log(120), 1.1)))))
        output = min(max_output, max(4, round(math.exp(rng.gauss(math.log(122), 1.05)))))
        out.append((prompt, output))
    return out
