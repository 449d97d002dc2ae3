"""Block tables of the running requests, kept on the cache's device and updated in place.

Each request that runs gets a row (released when it leaves); each layer group has a
``[rows, width]`` int32 table. While a request holds its row its tables only grow by
appending (full attention appends blocks; a sliding ring appends recycled ids and keeps
stale entries), so a step only has to write the entries appended since the last step, and
only for the requests the allocators marked as changed: ``pending_updates`` lists them,
``flat_updates`` turns them into (flat index, block id) pairs, which travel to the device in
the step's one host-to-device copy and land with one ``index_copy_``. A step's block tables
are then a gather of its rows, with no per-step table building on the host.
"""
from __future__ import annotations

import torch



def table_width(max_context: int, block_size: int, num_blocks: int, all_full_attention: bool) -> int:
    """Columns every table needs: the longest context the model takes; with full attention
    only, also no more blocks than the cache has (sliding rings keep stale columns, so their
    tables grow with the sequence, not with the ring)."""
    width = -(-max_context // block_size)
    return min(width, num_blocks) if all_full_attention else width


class DeviceBlockTables:
    def __init__(self, num_groups: int, width: int, device, rows: int = 64):
        self.all = torch.zeros(num_groups, rows, width, dtype=torch.int32, device=device)  # [groups, rows, width]
        self.row_of: dict[str, int] = {}
        self.free_rows = list(range(rows - 1, -1, -1))
        self.synced: list[dict[str, int]] = [{} for _ in range(num_groups)]  # entries already on the device

    @property
    def width(self) -> int:
        return self.all.shape[2]

    @property
    def num_rows(self) -> int:
        return self.all.shape[1]

    def table(self, group: int) -> torch.Tensor:
        return self.all[group]

    def row(self, request_id: str) -> int:
        """The request's row (assigned on first use; the tables grow when rows run out)."""
        row = self.row_of.get(request_id)
        if row is None:
            if not self.free_rows:
                old = self.num_rows
                self.all = torch.cat([self.all, torch.zeros_like(self.all)], dim=1)
                self.free_rows.extend(range(2 * old - 1, old - 1, -1))
            row = self.free_rows.pop()
            self.row_of[request_id] = row
        return row

    def release(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self.free_rows.append(row)
            for synced in self.synced:
                synced.pop(request_id, None)

    def pending_updates(self, request_id: str, host_tables: list[list[int]], out: list[int]) -> int:
        """Append to ``out`` the (group, row, column, block id) quadruples that bring the
        request's row up to ``host_tables`` (one list per group), mark them synced (the
        caller applies them before the step reads the tables), and return the row."""
        row = self.row(request_id)
        for g, table in enumerate(host_tables):
            done = self.synced[g].get(request_id, 0)
            n = len(table)
            if n == done:
                continue
            if n > self.width:
                self.all = torch.nn.functional.pad(self.all, (0, max(n, 2 * self.width) - self.width))
            if n < done:  # not append-only after all: rewrite the whole row
                done = 0
            for col in range(done, n):
                out += (g, row, col, table[col])
            self.synced[g][request_id] = n
        return row

    def sync_rows(self, request_ids, allocators, out: list[int]) -> list[int]:
        """``pending_updates`` for the requests whose tables changed since the last sync (each
        allocator's ``changed`` set, cleared here), then the rows of ``request_ids``. A request
        whose tables did not change costs one dict lookup."""
        changed = allocators[0].changed if len(allocators) == 1 else set().union(*(a.changed for a in allocators))
        if changed:
            tables = [a.tables for a in allocators]
            for rid in changed:
                self.pending_updates(rid, [t.get(rid, []) for t in tables], out)
            for a in allocators:
                a.changed.clear()
        get_row = self.row_of.get
        rows = [get_row(rid) for rid in request_ids]
        if None in rows:  # a request with no blocks yet (nothing to write): a row all the same
            rows = [self.row(rid) if row is None else row for rid, row in zip(request_ids, rows)]
        return rows

    def flat_updates(self, quads: list[int]) -> list[int]:
        """(group, row, column, block id) quadruples as (index into ``all``, block id) pairs,
        for the tables' shape now (rows and width only grow while a step is planned, so this
        runs just before the step's copy to the device)."""
        rows, width = self.num_rows, self.width
        it = iter(quads)
        return [v for g, row, col, block in zip(it, it, it, it) for v in ((g * rows + row) * width + col, block)]

    def apply(self, updates: torch.Tensor) -> None:
        """Write ``updates`` ([2 * n] int64 on the device, from ``flat_updates``)."""
        if updates.numel() == 0:
            return
        pairs = updates.view(-1, 2)
        self.all.view(-1).index_copy_(0, pairs[:, 0], pairs[:, 1].to(torch.int32))
