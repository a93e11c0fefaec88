"""The cost model of a model: how long one predict call takes for n rows, learnt online."""

from __future__ import annotations


class CostModel:
    """Fits ``t(n) = per_row_s * n + per_batch_s`` to every batch seen, recent batches weighing most.

    A least-squares fit over exponentially decayed sums: each batch multiplies the old evidence by
    ``decay``, so the model follows a model whose speed changes (warm caches, a busier machine)
    within a few dozen batches. While every batch so far had the same size, the fixed cost cannot
    be told apart from the per-row cost, and the time is taken as all per-row.
    """

    def __init__(self, decay: float = 0.95) -> None:
        self._decay = decay
        self._weight = 0.0
        self._sum_n = 0.0
        self._sum_t = 0.0
        self._sum_nn = 0.0
        self._sum_nt = 0.0
        self.per_row_s = 0.0
        self.per_batch_s = 0.0
        self.batches = 0

    @property
    def fitted(self) -> bool:
        return self.batches > 0

    def observe(self, rows: int, seconds: float) -> None:
        d = self._decay
        self._weight = self._weight * d + 1.0
        self._sum_n = self._sum_n * d + rows
        self._sum_t = self._sum_t * d + seconds
        self._sum_nn = self._sum_nn * d + rows * rows
        self._sum_nt = self._sum_nt * d + rows * seconds
        self.batches += 1
        self._refit()

    def _refit(self) -> None:
        mean_n = self._sum_n / self._weight
        mean_t = self._sum_t / self._weight
        variance = self._sum_nn / self._weight - mean_n * mean_n
        if variance > 1e-9 * max(1.0, mean_n * mean_n):
            slope = (self._sum_nt / self._weight - mean_n * mean_t) / variance
            intercept = mean_t - slope * mean_n
            if slope >= 0 and intercept >= 0:
                self.per_row_s, self.per_batch_s = slope, intercept
                return
            if slope >= 0:  # a negative fixed cost is noise: refit through the origin
                self.per_row_s, self.per_batch_s = self._sum_nt / self._sum_nn, 0.0
                return
        self.per_row_s, self.per_batch_s = mean_t / max(mean_n, 1e-9), 0.0

    def seconds(self, rows: int) -> float:
        """Predicted duration of one call on ``rows`` rows."""
        return self.per_row_s * rows + self.per_batch_s

    def __repr__(self) -> str:
        return f"CostModel(per_row_s={self.per_row_s:.6f}, per_batch_s={self.per_batch_s:.6f}, batches={self.batches})"
