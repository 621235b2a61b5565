"""The Thompson draw over the bandit's posteriors: the router's choice of route (numpy).

The maths it draws from (the prior, how much evidence counts) is `topics/bandit.py`; the
posteriors are stored by `state/bandit.py`; `workers/router/decide.py` ranks routes with it,
and `bench/simulate.py` runs it against simulated providers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from topics.bandit import EVIDENCE, PRIOR


class ThompsonSampler:
    """One Beta draw per arm, argmax. Each process seeds its own generator (from the OS when
    `seed` is None), so workers sharing the same posteriors still make independent draws.

    Arms come as stored (alpha, beta). The draw uses Beta(pa + k * (alpha - pa),
    pb + k * (beta - pb)) with (pa, pb) = `prior` (the store's prior) and k = `evidence`: every
    request's evidence counts k times. Decay being linear, this is exactly what storing every
    update k times larger would give.
    """

    def __init__(self, seed: int | None = None, *, prior: tuple[float, float] = PRIOR,
                 evidence: float = EVIDENCE) -> None:
        if evidence <= 0 or min(prior) <= 0:
            raise ValueError("evidence and the prior must be > 0")
        self._rng = np.random.default_rng(seed)
        self._prior = np.asarray(prior, dtype=np.float64)
        self._evidence = float(evidence)

    def draw(self, posteriors: Sequence[tuple[float, float]]) -> np.ndarray:
        """One sample of each arm's expected reward, vectorised."""
        if not posteriors:
            raise ValueError("no arms to choose from")
        ab = np.asarray(posteriors, dtype=np.float64)
        if self._evidence != 1.0:
            # max(): an arm read below its prior (never, but floats) must not go <= 0
            ab = np.maximum(self._prior + self._evidence * (ab - self._prior), 1e-9)
        samples: np.ndarray = self._rng.beta(ab[:, 0], ab[:, 1])
        return samples

    def choose(self, posteriors: Sequence[tuple[float, float]]) -> int:
        """The index of the arm with the highest draw."""
        return int(np.argmax(self.draw(posteriors)))

    def rank(self, posteriors: Sequence[tuple[float, float]]) -> list[int]:
        """Every arm's index, best draw first: the first choice, then the failover order."""
        return self.order(self.draw(posteriors))

    @staticmethod
    def order(draws: np.ndarray) -> list[int]:
        """The arms' indexes, best of `draws` first (what `rank` returns for them)."""
        order: list[int] = np.argsort(-draws, kind="stable").tolist()
        return order
