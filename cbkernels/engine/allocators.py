"""Physical block pool with prefix caching, and the per-layer-group block allocators.

``BlockPool`` owns the physical block ids: reference counts, the free list, and the prefix
cache (hash of a full block, chained with its prefix -> block id) whose unreferenced blocks
stay reusable until evicted in LRU order. An allocator turns a request's logical blocks into
physical ones for one kind of layer: ``FullAttentionCacheAllocator`` keeps every block,
``SlidingAttentionCacheAllocator`` recycles a ring of ``ceil(W / block_size) + 1`` blocks.
"""
from __future__ import annotations

import hashlib
import struct
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from typing import Callable, Optional, Sequence

from .inputs import check_count, check_request_id

# Bytes of a block hash: 128 bits keeps accidental collisions out of reach (and a hit is
# still checked against the block's tokens).
HASH_BYTES = 16


class OutOfBlocks(RuntimeError):
    """More blocks asked for than are free: a resource shortage, not a bad argument (the
    scheduler waits or preempts on it). Bad arguments raise TypeError / ValueError naming
    them; freeing an unknown request id is a no-op, so freeing twice is safe."""


def chain_hash(parent: Optional[int], block_tokens: Sequence[int]) -> int:
    """Hash of one full block, chained with the hash of everything before it: BLAKE2b of the
    parent hash and the token ids as little-endian int64, so every process (every rank of a
    multi-process server) computes the same value, unlike Python's per-process salted hash()."""
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(b"\x00" * HASH_BYTES if parent is None else parent.to_bytes(HASH_BYTES, "little"))
    h.update(struct.pack(f"<{len(block_tokens)}q", *block_tokens))
    return int.from_bytes(h.digest(), "little")


class BlockPool:
    def __init__(self, num_blocks: int, hash_fn: Callable[[Optional[int], Sequence[int]], int] = chain_hash):
        check_count("num_blocks", num_blocks, 1)
        self.num_blocks = num_blocks
        self.hash_fn = hash_fn
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.block_to_hash: dict[int, int] = {}
        # What each cached block holds: (parent hash, token ids). A hash match is a hit only
        # when these match too, so a collision can never hand one prompt another's K/V.
        self.block_content: dict[int, tuple[Optional[int], tuple[int, ...]]] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but cached; LRU first

    def num_free(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    def take(self) -> int:
        if self.free_ids:
            block = self.free_ids.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.hash_to_block[self.block_to_hash.pop(block)]
            del self.block_content[block]
        else:
            raise OutOfBlocks("no free KV cache block")
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"block {block} released more often than taken")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self.block_to_hash:
                self.evictable[block] = None
            else:
                self.free_ids.append(block)

    def lookup(self, block_hash: int, parent: Optional[int], tokens: Sequence[int]) -> Optional[int]:
        """The cached block holding ``tokens`` after the prefix hashed ``parent``, or None."""
        block = self.hash_to_block.get(block_hash)
        if block is None or self.block_content[block] != (parent, tuple(tokens)):
            return None
        return block

    def register(self, block: int, block_hash: int, parent: Optional[int], tokens: Sequence[int]) -> None:
        if block_hash in self.hash_to_block or block in self.block_to_hash:
            return  # the same content (or a colliding hash) is already cached under another block
        self.hash_to_block[block_hash] = block
        self.block_to_hash[block] = block_hash
        self.block_content[block] = (parent, tuple(tokens))

    def is_cached(self, block: int) -> bool:
        return block in self.block_to_hash


def _check_allocation(n, request_id, num_computed) -> None:
    check_count("n", n, 0)
    check_request_id(request_id)
    check_count("num_computed", num_computed, 0)


