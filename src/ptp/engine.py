"""The engine on a replica's leader: start-up, requests (add, abort), the token-level output side
(`_append`: stops on EOS, stop ids and lengths) and shutdown. `step()` advances every request through
the step schedule of ptp.overlap, which owns the steps in flight."""
from __future__ import annotations

import atexit
import gc
import itertools
import os
import threading
import logging

import torch

from ptp.args import EngineArgs
from ptp.errors import ConfigError, RankFailedError
from ptp.hub import eos_ids, load_tokenizer, resolve_model
from ptp.kv_cache import BlockAllocator
from ptp.outputs import ModelLimits, SeqUpdate
from ptp.parallel.mesh import (StepChannel, check_world, release_process_group, shutdown, teardown_together,
                               under_torchrun)
from ptp.parallel.p2p import stage_layers
from ptp.overlap import OverlapSchedule
from ptp.pipeline import MicroBatchSchedule
from ptp.step import StepBatch
from ptp.sampling import Sampler, SamplingParams
from ptp.scheduler import Scheduler, Sequence, Status

log = logging.getLogger("ptp")


class Engine:
    def __init__(self, args: EngineArgs):
        from ptp.ranks import SpawnedRanks, build_runner

        self.args = args.validate()
        self.spawned = None
        rank, init_method = 0, None
        if under_torchrun():
            world = int(os.environ["WORLD_SIZE"])
            if args.tp == 1 and args.dp_size == 1 and args.pp_size == 1:
                args.tp = world  # torchrun's processes are the tensor-parallel ranks
            check_world(world, args.dp_size, args.pp_size, args.tp)
            rank = int(os.environ["RANK"])
        elif args.dp_size > 1:
            raise ConfigError(
                f"an Engine runs one replica; --dp-size {args.dp_size} starts one per replica: use ptp.LLM(dp_size=...), "
                "ptp.serve, or torchrun with dp × tp processes."
            )
        elif args.tp * args.pp_size > 1 or args.nnodes > 1:
            import multiprocessing
            if multiprocessing.current_process().name.startswith("ptp-rank"):
                raise ConfigError(
                    f"ptp.LLM(tp={args.tp}, pp_size={args.pp_size}) ran again inside the spawned "
                    f"{multiprocessing.current_process().name}: "
                    "starting a rank re-imports your script, and the script builds the LLM at import time. "
                    "Build it under `if __name__ == \"__main__\":`."
                )
            # Check the split before starting processes, so a bad tp or layer partition fails at once.
            _, config, _ = resolve_model(args, torch.device("cpu"))
            stage_layers(config.num_layers, args.pp_size, args.layer_partition())
            self.spawned = SpawnedRanks(args)
            init_method, rank = self.spawned.init_method, self.spawned.base_rank
        self.rank = rank
        try:
            self.d, self.runner, self.config, self.files = build_runner(args, rank, init_method)
        except Exception as e:
            if self.spawned is not None:
                failed = self.spawned.peer_failed()
                self.spawned.stop(timeout=2.0)
                release_process_group(torch.cuda.is_available() and args.device != "cpu")
                if failed:
                    self.spawned.raise_failure(e)
            raise
        if under_torchrun() and self.d.world_size > 1:  # torchrun's ranks: the watchdog meets them in its store
            from ptp.ranks import TorchrunWatchdog
            self.spawned = TorchrunWatchdog(args, self.d)
        # Start-up's objects (modules, compiled code, captured graphs) live as long as the process: move them
        # out of the garbage collector's reach, so that its full collections scan only what steps allocate
        # (as vLLM and SGLang do); else each one walks every object of torch and the model.
        gc.collect()
        gc.freeze()
        self.max_model_len = self.runner.model.model.rotary.max_positions
        self.channel = StepChannel(self.d) if self.d.world_size > 1 else None
        self.is_leader = self.d.is_leader
        if not self.is_leader:
            if self.d.rank % self.d.ranks_per_node == 0 and self.d.node_rank > 0:
                log.info("node %d of %d: ranks %d-%d follow node 0, which schedules and serves", self.d.node_rank,
                         args.nnodes, self.d.rank, self.d.rank + self.d.ranks_per_node - 1)
            return  # the other ranks of a replica only follow; see follow()
        self.tokenizer = load_tokenizer(args, self.files)
        self.eos_ids = eos_ids(self.tokenizer, self.config, self.files)
        # runner.num_blocks, not the cache's: the cache has one more, the scratch block of padded rows
        self.scheduler = Scheduler(BlockAllocator(self.runner.num_blocks, self.runner.kv_cache.block_size),
                                   args.chunked_prefill_size, args.max_running_requests, mix=args.enable_mixed_chunk,
                                   prefix_cache=not args.disable_radix_cache,
                                   prefill_while_decoding=args.max_prefill_tokens_while_decoding or 0)
        self.sampler = Sampler(self.d.device, args.seed)
        common = dict(send=self.channel.send if self.channel is not None else None, append=self._append,
                      eos_ids=self.eos_ids, max_model_len=self.max_model_len,
                      overlap=not args.disable_overlap_schedule, world_size=self.d.world_size)
        if self.runner.pipelined:  # pipeline stages with several micro-batches in flight
            self.steps = MicroBatchSchedule(self.scheduler, self.runner, self.sampler, depth=args.micro_batches(),
                                            post=self.channel.post, **common)
        else:
            self.steps = OverlapSchedule(self.scheduler, self.runner, self.sampler, **common)
        self.requests: dict[str, list[Sequence]] = {}
        self.num_finished = 0  # requests whose every sample finished
        self._counter = itertools.count()
        self._closed = False
        atexit.register(self.shutdown)
        log.info(
            "model %s: %s, tp=%d, pp=%d, %s on %s, weights %.2f GiB per rank loaded in %.1f s, KV cache %d tokens",
            self.files.name, self.config.architecture, args.tp, args.pp_size, self.runner.dtype,
            self.d.device, self.runner.weight_bytes / 2**30, self.runner.load_seconds, self.kv_capacity_tokens,
        )

    # --- follower ranks --------------------------------------------------------------------------
    def follow(self) -> None:
        """Ranks > 0 under torchrun: run rank 0's steps until it shuts down."""
        from ptp.ranks import TorchrunWatchdog, follow
        progress = self.spawned.progress if isinstance(self.spawned, TorchrunWatchdog) else None
        follow(self.d, self.runner, self.spawned.stop if self.spawned is not None else None,
               progress=progress)  # does not return

    # --- requests ------------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.runner.num_blocks * self.runner.kv_cache.block_size

    def new_request_id(self) -> str:
        return str(next(self._counter))

    @property
    def limits(self) -> "ModelLimits":
        return ModelLimits(self.config.vocab_size, self.max_model_len, self.kv_capacity_tokens)

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Raise ConfigError if the request cannot fit; return its max new tokens."""
        return self.limits.check(prompt_ids, params)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a prompt (token ids; a string is encoded with the model's tokenizer) with n samples."""
        request_id = request_id or self.new_request_id()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this model was loaded without a tokenizer: give prompts as token ids.")
            prompt = self.tokenizer.encode(prompt)
        prompt_ids = list(prompt)
        max_tokens = self.check_prompt(prompt_ids, params)
        if params.prompt_logprobs is not None and self.args.pp_size > 1:
            raise ConfigError("prompt logprobs are not supported with pipeline parallelism (--pp-size > 1) yet; "
                              "run without prompt_logprobs (echo with logprobs), or without --pp-size.")
        seqs = []
        for i in range(params.n):
            gen = None
            seed = params.seed if params.seed is not None or not self.args.enable_deterministic_inference else self.args.seed
            if seed is not None:  # deterministic mode: every request draws from its own seed
                gen = torch.Generator(device=self.d.device)
                gen.manual_seed(seed + i)
            seqs.append(Sequence(request_id, i, prompt_ids, params, max_tokens, generator=gen,
                                 prompt_logprobs=[None] if params.prompt_logprobs is not None else None))
            if params.grammar is not None:
                from ptp.structured import Constraint
                seqs[-1].constraint = Constraint(self.tokenizer, self.config.vocab_size, params.grammar)
        for s in seqs:
            self.scheduler.add(s)
        self.requests[request_id] = seqs
        return request_id

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Finish a request's samples (or only sample `index`) with reason "abort"; their blocks are freed."""
        for seq in list(self.requests.get(request_id, [])):
            if seq.status is not Status.FINISHED and (index is None or seq.index == index):
                self.scheduler.finish(seq, "abort")
                self.requests_done(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()  # a step in flight belongs to running sequences

    # --- stepping ------------------------------------------------------------------------------
    @property
    def num_overlapped(self) -> int:
        """Steps queued before their predecessor's tokens were known (ptp.overlap)."""
        return self.steps.num_overlapped

    @property
    def num_pipelined(self) -> int:
        """Micro-batches launched while another was in flight through the pipeline stages (ptp.pipeline)."""
        return self.steps.num_pipelined

    def step(self) -> list[SeqUpdate]:
        """Run one step; return what the sequences gained (under the watchdog of the spawned ranks)."""
        if self.spawned is None:
            return self.steps.step()
        with self.spawned.busy():
            try:
                return self.steps.step()
            except RankFailedError:
                raise
            except Exception as e:  # a collective outside execute() (the drawn tokens' broadcast) failed
                if self.spawned.peer_failed():
                    self.spawned.raise_failure(e)
                raise

    def execute(self, batch: StepBatch):
        """Send `batch` to every rank and run it; the logits of the sequences it completes, valid until
        the next step (a decode step's are in a buffer that every decode step rewrites)."""
        try:
            return self.steps.execute(batch)
        except Exception as e:
            if self.spawned is not None and self.spawned.peer_failed():
                self.spawned.raise_failure(e)
            raise

    def _append(self, seq: Sequence, token: int, logprob) -> SeqUpdate:
        """Add a token; finish the sequence on EOS, a stop token or its length. Stop strings are the
        output side's (ptp.detokenize): the engine never looks at text."""
        p = seq.params
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        reason = None
        if not p.ignore_eos and token in self.eos_ids:
            reason, seq.stop_reason = "stop", None
        elif token in p.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        if reason is None and seq.constraint is not None and (not seq.constraint.advance(token) or seq.constraint.done):
            reason = "stop"  # the grammar is complete (or, never expected, rejected the token)
        if reason is None and len(seq.output_ids) >= seq.max_tokens:
            reason = "length"
        if reason is None and len(seq) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.requests_done(seq)
        prompt_lps = None
        if seq.prompt_logprobs is not None and len(seq.output_ids) == 1:  # the prompt's, with the first token
            prompt_lps = seq.prompt_logprobs
        return SeqUpdate(seq.request_id, seq.index, "", [token], [logprob] if logprob is not None else None,
                         reason, seq.stop_reason, seq.num_cached_tokens or 0, prompt_lps)

    def requests_done(self, seq: Sequence) -> None:
        """Forget a request once every sample of it has finished."""
        seqs = self.requests.get(seq.request_id)
        if seqs is not None and all(s.status is Status.FINISHED for s in seqs):
            del self.requests[seq.request_id]
            self.num_finished += 1

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        if os.environ.get("PTP_DEBUG_EXIT"):  # still alive N s after shutdown began: dump every thread's stack
            import faulthandler
            faulthandler.dump_traceback_later(float(os.environ["PTP_DEBUG_EXIT"]), exit=False)
        report = self.steps.profile_report() if self.is_leader else None
        if report is not None:
            log.info(report)
        failed = self.spawned is not None and self.spawned.peer_failed(wait=0)
        if self.is_leader and self.runner.pipelined and self.steps.flight and not failed:
            try:  # the ranks finish the micro-batches in flight before they take the stop
                self.steps.drain()
            except Exception as e:
                log.warning("the micro-batches in flight did not come back at shutdown: %s", e)
        if self.d.world_size > 1:
            try:
                self.channel.send(None)
                sent = True
            except Exception:
                sent = False
            together = sent and self._teardown_together()
            if self.spawned is not None:
                self.spawned.stop()
            if not together:
                shutdown(self.d)
        self.runner.release()

    def _teardown_together(self, timeout: float = 60.0) -> bool:
        """teardown_together with the other ranks, given `timeout` s; False if it failed or hung."""
        outcome: list[BaseException | None] = []

        def run():
            try:
                teardown_together(self.d, self.runner)
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        worker = threading.Thread(target=run, name="ptp-teardown", daemon=True)
        worker.start()
        worker.join(timeout)
        if outcome and outcome[0] is None:
            return True
        why = f"it failed: {outcome[0]}" if outcome else f"it did not finish within {timeout:.0f} s"
        log.warning("tearing the process group down together with the other ranks: %s; aborting it instead", why)
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
