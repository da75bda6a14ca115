"""Process groups and the device mesh: torchrun's world, or ranks that ptp starts itself."""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time

import torch
import torch.distributed as dist

from ptp.errors import ConfigError, RankFailedError
from ptp.parallel import comm
from ptp.step import StepBatch

log = logging.getLogger("ptp")


@dataclasses.dataclass
class Dist:
    """This process's place in the run.

    The world is a dp × pp × tp mesh, numbered tp-fastest: global rank = (dp_rank · pp + pp_rank) · tp
    + tp_rank. A data-parallel replica is one pp × tp block of it; its first rank (the leader) runs
    the scheduler. `cpu_group` (gloo) spans the replica and carries the per-step broadcasts. Across
    nodes the numbering is node-major: node n holds global ranks n · ranks_per_node onwards."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None
    cpu_group: object = None
    dp_size: int = 1
    pp_size: int = 1
    tp_size: int = 1
    ranks_per_node: int = 1

    @property
    def node_rank(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def tp_group_in_one_node(self) -> bool:
        """Whether this rank's tensor-parallel group lies inside one node (symmetric memory needs that)."""
        first = self.rank - self.tp_rank
        return first // self.ranks_per_node == (first + self.tp_size - 1) // self.ranks_per_node

    @property
    def tp_mesh(self):
        return None if self.mesh is None else self.mesh["tp"]

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size % self.pp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp_size * self.pp_size)

    @property
    def replica_size(self) -> int:
        """Ranks in this replica (pp × tp)."""
        return self.pp_size * self.tp_size

    @property
    def leader(self) -> int:
        """Global rank of this replica's first rank: it schedules and broadcasts each step."""
        return self.dp_rank * self.replica_size

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {local_rank} needs GPU {local_rank} but only {torch.cuda.device_count()} are visible; "
                "lower --tp or check CUDA_VISIBLE_DEVICES."
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"--device must be 'cuda', 'cpu' or 'auto', got {name!r}.")
    return torch.device("cpu")


def check_world(world: int, dp: int, pp: int, tp: int) -> None:
    """Refuse a world size that is not dp × pp × tp, naming the numbers."""
    if world != dp * pp * tp:
        raise ConfigError(
            f"{world} processes cannot hold --dp-size {dp} × --pp-size {pp} × --tp {tp} = {dp * pp * tp} ranks; "
            f"start {dp * pp * tp} processes (torchrun --nproc-per-node × --nnodes), or change the sizes so that "
            f"their product is {world}."
        )