class CacheAllocator(ABC):
    """Logical -> physical blocks of every request, for one group of layers."""

    sliding_window: Optional[int] = None

    def __init__(self, pool: BlockPool, block_size: int):
        if not isinstance(pool, BlockPool):
            raise TypeError(f"pool must be a BlockPool, got {type(pool).__name__}")
        check_count("block_size", block_size, 1)
        self.pool = pool
        self.block_size = block_size
        self.tables: dict[str, list[int]] = {}
        # Requests whose table changed since the device copy last read it (DeviceBlockTables
        # syncs only these, so a step does not look at every running request's table).
        self.changed: set[str] = set()

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    @abstractmethod
    def blocks_needed(self, request_id: str, num_computed: int, new_len: int) -> int:
        """Fresh blocks the request needs so that positions < new_len have a slot."""

    @abstractmethod
    def allocate_blocks(self, n: int, request_id: str, num_computed: int = 0) -> list[int]:
        """Append ``n`` logical blocks to the request; returns their physical ids."""

    @abstractmethod
    def free_blocks(self, request_id: str) -> None:
        """Give every block of the request back to the pool."""

    def trim(self, request_id: str, num_computed: int) -> None:
        """Release blocks no future query can see (sliding windows only)."""

    def peak_blocks(self, total_len: int, max_batch_tokens: int) -> int:
        """Most blocks a request of ``total_len`` tokens ever holds at once, when a step
        computes at most ``max_batch_tokens`` of its tokens."""
        return -(-total_len // self.block_size)

    @abstractmethod
    def fork_cost(self, parent_id: str, num_computed: int) -> int:
        """Fresh blocks ``fork`` takes from the pool."""

    @abstractmethod
    def fork(self, parent_id: str, child_id: str, num_computed: int) -> list[tuple[int, int]]:
        """Give ``child_id`` (no blocks yet) the parent's K/V of positions < ``num_computed``
        (num_return_sequences siblings); returns the (src, dst) block copies to run."""


class FullAttentionCacheAllocator(CacheAllocator):
    def blocks_needed(self, request_id, num_computed, new_len):
        return max(0, -(-new_len // self.block_size) - len(self.block_table(request_id)))

    def allocate_blocks(self, n, request_id, num_computed=0):
        _check_allocation(n, request_id, num_computed)
        if n > self.pool.num_free():
            raise OutOfBlocks(f"request {request_id} needs {n} blocks, {self.pool.num_free()} free")
        new = [self.pool.take() for _ in range(n)]
        self.tables.setdefault(request_id, []).extend(new)
        self.changed.add(request_id)
        return new

    def free_blocks(self, request_id):
        self.changed.discard(request_id)
        for block in self.tables.pop(request_id, []):
            self.pool.release(block)

    def fork_cost(self, parent_id, num_computed):
        return 1 if num_computed % self.block_size else 0

    def fork(self, parent_id, child_id, num_computed):
        """Share the parent's blocks by reference count; a partly written last block (the
        child writes its next token there) is copied."""
        shared = self.tables[parent_id][:-(-num_computed // self.block_size)]
        for block in shared:
            self.pool.share(block)
        self.tables[child_id] = list(shared)
        self.changed.add(child_id)
        copy = self.copy_on_write(child_id, len(shared) - 1) if num_computed % self.block_size else None
        return [copy] if copy is not None else []

    def adopt(self, request_id: str, block: int) -> None:
        """Append an already cached block (a prefix-cache hit) to the request."""
        self.pool.share(block)
        self.tables.setdefault(request_id, []).append(block)
        self.changed.add(request_id)

    def copy_on_write(self, request_id: str, logical: int) -> Optional[tuple[int, int]]:
        """Before writing into logical block ``logical``: if it is cached (possibly shared),
        give the request a private copy. Returns (src, dst) for ``copy_blocks``, or None."""
        table = self.tables[request_id]
        src = table[logical]
        if not self.pool.is_cached(src) and self.pool.ref_counts[src] == 1:
            return None
        dst = self.pool.take()
        table[logical] = dst
        self.changed.add(request_id)
        self.pool.release(src)
        return src, dst


class SlidingAttentionCacheAllocator(CacheAllocator):
    """A request keeps a ring of ``ceil(W / block_size) + 1`` blocks while decoding. A block
    whose positions all fell out of the window is reused for the next logical block, so the
    block table keeps stale entries before the window: they point at valid blocks and every
    kernel masks them out. A long prefill chunk grows the ring for its step; ``trim`` gives
    the extra blocks back once the chunk is done."""

    def __init__(self, pool: BlockPool, block_size: int, sliding_window: int):
        super().__init__(pool, block_size)
        check_count("sliding_window", sliding_window, 1)
        self.sliding_window = sliding_window
        self.ring_size = -(-sliding_window // block_size) + 1
        self.held: dict[str, deque[int]] = {}  # logical indices still owned, oldest first

    def _recyclable(self, request_id, num_computed) -> int:
        first_visible = num_computed - self.sliding_window + 1
        return sum(1 for lg in self.held.get(request_id, ()) if (lg + 1) * self.block_size <= first_visible)

    def blocks_needed(self, request_id, num_computed, new_len):
        new = max(0, -(-new_len // self.block_size) - len(self.block_table(request_id)))
        return max(0, new - self._recyclable(request_id, num_computed))

    def allocate_blocks(self, n, request_id, num_computed=0):
        _check_allocation(n, request_id, num_computed)
        table = self.tables.setdefault(request_id, [])
        held = self.held.setdefault(request_id, deque())
        first_visible = num_computed - self.sliding_window + 1
        fresh = max(0, n - self._recyclable(request_id, num_computed))
        if fresh > self.pool.num_free():
            raise OutOfBlocks(f"request {request_id} needs {fresh} blocks, {self.pool.num_free()} free")
        new = []
        for _ in range(n):
            if held and (held[0] + 1) * self.block_size <= first_visible:
                block = table[held.popleft()]
            else:
                block = self.pool.take()
            held.append(len(table))
            table.append(block)
            new.append(block)
        self.changed.add(request_id)
        return new

    def trim(self, request_id, num_computed):
        held = self.held.get(request_id)
        first_visible = num_computed - self.sliding_window + 1  # of the next query
        while held and len(held) > self.ring_size and (held[0] + 1) * self.block_size <= first_visible:
            self.pool.release(self.tables[request_id][held.popleft()])

    def free_blocks(self, request_id):
        self.changed.discard(request_id)
        table = self.tables.pop(request_id, [])
        for logical in self.held.pop(request_id, ()):
            self.pool.release(table[logical])

    def _forked(self, parent_id, num_computed) -> list[int]:
        end = -(-num_computed // self.block_size)
        return [lg for lg in self.held.get(parent_id, ()) if lg < end]

    def fork_cost(self, parent_id, num_computed):
        return len(self._forked(parent_id, num_computed))

    def fork(self, parent_id, child_id, num_computed):
        """A ring recycles its blocks, so it cannot be shared: the child gets a copy of every
        block the parent still holds (stale entries before the window are kept as they are)."""
        table = self.tables[parent_id][:-(-num_computed // self.block_size)]
        copies, held = [], deque()
        child = list(table)
        for logical in self._forked(parent_id, num_computed):
            child[logical] = self.pool.take()
            copies.append((table[logical], child[logical]))
            held.append(logical)
        self.tables[child_id], self.held[child_id] = child, held
        self.changed.add(child_id)
        return copies

    def peak_blocks(self, total_len, max_batch_tokens):
        # A prefill chunk holds the window before it plus the whole chunk until ``trim``.
        chunk_peak = -(-(self.sliding_window + max_batch_tokens) // self.block_size) + 1
        return min(-(-total_len // self.block_size), max(self.ring_size, chunk_peak))
