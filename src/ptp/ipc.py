"""Messages between the front end and the engine replicas: msgspec structs over ZeroMQ.

Why these two: pyzmq gives message framing, reconnects and addressing by peer (ROUTER) over IPC
on one host and TCP across hosts, with no broker; msgspec encodes typed structs to msgpack in a
few microseconds and checks them on decoding. SGLang and vLLM pair their front ends and engine
cores the same way.

Each direction has its own socket, each used by one thread only (ZeroMQ sockets are not thread
safe): the front end sends through a ROUTER (addressed by replica) and receives on a PULL; a
replica receives on a DEALER and sends on a PUSH. A replica sends one `Outputs` per step, with
every sample's new tokens and its load.
"""
from __future__ import annotations

import os
import tempfile
import uuid

import msgspec

from ptp.outputs import SeqUpdate
from ptp.sampling import SamplingParams


class Add(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    index: int | None = None   # one sample of the request, or all


class Stop(msgspec.Struct, tag=True, array_like=True):
    pass


class Load(msgspec.Struct, array_like=True):
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks: int = 1
    preemptions: int = 0
    finished: int = 0           # requests this replica has finished since it started
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache since start
    prefix_hit_tokens: int = 0    # of which found there


class Ready(msgspec.Struct, tag=True, array_like=True):
    replica: int
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int
    pids: list[int]             # the replica's processes: its leader first


class Outputs(msgspec.Struct, tag=True, array_like=True):
    replica: int
    updates: list[SeqUpdate]
    load: Load
    rejected: list[tuple[str, str]] = []   # (request id, why) for requests the engine refused


class Failed(msgspec.Struct, tag=True, array_like=True):
    replica: int
    message: str


class Stopped(msgspec.Struct, tag=True, array_like=True):
    replica: int


ToReplica = Add | Abort | Stop
FromReplica = Ready | Outputs | Failed | Stopped

encode = msgspec.msgpack.Encoder().encode
decode_to_replica = msgspec.msgpack.Decoder(ToReplica).decode
decode_from_replica = msgspec.msgpack.Decoder(FromReplica).decode


def new_addresses(host: str | None = None) -> tuple[str, str]:
    """(to replicas, from replicas): IPC paths on this host, or TCP ports on `host` for replicas elsewhere."""
    if host is None:
        base = os.path.join(tempfile.gettempdir(), f"ptp-{uuid.uuid4().hex[:12]}")
        return f"ipc://{base}-in", f"ipc://{base}-out"
    from ptp.ranks import free_port
    return f"tcp://{host}:{free_port()}", f"tcp://{host}:{free_port()}"
