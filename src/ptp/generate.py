"""`python -m ptp.generate`: offline generation from the command line (also under torchrun).

    python -m ptp.generate --chat "What is the capital of France?"
    torchrun --nproc-per-node 2 -m ptp.generate --model ./ckpt --prompt "Hello" --max-tokens 32
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ptp.args import EngineArgs
from ptp.errors import PtpError
from ptp.log import setup_logging


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ptp.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", action="append", default=[], help="a plain prompt (repeatable)")
    group.add_argument("--chat", action="append", default=[], help="a user message, sent with the chat template (repeatable)")
    group.add_argument("--max-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=-1)
    group.add_argument("--ignore-eos", action="store_true")
    EngineArgs.add_cli_args(parser.add_argument_group("engine"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    setup_logging()
    ns = parse(argv)
    from ptp import LLM, SamplingParams

    try:
        args = EngineArgs.from_cli(ns)
        if not ns.prompt and not ns.chat:
            ns.chat = ["What is the capital of France?"]
        params = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                                max_tokens=ns.max_tokens, ignore_eos=ns.ignore_eos)
        llm = LLM(**{k: v for k, v in vars(args).items()})
        prompts = list(ns.prompt) + [llm.encode_chat([{"role": "user", "content": m}]) for m in ns.chat]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
    except PtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for shown, out in zip(list(ns.prompt) + list(ns.chat), outputs):
        print(f"> {shown}\n{out.text}\n")
    tokens = sum(len(o.token_ids) for o in outputs)
    print(f"[{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s, tp={llm.engine.args.tp if llm.engine else args.tp}, dp={args.dp_size}]")
    ranks = getattr(getattr(llm.engine, "d", None), "world_size", 1)
    llm.shutdown()
    if ranks > 1:
        # rank 0 of several (torchrun) ends as the other ranks do (ranks.follow): without interpreter
        # teardown, where gloo's destructors, run after the process group is gone, have aborted a
        # process that had finished its work (SIGABRT, "terminate called without an active exception")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
