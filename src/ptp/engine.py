"""The engine on rank 0: tokenizer + scheduler + runner + sampler; `step()` advances every request."""
from __future__ import annotations

import atexit
import collections
import dataclasses
import itertools
import os
import threading
import logging
import time

import torch

from ptp.args import EngineArgs
from ptp.errors import ConfigError, RankFailedError
from ptp.hub import eos_ids, load_tokenizer, resolve_model
from ptp.kv_cache import BlockAllocator
from ptp.outputs import ModelLimits, SeqUpdate
from ptp.parallel.mesh import (StepChannel, check_world, release_process_group, shutdown, teardown_together,
                               under_torchrun)
from ptp.parallel.p2p import stage_layers
from ptp.step import StepBatch
from ptp.sampling import Sampler, SampleRow, SamplingParams
from ptp.scheduler import Scheduler, Sequence, Status

log = logging.getLogger("ptp")
PROFILE_SKIP_STEPS = 16


@dataclasses.dataclass
class _Launched:
    """A step on its way: its sampled sequences, their logits, and the greedy tokens' copy to the host."""
    seqs: list[Sequence]
    logits: torch.Tensor
    host: tuple | None  # (pinned buffer, event) of the tokens' copy, for a step left in flight
    ahead: bool  # tokens drawn on the device: the step stays in flight


def _on_device(seq: Sequence, blocked: list[int]) -> bool:
    """Whether seq's next token can be drawn on the device without its history or the host: no
    penalties (they need the token in flight), no logprobs, no min_tokens block."""
    p = seq.params
    return p.logprobs is None and p.prompt_logprobs is None and p.grammar is None and not blocked and p.repetition_penalty == 1.0 \
        and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0


