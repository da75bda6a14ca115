"""Every benchmark of docs/benchmarks.md through one driver: a mode, a model, tensor-parallel sizes, batch sizes.

    python bench/suite.py check                          # every fast path's greedy tokens against eager, fp32
    python bench/suite.py perf --batch-sizes 1,8,64      # decode per batch size, prefill, offline throughput
    python bench/suite.py perf --peers                   # ... and Hugging Face transformers at the same batches
    python bench/suite.py serve --request-rates 16,32,inf
    python bench/suite.py serve --request-rates inf --shared-prefix 64,8,2000 --serve-lens 64:128 \
        --ab=--disable-radix-cache                       # the prefix cache on and off, a fresh server each
    python bench/suite.py kernels                        # the decode-attention kernel and the projections alone
    python bench/suite.py allreduce --tp 2,4,8           # several GPUs: all-reduce per size and method
    python bench/suite.py perf --tp 1,2,4,8              # several GPUs: the same figures at each tp
    python bench/suite.py perf --ab PTP_DISABLE_PDL=1    # A/B in one run: each step again with this setting
    python bench/suite.py perf --ab=--disable-overlap-schedule   # (flags after "=")
    python bench/suite.py perf --baseline old             # each decode and throughput step also from an older
                                                         # checkout, in turn (mkdir old; git archive COMMIT |
                                                         # tar -x -C old; echo COMMIT > old/COMMIT)

Each step's log goes to OUT/logs/, and each figure to OUT/results.jsonl as one JSON line that also
holds the device, the date, the commit and the exact command. At the end bench/report.py prints the
tables (and, after `perf`, draws OUT/decode_tokens_per_s.png where matplotlib is installed).

`--model` is a Hub id, a folder, or a name in bench/configs/ (config only: the default
`--load-format dummy` builds random weights of the real shapes). `bench/configs/tiny` runs on CPU
in seconds, which checks the driver itself:

    python bench/suite.py perf --model tiny --max-model-len 256 --batch-sizes 1,2 --input-len 16 --output-len 8
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODES = ("check", "perf", "serve", "kernels", "allreduce")
# NVLink multicast stays off in every process: it is never used by ptp, and some hosts cannot take it.
BASE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
            "PYTHONUNBUFFERED": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--tp", default="1", help="tensor-parallel sizes, comma-separated (each needs that many GPUs)")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128", help="decode batch sizes (perf)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens of the decode runs (perf)")
    parser.add_argument("--output-len", type=int, default=256, help="generated tokens of the decode runs (perf)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--engine-args", default="", help="more engine flags for every ptp run, e.g. '--attention-backend flex'")
    parser.add_argument("--ab", action="append", default=[], metavar="SETTINGS",
                        help="run each step again with these settings: environment variables (NAME=VALUE) and "
                             "engine flags, space-separated; repeatable. The label of such rows is the settings")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="perf: run each decode and throughput step also from this checkout of another commit "
                             "(its own bench scripts and src; engine flags of --baseline-args), right after the "
                             "current one; each tree compiles into its own inductor cache")
    parser.add_argument("--baseline-args", default="", help="engine flags for the baseline's runs only")
    parser.add_argument("--eager", action="store_true", help="perf: also batch 1 without compile and CUDA graphs")
    parser.add_argument("--peers", action="store_true", help="perf: also Hugging Face transformers generate")
    parser.add_argument("--prefill-lens", default="16,128,512,2048", help="perf: prompt lengths for time to first token")
    parser.add_argument("--num-prompts", type=int, default=1000, help="perf: requests of the offline-throughput run")
    parser.add_argument("--throughput-lens", default="256:256", help="perf: INPUT:OUTPUT mean lengths of the throughput run")
    parser.add_argument("--jitter", type=float, default=0.9, help="perf: lengths of the throughput run vary by this fraction")
    parser.add_argument("--request-rates", default="16,24,32,inf", help="serve: requests per second (inf: all at once)")
    parser.add_argument("--serve-prompts", type=int, default=256, help="serve: requests per rate")
    parser.add_argument("--serve-lens", default="512:128", help="serve: INPUT:OUTPUT tokens per request")
    parser.add_argument("--shared-prefix", default=None, metavar="C,T,S",
                        help="serve: C conversations of T turns over an S-token system prompt (each turn a "
                             "--serve-lens user message and answer) instead of random prompts")
    parser.add_argument("--only", default=None, help="check: only the variants whose names contain this (check_gpu.py --only)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--timeout", type=int, default=900, help="seconds each step may run")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for logs and results.jsonl")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ns = parser.parse_args(argv)
    ns.tps = [int(t) for t in ns.tp.split(",")]
    return ns


class Suite:
    def __init__(self, ns: argparse.Namespace):
        self.ns = ns
        self.out = Path(ns.out)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.results = self.out / "results.jsonl"
        self.meta = {"model": ns.model, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                     "commit": _commit(), **_software()}
        self.env = {**os.environ, **BASE_ENV,
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(BENCH), os.environ.get("PYTHONPATH", "")])}
        self.failed: list[str] = []

    def tree_env(self, tree: Path) -> dict:
        """The environment of a step run from `tree` (this checkout or --baseline's): its src and bench
        first on the path, and, with a baseline, an inductor cache of its own (trees whose custom ops
        differ must not share compiled code)."""
        if tree == ROOT and not self.ns.baseline:
            return self.env
        return {**self.env, "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(tree / "bench"),
                                                           os.environ.get("PYTHONPATH", "")]),
                "TORCHINDUCTOR_CACHE_DIR": str(self.out.resolve() / f"inductor-{_commit(tree)}")}

    def variants(self) -> list[tuple[str, dict, list[str]]]:
        """(label, environment, engine flags): the plain run, then one per --ab."""
        out = [("", {}, shlex.split(self.ns.engine_args))]
        for spec in self.ns.ab:
            env = dict(w.split("=", 1) for w in shlex.split(spec) if "=" in w and not w.startswith("-"))
            flags = [w for w in shlex.split(spec) if not ("=" in w and not w.startswith("-"))]
            out.append((spec, env, shlex.split(self.ns.engine_args) + flags))
        return out

    def engine_flags(self, tp: int) -> list[str]:
        ns = self.ns
        return ["--model", ns.model, "--load-format", ns.load_format, "--max-model-len", str(ns.max_model_len),
                "--tp", str(tp)]

    def step(self, name: str, bench: str, argv: list[str], env: dict | None = None, label: str = "",
             json_flag: bool = True, extra: dict | None = None, tree: Path = ROOT) -> bool:
        """Run one bench script; its JSON lines go to results.jsonl with what made them. True if it succeeded."""
        raw = self.out / "logs" / f"{name}.jsonl"
        raw.unlink(missing_ok=True)
        argv = argv + (["--json", str(raw)] if json_flag else [])
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        command = (shown + " " if shown else "") + shlex.join(argv)
        print(f"=== {name}: {command}", flush=True)
        if self.ns.dry_run:
            return True
        start = time.time()
        with open(self.out / "logs" / f"{name}.log", "w") as log:
            try:
                proc = subprocess.Popen(argv, cwd=tree, env={**self.tree_env(tree), **(env or {})},
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for line in proc.stdout:
                    sys.stdout.write(line)
                    log.write(line)
                rc = proc.wait(timeout=max(1, self.ns.timeout - (time.time() - start)))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "timeout"
        rows = [json.loads(line) for line in raw.read_text().splitlines() if line.strip()] if raw.exists() else []
        meta = self.meta if tree == ROOT else {**self.meta, "commit": _commit(tree)}
        if rc != 0:
            self.failed.append(name)
            rows.append({"error": f"exit status {rc}", "log": f"logs/{name}.log"})
        with open(self.results, "a") as f:
            for row in rows:
                row = {"bench": bench, "engine": "ptp", "label": label, **row, **meta,
                       "command": command, "step": name, **(extra or {})}
                f.write(json.dumps(row) + "\n")
        print(f"=== {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {time.time() - start:.0f} s", flush=True)
        return rc == 0

    # ---- modes

    def check(self) -> None:
        py = sys.executable
        if _cuda():
            self.step("kernel_tests", "kernel-tests", [py, "-m", "pytest", "tests/test_kernels.py", "-q", "-m", "gpu"],
                      json_flag=False)
        tps = ",".join(str(t) for t in sorted({1, *self.ns.tps}))
        argv = [py, "bench/check_gpu.py", "--tp-list", tps, "--dtype", "float32"]
        self.step("check", "check", argv + (["--only", self.ns.only] if self.ns.only else []))

    def perf(self) -> None:
        ns, py = self.ns, sys.executable
        n_in, n_out = ns.throughput_lens.split(":")
        for tp in ns.tps:
            for i, (label, env, flags) in enumerate(self.variants()):
                sfx = f"_tp{tp}" + (f"_ab{i}" if i else "")
                base = [*self.engine_flags(tp), *flags, f"--label={label}"]
                self.step(f"decode{sfx}", "decode",
                          [py, "bench/latency.py", *base, "--cuda-graph-max-bs", str(max(_ints(ns.batch_sizes))),
                           "--batch-sizes", ns.batch_sizes, "--input-len", str(ns.input_len),
                           "--output-len", str(ns.output_len)], env, label)
                self.step(f"prefill{sfx}", "prefill",
                          [py, "bench/prefill.py", *base, "--input-lens", ns.prefill_lens, "--repeat", "3"], env, label)
                self.step(f"throughput{sfx}", "throughput",
                          [py, "bench/throughput.py", *base, "--num-prompts", str(ns.num_prompts), "--input-len", n_in,
                           "--output-len", n_out, "--jitter", str(ns.jitter)], env, label)
            if ns.baseline:
                self.baseline_perf(tp, n_in, n_out)
            if ns.eager:
                self.step(f"decode_eager_tp{tp}", "decode",
                          [py, "bench/latency.py", *self.engine_flags(tp), "--torch-compile", "off",
                           "--disable-cuda-graph", "--batch-sizes", "1", "--input-len", str(ns.input_len),
                           "--output-len", "64", "--label", "eager"], label="eager")
        if ns.peers:
            self.step("decode_transformers", "decode",
                      [py, "bench/hf_generate.py", "--model", ns.model, "--batch-sizes", ns.batch_sizes,
                       "--input-len", str(ns.input_len), "--output-len", str(min(ns.output_len, 128))])

    def baseline_perf(self, tp: int, n_in: str, n_out: str) -> None:
        """The decode and throughput steps from --baseline's checkout, with --baseline-args."""
        ns, py = self.ns, sys.executable
        tree = Path(ns.baseline).resolve()
        label = f"baseline {_commit(tree)}"
        base = [*self.engine_flags(tp), *shlex.split(ns.engine_args), *shlex.split(ns.baseline_args), f"--label={label}"]
        self.step(f"decode_tp{tp}_baseline", "decode",
                  [py, "bench/latency.py", *base, "--cuda-graph-max-bs", str(max(_ints(ns.batch_sizes))),
                   "--batch-sizes", ns.batch_sizes, "--input-len", str(ns.input_len), "--output-len", str(ns.output_len)],
                  label=label, tree=tree)
        self.step(f"throughput_tp{tp}_baseline", "throughput",
                  [py, "bench/throughput.py", *base, "--num-prompts", str(ns.num_prompts), "--input-len", n_in,
                   "--output-len", n_out, "--jitter", str(ns.jitter)], label=label, tree=tree)

    def serve(self) -> None:
        ns, py = self.ns, sys.executable
        n_in, n_out = ns.serve_lens.split(":")
        for tp in ns.tps:
            for i, (label, env, flags) in enumerate(self.variants()):
                name = f"serving_tp{tp}" + (f"_ab{i}" if i else "")
                server = [py, "-m", "ptp.serve", *self.engine_flags(tp), *flags, "--port", str(ns.port)]
                server[server.index("--model") + 1] = _config_path(ns.model)
                print(f"=== {name} server: {shlex.join(server)}", flush=True)
                extra = {"server": shlex.join(server)}
                if ns.dry_run:
                    self.step(name, "serving", self._serving_argv(n_in, n_out, label), env, label, extra=extra)
                    continue
                with open(self.out / "logs" / f"{name}_server.log", "w") as log:
                    proc = subprocess.Popen(server, cwd=ROOT, env={**self.env, **env}, stdout=log,
                                            stderr=subprocess.STDOUT)
                    if self._wait_healthy(proc):
                        self.step(name, "serving", self._serving_argv(n_in, n_out, label), env, label, extra=extra)
                    else:
                        self.failed.append(name)
                        print(f"=== {name}: the server did not become healthy (logs/{name}_server.log)")
                    proc.terminate()
                    try:
                        rc = proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        rc = "killed after 60 s"
                    print(f"=== {name}: server exit status {rc}")
                    if rc != 0:
                        self.failed.append(f"{name} (server exit)")

    def _serving_argv(self, n_in: str, n_out: str, label: str) -> list[str]:
        ns = self.ns
        return [sys.executable, "bench/serving.py", "--url", f"http://127.0.0.1:{ns.port}", "--request-rates",
                ns.request_rates, "--num-prompts", str(ns.serve_prompts), "--input-len", n_in, "--output-len", n_out,
                "--vocab", str(_vocab(ns.model)), f"--label={label}",
                *(["--shared-prefix", ns.shared_prefix] if ns.shared_prefix else [])]

    def _wait_healthy(self, proc: subprocess.Popen) -> bool:
        deadline = time.time() + self.ns.timeout
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ns.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(1)
        return False

    def kernels(self) -> None:
        py = sys.executable
        self.step("attention", "attention", [py, "bench/attention.py"])
        for tp in self.ns.tps:
            self.step(f"gemm_tp{tp}", "gemm", [py, "bench/gemm.py", "--rows", "1,2,4", "--tp", str(tp)])

    def allreduce(self) -> None:
        for tp in self.ns.tps:
            self.step(f"allreduce_{tp}", "allreduce", ["torchrun", "--nproc-per-node", str(tp),
                                                       "bench/allreduce.py", "--check"])

    def report(self) -> None:
        if self.ns.dry_run or not self.results.exists():
            return
        argv = [sys.executable, "bench/report.py", str(self.results)]
        if self.ns.mode == "perf":
            argv += ["--plot", str(self.out / "decode_tokens_per_s.png")]
        subprocess.run(argv, cwd=ROOT, env=self.env)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _config_path(model: str) -> str:
    folder = BENCH / "configs" / model
    return str(folder) if folder.is_dir() else model


def _vocab(model: str) -> int:
    config = Path(_config_path(model)) / "config.json"
    return json.loads(config.read_text())["vocab_size"] if config.exists() else 32000


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _commit(tree: Path = ROOT) -> str:
    """The commit of a checkout (a COMMIT file names it in an exported tree without git), "-dirty" if
    its files differ from it."""
    if (tree / "COMMIT").exists():
        return (tree / "COMMIT").read_text().strip()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=tree).returncode != 0
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return tree.name


def _software() -> dict:
    import torch

    info = {"torch": torch.__version__, "gpus": torch.cuda.device_count()}
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    suite = Suite(ns)
    getattr(suite, ns.mode)()
    suite.report()
    if suite.failed:
        print(f"failed: {', '.join(suite.failed)} (logs in {suite.out / 'logs'})")
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