def init_distributed(tp: int, rank: int, device_name: str, init_method: str | None, timeout_s: float,
                     dp: int = 1, pp: int = 1, nnodes: int = 1, flags: dict | None = None) -> Dist:
    """Join (or, for a world of one, skip) the process group and build the dp × pp × tp mesh.

    Every rank first registers at the meeting point (a TCP store hosted by global rank 0, or
    torchrun's) with `flags`; a rank whose flags differ from rank 0's is refused, naming both values,
    and a group that is not complete after `timeout_s` ends with a message naming who joined."""
    world = dp * pp * tp
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world // nnodes))
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", rank % per_node)))
    if world == 1:
        comm.set_tp_group(None)
        return Dist(device=device)
    from torch.distributed.device_mesh import init_device_mesh

    # NVLink multicast (NVLS / multimem) is never used by ptp: it can take a host's GPUs out of service.
    for var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(var, "0" if var == "NCCL_NVLS_ENABLE" else "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    store = Join(init_method, rank, world, per_node, timeout_s).meet(flags or {})
    try:
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world,
                                timeout=timeout, **kwargs)
    except Exception as e:  # every rank registered, but one vanished before the group formed
        raise RankFailedError(
            f"rank {rank} could not join a group of {world} ranks within {timeout_s:.0f} s "
            f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}). Every rank must start "
            "and reach the same --dist-init-addr; check that all of them are running."
        ) from e
    mesh = init_device_mesh(device.type, (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
    d = Dist(rank=rank, world_size=world, device=device, mesh=mesh, dp_size=dp, pp_size=pp, tp_size=tp,
             ranks_per_node=per_node)
    if backend == "gloo" and dp == 1:
        d.cpu_group = dist.group.WORLD
    else:  # every rank creates every replica's group, in the same order
        for r in range(dp):
            group = dist.new_group(list(range(r * pp * tp, (r + 1) * pp * tp)), backend="gloo", timeout=timeout)
            if r == d.dp_rank:
                d.cpu_group = group
    if pp > 1 and backend == "nccl":  # NCCL: a group's first operation must involve all of it, not one pair
        dist.all_reduce(torch.zeros(1, device=device))
    comm.set_tp_group(mesh["tp"].get_group() if tp > 1 else None)
    return d


JOIN_CAUSES = ("Usual causes: a node not started (or started after the others gave up), a firewall between the "
               "nodes (the port of --dist-init-addr and the ports gloo/NCCL open), a --dist-init-addr that is not "
               "node 0's address, or --nnodes / --tp / --pp-size differing between the nodes.")


class Join:
    """Meeting the other ranks before the process group forms, so that start-up can say who is missing.

    Global rank 0 hosts a TCP store at --dist-init-addr (under torchrun the agent's store is used);
    each rank writes its flags under its own key and bumps a counter; each waits until the counter
    reaches the world size or `timeout_s` passes."""

    def __init__(self, init_method: str | None, rank: int, world: int, per_node: int, timeout_s: float):
        self.rank, self.world, self.per_node, self.timeout_s = rank, world, per_node, timeout_s
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        if init_method and init_method.startswith("tcp://"):
            self.host, port = init_method[len("tcp://"):].rsplit(":", 1)
        else:
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise ConfigError("ranks started by hand need MASTER_ADDR and MASTER_PORT (or run under torchrun).")
            self.host, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
        self.port, self.hosts_store = int(port), rank == 0 and not agent
        self.prefix = f"ptp/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"

    def node(self, rank: int) -> int:
        return rank // self.per_node

    def meet(self, flags: dict):
        timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            store = dist.TCPStore(self.host, self.port, self.world, is_master=self.hosts_store, timeout=timeout,
                                  wait_for_workers=False, multi_tenant=True)
        except Exception as e:
            raise RankFailedError(self._unreachable(e)) from e
        store.set(self._key(self.rank), json.dumps(flags))
        store.add(self.prefix + "joined", 1)
        deadline, checked = time.monotonic() + self.timeout_s, {self.rank}
        while True:
            # The count first: each rank writes its flags before it counts itself, so once every rank
            # has counted, every flag set is there to compare before this rank goes on (a rank that
            # went on without comparing would wait in the process group for a peer that was refused).
            everyone = store.add(self.prefix + "joined", 0) >= self.world
            for peer in range(self.world) if self.rank == 0 else [0]:
                if peer not in checked and (everyone or store.check([self._key(peer)])):
                    checked.add(peer)
                    self._compare(flags, json.loads(store.get(self._key(peer))), peer)
            if everyone:
                return store
            if time.monotonic() > deadline:
                raise RankFailedError(self._incomplete(store))
            time.sleep(0.05)

    def _key(self, rank: int) -> str:
        return f"{self.prefix}rank/{rank}"

    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    def _unreachable(self, e: Exception) -> str:
        why = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        return (f"rank {self.rank} could not join a group of {self.world} ranks within {self.timeout_s:.0f} s "
                f"(--dist-timeout): node {self.node(self.rank)} could not reach the meeting point {self._where()} "
                f"(--dist-init-addr), which node 0's rank 0 hosts ({why}). Joined: none seen; not joined: node 0 at "
                f"least. Start node 0 too, with the same flags. {JOIN_CAUSES}")

    def _incomplete(self, store) -> str:
        joined = [r for r in range(self.world) if store.check([self._key(r)])]
        missing = [r for r in range(self.world) if r not in joined]
        return (f"rank {self.rank} could not join a group of {self.world} ranks within {self.timeout_s:.0f} s "
                f"(--dist-timeout) at {self._where()} (--dist-init-addr). Joined: {self._by_node(joined)}; "
                f"not joined: {self._by_node(missing)}. {JOIN_CAUSES}")

    def _by_node(self, ranks: list[int]) -> str:
        if not ranks:
            return "none"
        nodes: dict[int, list[int]] = {}
        for r in ranks:
            nodes.setdefault(self.node(r), []).append(r)
        return ", ".join(f"node {n} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
                         for n, rs in nodes.items())

    def _compare(self, mine: dict, theirs: dict, peer: int) -> None:
        for name in [*mine, *(k for k in theirs if k not in mine)]:
            if mine.get(name) != theirs.get(name):
                if self.rank == 0:
                    mine, theirs, me, other = theirs, mine, peer, 0
                else:
                    me, other = self.rank, 0
                raise ConfigError(
                    f"node {self.node(me)} (rank {me}) was started with {name} {mine.get(name)} but node "
                    f"{self.node(other)} (rank {other}) with {name} {theirs.get(name)}: every node must run the "
                    "same command (only --node-rank differs). Restart them with the same flags."
                )


IDLE_WAIT = datetime.timedelta(days=365)


class StepChannel:
    """Rank 0 → every rank: each step's batch as integers over the CPU group, no pickling.

    One broadcast of a fixed small buffer carries the length and, usually, the whole batch; a
    larger batch (a long prefill) follows in a second broadcast. Length -1 means "stop"."""

    CAPACITY = 2048

    def __init__(self, d: Dist):
        self.d = d
        self.head = torch.empty(self.CAPACITY, dtype=torch.long)

    def send(self, batch) -> None:
        ints = [-1] if batch is None else batch.encode()
        size = len(ints) if batch is not None else -1
        first = ints[: self.CAPACITY - 1] if batch is not None else []
        self.head[0] = size
        self.head[1: 1 + len(first)] = torch.tensor(first, dtype=torch.long)
        dist.broadcast(self.head, src=self.d.leader, group=self.d.cpu_group)
        if size > self.CAPACITY - 1:
            dist.broadcast(torch.tensor(ints[self.CAPACITY - 1:], dtype=torch.long), src=self.d.leader,
                           group=self.d.cpu_group)

    def post(self, batch) -> list:
        """send() without waiting: the step's broadcasts are queued, each with tensors of its own, and
        their works returned (wait for them before the step's result is used). The micro-batched
        pipeline's leader sends this way: a gloo broadcast returns only once every rank took it, and
        the later stages take the next step only after their part of the earlier ones."""
        ints = batch.encode()
        head = torch.empty(self.CAPACITY, dtype=torch.long)
        head[0] = len(ints)
        first = ints[: self.CAPACITY - 1]
        head[1: 1 + len(first)] = torch.tensor(first, dtype=torch.long)
        works = [dist.broadcast(head, src=self.d.leader, group=self.d.cpu_group, async_op=True)]
        if len(ints) > self.CAPACITY - 1:
            rest = torch.tensor(ints[self.CAPACITY - 1:], dtype=torch.long)
            works.append(dist.broadcast(rest, src=self.d.leader, group=self.d.cpu_group, async_op=True))
        return works

    def receive(self):
        self._wait_for_head()
        size = int(self.head[0])
        if size < 0:
            return None
        ints = self.head[1: 1 + min(size, self.CAPACITY - 1)].tolist()
        if size > self.CAPACITY - 1:
            rest = torch.empty(size - (self.CAPACITY - 1), dtype=torch.long)
            dist.broadcast(rest, src=self.d.leader, group=self.d.cpu_group)
            ints += rest.tolist()
        return StepBatch.decode(ints)

    def _wait_for_head(self) -> None:
        """The broadcast of the next step's head, with no deadline: an idle server sends nothing for as
        long as no request comes, and --dist-timeout (the group's timeout) would end the ranks waiting."""
        group = self.d.cpu_group
        opts = dist.BroadcastOptions()
        opts.rootRank = dist.get_group_rank(group, self.d.leader)
        opts.rootTensor = 0
        opts.timeout = IDLE_WAIT
        group.broadcast([self.head], opts).wait()


def teardown_together(d: Dist, runner) -> None:
    """Every rank at once when rank 0 stops: release the graphs, the model, the KV cache
    and the symmetric-memory buffer, wait for each other (gloo), then destroy the process group in
    order. Memory mapped from a peer and NCCL communicators are let go while every peer is still
    alive: a rank 0 that tore down alone after its peers had exited stayed hung on the GPUs."""
    import gc

    runner.release()
    comm.set_tp_group(None)  # drops the symmetric-memory buffer
    gc.collect()
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier(group=d.cpu_group)
    dist.destroy_process_group()


def shutdown(d: Dist) -> None:
    """Tear the process group down. NCCL's orderly teardown has hung on the GPUs once the other ranks
    were gone, so on CUDA the communicators are aborted instead (nothing is in flight by then)."""
    if d.world_size > 1:
        release_process_group(d.device.type == "cuda")


def release_process_group(cuda: bool) -> None:
    """Leave the process group (also after a failed start), so a later engine can form a new one."""
    comm.set_tp_group(None)
    if not dist.is_initialized():
        return
    try:
        if cuda:
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception as e:  # peers already gone: nothing left to release with them
        log.warning("process-group teardown: %s", e)