def prompt_scoring(seqs: list[Sequence], batch: StepBatch) -> list[tuple[Sequence, int, int]]:
    """(sequence, chunk start, chunk length) of the step's chunks that give prompt logprobs still
    missing; marks them in batch.all_logits, so that every row of theirs gets logits."""
    out = []
    for seq, toks, start in zip(seqs, batch.token_ids, batch.starts):
        rec = seq.prompt_logprobs
        if rec is not None and max(start + 1, len(rec)) <= min(start + len(toks), len(seq.prompt_ids) - 1):
            out.append((seq, start, len(toks)))
    if out:
        marked = {id(s) for s, _, _ in out}
        batch.all_logits = [id(s) in marked for s in seqs]
    return out


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
                                   prefix_cache=not args.disable_radix_cache)
        self.sampler = Sampler(self.d.device, args.seed)
        self.overlap = not args.disable_overlap_schedule
        self.inflight: _Launched | None = None
        rows = self.runner.last_tokens.shape[0]
        pin = self.d.device.type == "cuda"
        self._host_tokens = [torch.zeros(rows, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        self.num_overlapped = 0  # steps queued before their predecessor's tokens were known
        self.requests: dict[str, list[Sequence]] = {}
        self.num_finished = 0  # requests whose every sample finished
        self._counter = itertools.count()
        self.profile = collections.Counter() if os.environ.get("PTP_PROFILE") else None
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
    def step(self) -> list[SeqUpdate]:
        """Run one step; return what the sequences gained (under the watchdog of the spawned ranks)."""
        if self.spawned is None:
            return self._step()
        with self.spawned.busy():
            try:
                return self._step()
            except RankFailedError:
                raise
            except Exception as e:  # a collective outside execute() (the drawn tokens' broadcast) failed
                if self.spawned.peer_failed():
                    self.spawned.raise_failure(e)
                raise

    def _step(self) -> list[SeqUpdate]:
        """One step.

        Overlap: a step whose sampled rows need nothing from the host (greedy, or sampled without
        penalties, logprobs or a min_tokens block) has its tokens drawn on the device and is left in
        flight. The next call first queues the following step — each of those sequences bringing a
        placeholder for its unknown token, which the GPU fills in from the previous step's tokens
        (`runner.last_tokens`; sampled ones are broadcast to the other ranks) — and only then waits
        for the tokens of the step in flight. So the GPU runs step N+1 while the host detokenizes
        and checks stop conditions of step N. A sequence found finished then has one extra token
        computed, which is dropped.
        """
        prev, self.inflight = self.inflight, None
        if prev is not None:
            self._add_placeholders(prev)
        scheduled = self.scheduler.schedule()
        launched = None
        t0 = time.perf_counter()
        if scheduled is not None:
            seqs, batch = scheduled
            sampling = [s for s, sample in zip(seqs, batch.sample) if sample]
            ahead = self.overlap and bool(sampling) and all(_on_device(s, self._blocks_eos(s)) for s in sampling)
            drawn = ahead and not all(s.params.greedy for s in sampling)
            batch.share_tokens = drawn and self.d.world_size > 1
            scoring = prompt_scoring(seqs, batch)
            logits = self.execute(batch)
            if scoring:  # the prompt rows' logits follow the sampled rows'
                logits = self._score_prompts(scoring, logits, len(sampling))
            if sampling:
                if drawn:  # draw on the device now; the tokens replace the argmax in last_tokens
                    tokens = self.sampler.sample_tokens(logits, [self._sample_row(s) for s in sampling])
                    self.runner.set_last_tokens(tokens, broadcast=batch.share_tokens)
                # only a step left in flight needs its tokens copied: the synchronous path samples them
                host = self._tokens_to_host(len(sampling)) if ahead else None
                launched = _Launched(sampling, logits, host, ahead)
        t1 = time.perf_counter()
        updates = self._resolve(prev) if prev is not None else []
        if launched is not None:
            if launched.ahead:
                self.inflight = launched
                self.num_overlapped += 1
            else:
                updates += self._sample(launched)
        if self.profile is not None:  # PTP_PROFILE=1: where a step's wall time goes, printed at shutdown
            self.profile["seen"] += 1
            if self.profile["seen"] > PROFILE_SKIP_STEPS:  # the first steps wait on start-up work
                self.profile["schedule + launch"] += t1 - t0
                self.profile["wait for tokens"] += time.perf_counter() - t1
                self.profile["steps"] += 1
        return updates

    def _score_prompts(self, scoring: list[tuple[Sequence, int, int]], logits: torch.Tensor,
                       sampled: int) -> torch.Tensor:
        """Record the prompt logprobs that this step's extra logit rows give; return the sampled rows' logits."""
        extra, rows, targets, owners = logits[sampled:], [], [], []
        at = 0
        for seq, start, count in scoring:
            done = len(seq.prompt_logprobs)  # positions recorded (a preempted sequence recomputes its prompt)
            for pos in range(max(start + 1, done), min(start + count, len(seq.prompt_ids) - 1) + 1):
                rows.append(at + pos - 1 - start)  # the row of position pos - 1 predicts token pos
                targets.append(seq.prompt_ids[pos])
                owners.append(seq)
            at += count
        if rows:
            k = max(max(s.params.prompt_logprobs for s, _, _ in scoring), 1)
            logp = torch.log_softmax(extra[torch.tensor(rows, device=extra.device)].float(), dim=-1)
            chosen = logp.gather(1, torch.tensor(targets, device=extra.device).unsqueeze(1)).squeeze(1).tolist()
            top_vals, top_ids = (t.tolist() for t in logp.topk(k, dim=-1))
            for seq, token, lp, ids, vals in zip(owners, targets, chosen, top_ids, top_vals):
                entry = {token: lp}
                for tid, val in zip(ids[: seq.params.prompt_logprobs], vals):
                    entry.setdefault(tid, val)
                seq.prompt_logprobs.append(entry)
        return logits[:sampled]

    def _tokens_to_host(self, rows: int):
        """Start copying the step's greedy tokens to the host; (buffer, event) to wait on."""
        buf = self._host_tokens[self._flip]
        self._flip ^= 1
        buf[:rows].copy_(self.runner.last_tokens[:rows], non_blocking=True)
        event = None
        if buf.is_pinned():
            event = torch.cuda.Event()
            event.record()
        return buf, event

    def _add_placeholders(self, prev: "_Launched") -> None:
        for row, seq in enumerate(prev.seqs):
            # a sequence whose token in flight is its last by length sits the next step out
            if seq.status is Status.RUNNING and len(seq.output_ids) + 1 < seq.max_tokens \
                    and len(seq) + 1 < self.max_model_len:
                seq.output_ids.append(-1 - row)

    def _resolve(self, prev: "_Launched") -> list[SeqUpdate]:
        buf, event = prev.host
        if event is not None:
            event.synchronize()
        tokens = buf[: len(prev.seqs)].tolist()
        now = time.perf_counter()
        updates = []
        for seq, token in zip(prev.seqs, tokens):
            if seq.output_ids and seq.output_ids[-1] < 0:
                seq.output_ids.pop()
            if seq.status is Status.FINISHED:  # aborted while in flight
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            updates.append(self._append(seq, token, None))
        return updates

    def _sample(self, launched: "_Launched") -> list[SeqUpdate]:
        seqs = [s for s in launched.seqs if s.status is not Status.FINISHED]
        if not seqs:
            return []
        logits = launched.logits
        if len(seqs) < len(launched.seqs):  # some finished while this step ran: drop their rows
            keep = [i for i, s in enumerate(launched.seqs) if s.status is not Status.FINISHED]
            logits = logits[torch.tensor(keep, device=logits.device)]
        result = self.sampler(logits, [self._sample_row(s) for s in seqs])
        now = time.perf_counter()
        updates = []
        for seq, token, logprob in zip(seqs, result.token_ids, result.logprobs):
            if seq.first_token_time is None:
                seq.first_token_time = now
            updates.append(self._append(seq, token, logprob))
        return updates

    def execute(self, batch: StepBatch):
        """Send `batch` to every rank and run it; the logits of the sequences it completes."""
        try:
            if self.channel is not None:
                t = time.perf_counter()
                self.channel.send(batch)
                if self.profile is not None and self.profile["seen"] >= PROFILE_SKIP_STEPS:
                    self.profile["broadcast"] += time.perf_counter() - t
            return self.runner.execute(batch)
        except Exception as e:
            if self.spawned is not None and self.spawned.peer_failed():
                self.spawned.raise_failure(e)
            raise

    def _blocks_eos(self, seq: Sequence) -> list[int]:
        """Token ids that seq may not sample yet (min_tokens)."""
        p = seq.params
        if len(seq.output_ids) < p.min_tokens:
            return sorted((self.eos_ids if not p.ignore_eos else set()) | set(p.stop_token_ids))
        return []

    def _sample_row(self, seq: Sequence) -> SampleRow:
        p = seq.params
        needs_history = p.repetition_penalty != 1.0
        return SampleRow(p, seq.all_ids if needs_history else [], seq.output_ids, seq.generator, self._blocks_eos(seq),
                         seq.constraint)

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
        if self.profile and self.profile["steps"]:
            self.profile.pop("seen")
            steps = self.profile.pop("steps")
            log.info("per step over %d steps: %s", steps,
                     ", ".join(f"{k} {v / steps * 1e3:.3f} ms" for k, v in self.profile.items()))
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
