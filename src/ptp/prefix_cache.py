"""Prefix caching: a radix tree over full KV-cache blocks, keyed by the token ids they hold.

Each node below the root is one full block: its key is the block's `block_size` token ids, its path
from the root the tokens before them, so a node's keys and values depend on exactly the tokens on
its path (causal attention, positions from 0). A new sequence walks the tree along its tokens and
takes the blocks it finds instead of computing them; the blocks of its prompt join the tree as soon
as they are full (so that requests running side by side share a system prompt), those of its output
when it finishes or is preempted (no tree work per decode step), and all stay there after it.

Ownership is counted per block by the allocator (`BlockAllocator.refs`): the tree holds each of its
blocks once, and each sequence whose table lists a block holds it once more. A sequence holds the
tree's blocks as a chain from the root (its first blocks), so a node held by a sequence has every
ancestor held too. Blocks that only the tree holds count as free: when the allocator runs dry it has
the tree evict them, least recently used leaves first.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Iterable

from ptp.kv_cache import BlockAllocator


class Node:
    __slots__ = ("key", "block", "parent", "children", "depth", "last_used")

    def __init__(self, key: tuple[int, ...], block: int, parent: "Node | None", depth: int, last_used: int = 0):
        self.key, self.block, self.parent, self.depth = key, block, parent, depth
        self.children: dict[tuple[int, ...], Node] = {}
        self.last_used = last_used

    def path(self) -> list["Node"]:
        """The nodes from the root's child down to this one."""
        out, node = [], self
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


class PrefixCache:
    """The tree of cached blocks of one scheduler's KV cache (rank 0 decides; block ids travel to the
    other ranks in each step's block tables)."""

    def __init__(self, allocator: BlockAllocator):
        self.allocator = allocator
        self.block_size = allocator.block_size
        allocator.cache = self
        self.root = Node((), -1, None, 0)
        self.nodes: dict[int, Node] = {}  # block id -> its node
        self.num_evictable = 0            # nodes whose block only the tree holds
        self._clock = itertools.count(1)
        self._heap: list[tuple[int, int, Node]] = []  # (last_used, tie, leaf) of leaves that were evictable
        self._tie = itertools.count()

    # --- lookup ----------------------------------------------------------------------------------
    def match(self, tokens: list[int], max_blocks: int) -> list[Node]:
        """The nodes of the longest cached prefix of `tokens`, at most `max_blocks` blocks."""
        bs, node, out = self.block_size, self.root, []
        for i in range(max_blocks):
            child = node.children.get(tuple(tokens[i * bs: (i + 1) * bs]))
            if child is None:
                break
            out.append(child)
            node = child
        return out

    def evictable_among(self, nodes: Iterable[Node]) -> int:
        """How many of these nodes' blocks count as free now (taking them makes them not)."""
        refs = self.allocator.refs
        return sum(refs[n.block] == 1 for n in nodes)

    def acquire(self, nodes: list[Node], table: list[int]) -> None:
        """A sequence with an empty table takes the blocks of `nodes` (a chain from the root)."""
        now = next(self._clock)
        for node in nodes:
            self._share(node, now)
            table.append(node.block)

    # --- insertion -------------------------------------------------------------------------------
    def insert(self, node: Node, tokens: list[int], table: list[int]) -> Node:
        """Add the full blocks after `node` of a sequence whose table is `table` and which holds the
        chain up to `node`: `tokens` are the ids of blocks node.depth, node.depth + 1, ... (whole
        blocks only; their keys and values computed, or queued in a step before any that reads them).
        Stops before a block with a placeholder id (< 0: a token the host does not know yet). A block
        the tree already has for the same tokens replaces the sequence's own copy in `table` (the copy
        is freed). Returns the deepest node the sequence now holds."""
        bs, alloc, refs, nodes = self.block_size, self.allocator, self.allocator.refs, self.nodes
        now = next(self._clock)
        placeholders = bool(tokens) and min(tokens) < 0  # one C-speed scan instead of one per block
        for i in range(len(tokens) // bs):
            key = tuple(tokens[i * bs: (i + 1) * bs])
            if placeholders and min(key) < 0:
                break
            at = node.depth
            child = node.children.get(key)
            if child is None:
                block = table[at]
                child = Node(key, block, node, at + 1, now)
                node.children[key] = child
                nodes[block] = child
                refs[block] += 1  # the tree's hold; the sequence holds it too: not evictable
            elif child.block != table[at]:
                self._share(child, now)
                alloc.drop(table[at])
                table[at] = child.block
            node = child
        return node

    # --- holders come and go ---------------------------------------------------------------------
    def _share(self, node: Node, now: int) -> None:
        self.allocator.share(node.block)
        if self.allocator.refs[node.block] == 2:
            self.num_evictable -= 1
        node.last_used = now

    def unshared(self, block: int) -> None:
        """The allocator: `block` has one holder left. If that is the tree, the block counts as free."""
        node = self.nodes.get(block)
        if node is None:
            return
        self.num_evictable += 1
        node.last_used = next(self._clock)
        if not node.children:
            self._push(node)

    def _push(self, leaf: Node) -> None:
        heapq.heappush(self._heap, (leaf.last_used, next(self._tie), leaf))
        if len(self._heap) > 2 * len(self.nodes) + 64:  # mostly stale entries: rebuild
            self._heap = [(n.last_used, next(self._tie), n) for n in self.nodes.values() if self._is_evictable_leaf(n)]
            heapq.heapify(self._heap)

    def _is_evictable_leaf(self, node: Node) -> bool:
        return node.parent is not None and not node.children and self.allocator.refs[node.block] == 1

    def evict(self, count: int) -> None:
        """Free `count` blocks that only the tree holds, least recently used leaves first."""
        refs, free = self.allocator.refs, self.allocator.free
        while count > 0:
            if not self._heap:
                raise AssertionError(f"the prefix cache counts {self.num_evictable} evictable blocks but has no "
                                     f"evictable leaf left ({count} more blocks wanted)")
            last_used, _, node = heapq.heappop(self._heap)
            if node.last_used != last_used or not self._is_evictable_leaf(node):
                continue  # stale: used, grown or evicted since
            parent = node.parent
            del parent.children[node.key]
            del self.nodes[node.block]
            node.parent = None
            refs[node.block] = 0
            free.append(node.block)
            self.num_evictable -= 1
            count -= 1
            if parent.parent is not None and self._is_evictable_leaf(parent):
                self._push(parent)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.nodes)


