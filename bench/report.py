"""Tables and a plot from the JSON lines that the bench scripts write (run here, after a GPU run).

    python bench/report.py docs/results/latency.jsonl --plot docs/decode_tokens_per_s.png
    python bench/report.py "new.jsonl=this session" "old.jsonl=second session" --plot out.png

A file may carry a name after "=": the plot's lines then say which file they come from.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from common import print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--plot", default=None, help="PNG: decode tokens/s against batch size, a line per tp")
    ns = parser.parse_args()
    rows = []
    for spec in ns.files:
        path, _, source = spec.partition("=")
        rows += [{**json.loads(line), "source": source} for line in open(path) if line.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    print_table(rows, ["label", "tp", "batch", "input_len", "ms_per_step", "graph_ms", "tokens_per_s",
                       "pct_of_limit", "ttft_ms", "launch_to_first_token_s"])
    if ns.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lines = defaultdict(list)
        for r in rows:
            if r["label"] in ("compiled", "tuned", "compiled-ctx512"):
                source = f" ({r['source']})" if r["source"] else ""
                lines[f"ptp tp={r['tp']}{source}"].append((r["batch"], r["tokens_per_s"]))
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.plot([1, 16, 64], [15.7, 265, 1046], marker="x", linestyle="--", label="transformers generate")
        ax.plot([1], [185.7], marker="s", linestyle="", label="gpt-fast tp=1")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("Llama-3.1-8B shape, bf16, H200 (dummy weights)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(ns.plot, dpi=120)
        print(f"wrote {ns.plot}")


if __name__ == "__main__":
    main()
