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