def check_blocks(allocator: BlockAllocator, cache: PrefixCache | None, seqs) -> None:
    """Raise AssertionError naming every way the block bookkeeping is inconsistent: each block must be
    free, or held by the sequences whose tables list it and by the tree if it is there, with `refs`
    counting exactly those holders; the tree must be well formed (keys of block_size real token ids,
    parent links, depths, its evictable count); each sequence must hold a chain of tree blocks from
    the root that matches its tokens, then blocks of its own. `seqs`: every sequence that may hold
    blocks (running and waiting)."""
    problems: list[str] = []
    n, bs = allocator.num_blocks, allocator.block_size
    holders = [0] * n
    for s in seqs:
        for b in s.block_table:
            holders[b] += 1
    tree_blocks = set(cache.nodes) if cache is not None else set()
    for b in tree_blocks:
        holders[b] += 1
    bad = [(b, allocator.refs[b], holders[b]) for b in range(n) if allocator.refs[b] != holders[b]]
    if bad:
        problems.append(f"refs differ from the holders counted (block, refs, holders): {bad[:10]}")
    free = allocator.free
    if len(set(free)) != len(free):
        problems.append("the free list lists a block twice")
    if set(free) != {b for b in range(n) if holders[b] == 0}:
        problems.append(f"free list {sorted(free)[:20]} is not the set of blocks nobody holds")
    if cache is not None:
        seen, stack = 0, [cache.root]
        while stack:
            node = stack.pop()
            for key, child in node.children.items():
                seen += 1
                if child.key != key or len(key) != bs or min(key) < 0:
                    problems.append(f"node of block {child.block} has a bad key {key}")
                if child.parent is not node or child.depth != node.depth + 1:
                    problems.append(f"node of block {child.block} has a wrong parent or depth")
                if cache.nodes.get(child.block) is not child:
                    problems.append(f"block {child.block} is in the tree but not in its block index")
                if holders[child.block] > 1 and node.parent is not None and holders[node.block] < 2:
                    problems.append(f"block {child.block} is held by a sequence but its parent's is not")
                stack.append(child)
        if seen != len(cache.nodes):
            problems.append(f"the tree has {seen} nodes, its block index {len(cache.nodes)}")
        evictable = sum(holders[b] == 1 for b in tree_blocks)
        if evictable != cache.num_evictable:
            problems.append(f"{evictable} tree blocks are held by the tree alone; it counts {cache.num_evictable}")
        for s in seqs:
            node = s.cache_node or cache.root
            chain = node.path()
            if node is not cache.root and node.parent is None:
                problems.append(f"sequence {s.seq_id} holds an evicted node")
            if s.block_table[: len(chain)] != [c.block for c in chain]:
                problems.append(f"sequence {s.seq_id}'s first blocks are not its tree chain")
            if [t for c in chain for t in c.key] != s.all_ids[: len(chain) * bs]:
                problems.append(f"sequence {s.seq_id}'s tree chain does not match its tokens")
            if len(chain) * bs > s.num_computed and s.block_table:
                problems.append(f"sequence {s.seq_id} holds cached blocks beyond its computed tokens")
            own = [b for b in s.block_table[len(chain):] if b in tree_blocks or holders[b] != 1]
            if own:
                problems.append(f"sequence {s.seq_id}'s own blocks {own} are shared")
    if problems:
        raise AssertionError("KV block bookkeeping is inconsistent:\n  " + "\n  ".join(problems))
