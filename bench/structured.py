"""Structured outputs' cost: output tokens/s of a batch where every request has a JSON schema against
the same batch unconstrained, and batch-1 inter-token latency with and without a schema (same run).

    python bench/structured.py --model llama-3.1-8b --load-format dummy --num-prompts 256 --output-len 256

Every request generates exactly --output-len tokens: the schema is one long free string, so a
constrained output is cut by length as an unconstrained one is (with ignore_eos), and the two
modes do the same work apart from the masks. The grammar is built from the model's tokenizer;
a config-only folder (dummy weights, no tokenizer) gets a synthetic byte-level one of the model's
vocabulary size (256 byte tokens, the rest multi-character words), written to a temporary folder.
"""
from __future__ import annotations

import time

from common import build_llm, engine_parser, print_table, random_prompts, write_json

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def synthetic_tokenizer(config: "Path") -> str:
    """A folder (the model's config.json beside it) with a byte-level BPE tokenizer of the model's vocabulary
    size (no merges: each word is a token of its own)."""
    import json
    import shutil
    import tempfile

    vocab_size = json.loads(config.read_text())["vocab_size"]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    words = ["{", "}", '"', ":", ",", "text", '{"', '":', '"}'] + [f"w{i}" for i in range(vocab_size)]
    for w in words:
        if len(vocab) >= vocab_size - 1:
            break
        vocab.setdefault(w, len(vocab))
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    folder = tempfile.mkdtemp(prefix="ptp-bench-tok-")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    shutil.copy(config, folder)
    return folder


def main() -> None:
    from ptp.log import setup_logging

    setup_logging()
    parser = engine_parser(__doc__)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    ns = parser.parse_args()
    import ptp
    from ptp.structured import grammar_for

    from pathlib import Path

    from common import resolve_config_path

    folder = Path(resolve_config_path(ns.model) or ns.model)
    if ns.tokenizer is None and folder.is_dir() and not any((folder / f).exists() for f in
                                                           ("tokenizer.json", "tokenizer.model")):
        ns.tokenizer = synthetic_tokenizer(folder / "config.json")
    llm, args = build_llm(ns)
    prompts = random_prompts(ns.num_prompts, ns.input_len, llm.engine.config.vocab_size, seed=1)
    grammar = grammar_for(json_schema=SCHEMA)
    modes = {"unconstrained": dict(ignore_eos=True), "json_schema": dict(grammar=grammar)}
    rows = []
    for name, extra in modes.items():
        params = ptp.SamplingParams(temperature=1.0, max_tokens=ns.output_len, seed=None, **extra)
        llm.generate(prompts[:4], params, use_tqdm=False)  # warm up (and build the grammar's tokenizer)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        n_out = sum(len(o.token_ids) for o in outs)
        one = ptp.SamplingParams(temperature=1.0, max_tokens=ns.output_len, **extra)
        start = time.perf_counter()
        single = llm.generate(prompts[:1], one, use_tqdm=False)[0]
        itl = (time.perf_counter() - start) / max(1, len(single.token_ids))
        rows.append({"label": ns.label, "mode": name, "tp": args.tp, "prompts": ns.num_prompts,
                     "output_tokens": n_out, "output_tok_s": n_out / seconds, "batch1_itl_ms": itl * 1e3})
    base, constrained = rows
    constrained["vs_unconstrained_tok_s"] = constrained["output_tok_s"] / base["output_tok_s"]
    constrained["vs_unconstrained_itl"] = constrained["batch1_itl_ms"] / base["batch1_itl_ms"]
    print_table(rows, list(constrained))
    write_json(ns.json, rows)
    llm.shutdown()


if __name__ == "__main__":
    main()
