"""All-reduce per message size and dtype: NCCL, symmetric-memory one-shot and two-shot, and ptp's choice,
eagerly and inside a CUDA graph; with --check, each against a float64 sum (eager, graph, torch.compile).

    torchrun --nproc-per-node 2 bench/allreduce.py --check
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from common import eager_us, print_table, write_json

METHODS = ("nccl", "one_shot", "two_shot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--iters", type=int, default=50)
    ns = parser.parse_args()
    from ptp.parallel import comm
    from ptp.parallel.mesh import init_distributed

    rank = int(os.environ["RANK"])
    d = init_distributed(int(os.environ["WORLD_SIZE"]), rank, "cuda", None, 120)
    group = d.tp_mesh.get_group()
    symm = comm.setup_custom_all_reduce(group, d.device, rank, d.cpu_group, 64 << 20, p2p_check=True)
    assert symm is not None, "no peer access: symmetric memory is off"
    rows, failures = [], []
    for dtype in (torch.bfloat16, torch.float32):
        for nbytes in comm.SIZES:
            n = nbytes // torch.finfo(dtype).bits * 8
            x = torch.randn(n, generator=torch.Generator().manual_seed(rank), dtype=torch.float32).to(d.device, dtype)
            row = {"dtype": str(dtype).split(".")[1], "size": comm._fmt(nbytes),
                   "choice": symm.method(nbytes, dtype)}
            for m in METHODS:
                row[f"{m}_eager_us"] = eager_us(lambda: symm.run(x, m), ns.iters)
                row[f"{m}_graph_us"] = comm.time_in_graph(lambda: symm.run(x, m), ns.iters)
            row["ptp_graph_us"] = comm.time_in_graph(lambda: comm.all_reduce(x), ns.iters)
            best = min(row[f"{m}_graph_us"] for m in METHODS)
            row["ptp_vs_best"] = row["ptp_graph_us"] / best
            if ns.check:
                failures += check(x, dtype, n, rank, d.world_size, symm)
            rows.append(row)
    if rank == 0:
        print_table(rows, ["dtype", "size", *[f"{m}_eager_us" for m in METHODS], *[f"{m}_graph_us" for m in METHODS],
                           "choice", "ptp_graph_us", "ptp_vs_best"])
        print(f"{d.world_size} x {torch.cuda.get_device_name()}, torch {torch.__version__}; mean of {ns.iters}")
        if ns.check:
            print("correctness against a float64 sum (eager, CUDA graph, torch.compile):",
                  "all passed" if not failures else f"FAILED: {failures}")
        write_json(ns.json, rows)
    dist.barrier()
    dist.destroy_process_group()


def check(x, dtype, n, rank, world, symm) -> list[str]:
    from ptp.parallel import comm

    expected = sum(torch.randn(n, generator=torch.Generator().manual_seed(r), dtype=torch.float32)
                   .to(dtype).double() for r in range(world))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    failures = []

    def ok(name, got):
        err = ((got.double().cpu() - expected).abs() / (expected.abs() + 1)).max().item()
        if err > tol:
            failures.append(f"{name} {dtype} {n}: {err:.2e}")

    ok("eager", comm.all_reduce(x))
    for m in METHODS:
        ok(m, symm.run(x, m))
    static_out = [None]
    graph = torch.cuda.CUDAGraph()
    comm.all_reduce(x)
    with torch.cuda.graph(graph):
        static_out[0] = comm.all_reduce(x)
    graph.replay()
    ok("graph", static_out[0])
    compiled = torch.compile(lambda t: comm.all_reduce(t * 1.0), fullgraph=True)
    ok("compile", compiled(x))
    return failures


if __name__ == "__main__":
    main()
