"""The row layout of a step: which clients sent which rows of the smashed data, here and over all processes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class StepLayout:
    """Which clients sent the rows of a step: this process's rows (client_ids, rows_per_client, in the order of the
    smashed data) and the rows of the whole pool (pool_ids, pool_rows: every process's, in the order keys gathered
    over processes arrive; the same as the local ones in a single process)."""

    client_ids: tuple[int, ...]
    rows_per_client: tuple[int, ...]
    pool_ids: tuple[int, ...]
    pool_rows: tuple[int, ...]

    @classmethod
    def single(cls) -> "StepLayout":
        """No layout yet (before the first step)."""
        return cls((), (), (), ())

    @classmethod
    def of(cls, client_ids: Sequence[int], rows_per_client: Sequence[int], pool_ids: Sequence[int] | None = None,
           pool_rows: Sequence[int] | None = None) -> "StepLayout":
        """A step's layout; without a pool, the local clients are the whole pool (one process)."""
        local = tuple(int(c) for c in client_ids), tuple(int(r) for r in rows_per_client)
        pool = local if pool_ids is None else (tuple(int(c) for c in pool_ids), tuple(int(r) for r in pool_rows or ()))
        return cls(*local, *pool)

    @staticmethod
    def _blocks(ids: Sequence[int], rows: Sequence[int]) -> list[tuple[int, int, int]]:
        offsets = np.concatenate([[0], np.cumsum(rows)]).astype(int).tolist()
        return [(client, offsets[j], offsets[j + 1]) for j, client in enumerate(ids)]

    def local_blocks(self) -> list[tuple[int, int, int]]:
        """(client, first row, end row) of each of this process's clients."""
        return self._blocks(self.client_ids, self.rows_per_client)

    def pool_blocks(self) -> list[tuple[int, int, int]]:
        """(client, first row, end row) of each pool client in the gathered rows."""
        return self._blocks(self.pool_ids, self.pool_rows)
