"""Markdown tables and the decode plot from the JSON lines of bench/suite.py (or of one bench script).

    python bench/report.py out/results.jsonl --plot docs/decode_tokens_per_s.png
    python bench/report.py "docs/results/decode_sweep.jsonl=2026-11-24" "peers.jsonl=2026-12-01" --plot out.png

A file may carry a name after "=": its rows' lines in the plot say it. One table per kind of figure
("bench" in each row: decode, prefill, throughput, serving, attention, gemm, allreduce, check), each
followed by the device, dates, commits and commands that made it.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

COLUMNS = {
    "decode": ["engine", "label", "tp", "batch", "ms_per_step", "graph_ms", "graph_varied_ms", "tokens_per_s", "limit_tokens_per_s",
               "pct_of_limit", "ttft_ms", "launch_to_first_token_s"],
    "prefill": ["label", "prefill", "input_len", "ttft_ms", "first_call_ms", "same_token", "graph"],
    "throughput": ["label", "tp", "prompts", "input_tokens", "output_tokens", "seconds", "input_tok_s",
                   "output_tok_s", "preemptions"],
    "serving": ["label", "rate", "requests", "errors", "seconds", "req_s", "output_tok_s", "ttft_p50_ms",
                "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"],
    "attention": ["backend", "context", "batch", "gqa", "us", "GB/s", "pct_bw"],
    "gemm": ["rows", "proj", "N", "K", "MB", "cublas_us", "cublas_TBps", "skinny_us", "skinny_TBps", "ideal_us", "tile"],
    "allreduce": ["dtype", "size", "nccl_graph_us", "one_shot_graph_us", "two_shot_graph_us", "choice",
                  "ptp_graph_us", "ptp_vs_best"],
    "check": ["variant", "batch", "exact_prompts", "tokens_equal", "not_near_ties"],
}


def load(specs: list[str]) -> list[dict]:
    rows = []
    for spec in specs:
        path, _, source = spec.partition("=")
        for line in open(path):
            if line.strip():
                row = json.loads(line)
                row.setdefault("bench", _guess_bench(row))
                rows.append({**row, "source": source})
    return rows


def _guess_bench(row: dict) -> str:
    """Rows written by a bench script alone carry no "bench": tell the kind from its fields."""
    for bench, key in (("decode", "tokens_per_s"), ("throughput", "output_tok_s"), ("serving", "ttft_p50_ms"),
                       ("prefill", "prefill"), ("attention", "pct_bw"), ("gemm", "cublas_us"),
                       ("allreduce", "ptp_vs_best"), ("check", "variant")):
        if key in row:
            return bench
    return "other"


def markdown(rows: list[dict], columns: list[str]) -> str:
    columns = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return "" if v is None else str(v)


def report(rows: list[dict]) -> str:
    out = []
    by_bench = defaultdict(list)
    for r in rows:
        by_bench[r["bench"]].append(r)
    for bench, group in by_bench.items():
        errors = [r for r in group if "error" in r]
        good = [r for r in group if "error" not in r]
        out.append(f"## {bench}\n")
        if good:
            out.append(markdown(good, COLUMNS.get(bench, sorted({k for r in good for k in r}))))
        for r in errors:
            out.append(f"\nFAILED: {r.get('step', '')} {r['error']} ({r.get('log', '')})")
        made = sorted({(r.get("device", "?"), r.get("date", "?"), r.get("commit", "?")) for r in group})
        out.append("\n" + "; ".join(f"{d}, {day}, commit {c}" for d, day, c in made))
        for command in dict.fromkeys(r["command"] for r in group if r.get("command")):
            out.append(f"    {command}")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for r in rows:
        if r["bench"] == "decode" and "error" not in r and r.get("label") != "eager":
            name = f"{r.get('engine', 'ptp')} tp={r.get('tp', 1)}"
            label = r.get("label") if r.get("label") not in ("", "compiled") else None
            name += "".join(f" ({x})" for x in (label, r.get("source") or r.get("date")) if x)
            lines[name].append((r["batch"], r["tokens_per_s"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(lines.items()):
        points.sort()
        style = {"marker": "o"} if len(points) > 1 else {"marker": "s", "linestyle": ""}
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
    devices = sorted({r.get("device") for r in rows if r["bench"] == "decode" and r.get("device")})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    models = sorted({r["model"] for r in rows if r["bench"] == "decode" and r.get("model")})
    ax.set_title(title or f"decode tokens/s, {', '.join(models + devices) or 'device not recorded'}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="JSON-lines files, each optionally FILE=NAME")
    parser.add_argument("--plot", default=None, help="PNG: decode tokens/s against batch size, a line per engine and tp")
    parser.add_argument("--title", default=None, help="the plot's title (default: the models and devices)")
    ns = parser.parse_args()
    rows = load(ns.files)
    print(report(rows))
    if ns.plot:
        try:
            plot(rows, ns.plot, ns.title)
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    main()
