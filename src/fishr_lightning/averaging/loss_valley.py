"""SWAD's loss valley: *which* segments of training to average (Cha et al., NeurIPS 2021, Sec. 3.3).

Pure Python, no torch: the decisions only. Training is cut into *segments* by the evaluations (a
segment holds the optimizer steps since the previous evaluation); after each evaluation the
validation loss of the segment's last weights is fed to ``LossValley.update``, which answers with
the segments to add to the final average now. ``SWADCallback`` keeps the weights (the mechanics).

This follows khanrc/swad's ``LossValley`` (``domainbed/swad.py``) step for step, its quirks
included, so that averaged runs can be compared with the SWAD paper's:

- the valley opens at the first evaluation after which the oldest of the last ``n_converge`` losses
  is the lowest of them (ties: the oldest wins, as ``np.argmin``); that segment (the *converge
  segment*) only stands in for the average until a first segment is added, and is replaced by it;
- the threshold is the mean of those ``n_converge`` losses times ``1 + tolerance_ratio``;
- afterwards the oldest segment of the last ``n_tolerance`` is added while the lowest loss of those
  ``n_tolerance`` stays under the threshold; once it exceeds it the valley is *dead*: nothing more is
  added and SWAD stops training;
- ``n_tolerance < n_converge``: at the opening, segments 2 .. ``n_converge − n_tolerance + 1`` of
  the converge window are added at once;
- ``n_tolerance > n_converge``: at the opening, the earlier segments of the tolerance window back
  to the last one above the threshold are added (khanrc/swad skips the first of them, and later
  adds the converge segment again, or the oldest segment several times while the tolerance window
  is not yet full: a segment may count more than once);
- at the end of a run whose valley is still open, the segments of the tolerance window but its
  oldest (already decided) are added while the lowest remaining loss stays under the threshold;
- a valley that never opened leaves the last segment alone (``LossValley.final_segments``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


class LossValleyError(ValueError):
    """Settings or losses the loss valley cannot decide from; the message says what to change."""


@dataclass(frozen=True)
class Segment:
    index: int  # 0 for the steps up to the first evaluation, 1 for those up to the second, ...
    loss: float  # validation loss of the segment's last weights


@dataclass(frozen=True)
class SWADWindow:
    """The outcome of a sequence of validation losses (``swad_window``).

    ``segments``: the segments whose averages make the final weights, with their multiplicity, in
    the order they were added; ``start``/``end``: the first and last of them; ``converged_at``: the
    segment after whose evaluation the valley opened (None: never); ``stopped_at``: the segment after
    whose evaluation the valley died and SWAD stops training (None: it did not).
    """

    segments: tuple[int, ...]
    converged_at: int | None
    stopped_at: int | None

    @property
    def start(self) -> int:
        return self.segments[0]

    @property
    def end(self) -> int:
        return self.segments[-1]


@dataclass
class LossValley:
    """SWAD's segment-selection state machine (module docstring); see ``swad_window`` for a trace.

    Args:
        n_converge: window of losses whose oldest must be the lowest to open the valley (SWAD: 3).
        n_tolerance: window over which the lowest loss must stay under the threshold (SWAD: 6).
        tolerance_ratio: threshold = mean of the converge window × (1 + ratio) (SWAD: 0.3; 0.2 on VLCS).
    """

    n_converge: int = 3
    n_tolerance: int = 6
    tolerance_ratio: float = 0.3
    converge_window: deque[Segment] = field(init=False)
    tolerance_window: deque[Segment] = field(init=False)
    num_segments: int = field(init=False, default=0)
    converge_segment: int | None = field(init=False, default=None)
    threshold: float | None = field(init=False, default=None)
    dead: bool = field(init=False, default=False)
    added: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        for name in ("n_converge", "n_tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LossValleyError(
                    f"{name}={value!r}: it is a number of evaluations, a positive integer (SWAD: 3 and 6)."
                )
        if not (isinstance(self.tolerance_ratio, (int, float)) and self.tolerance_ratio >= 0):
            raise LossValleyError(f"tolerance_ratio={self.tolerance_ratio!r}: it must be >= 0 (SWAD: 0.3).")
        self.reset()

    def reset(self) -> None:
        """Forget every segment (a new run)."""
        self.converge_window = deque(maxlen=self.n_converge)
        self.tolerance_window = deque(maxlen=self.n_tolerance)
        self.num_segments, self.converge_segment, self.threshold, self.dead = 0, None, None, False
        self.added = []

    @property
    def converged(self) -> bool:
        return self.converge_segment is not None

    def update(self, loss: float) -> list[int]:
        """Record the next segment's validation loss; returns the segments to add to the average now
        (in order; the first addition replaces the converge segment's stand-in)."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise LossValleyError(
                f"The validation loss of segment {self.num_segments} is {loss}: SWAD cannot place a loss valley on "
                "non-finite losses. Check the monitored metric (it must be a finite validation loss) and the training."
            )
        if self.dead:  # khanrc/swad returns before recording anything once the valley is dead
            return []
        segment = Segment(self.num_segments, loss)
        self.num_segments += 1
        self.converge_window.append(segment)
        self.tolerance_window.append(segment)
        if not self.converged:
            return self._added(self._open_valley())
        if self.tolerance_window[0].index < self.converge_segment:
            return []
        if min(s.loss for s in self.tolerance_window) > self.threshold:
            self.dead = True
            return []
        return self._added([self.tolerance_window[0].index])

    def _open_valley(self) -> list[int]:
        if len(self.converge_window) < self.n_converge:
            return []
        losses = [s.loss for s in self.converge_window]
        if losses.index(min(losses)) != 0:
            return []
        self.converge_segment = self.converge_window[0].index
        self.threshold = sum(losses) / len(losses) * (1.0 + self.tolerance_ratio)
        if self.n_tolerance < self.n_converge:
            return [self.converge_window[1 + i].index for i in range(self.n_converge - self.n_tolerance)]
        if self.n_tolerance > self.n_converge:
            earlier = list(self.tolerance_window)[: self.n_tolerance - self.n_converge + 1]
            start = next((i + 1 for i in reversed(range(len(earlier))) if earlier[i].loss > self.threshold), 0)
            return [s.index for s in earlier[start + 1 :]]
        return []

    def _added(self, indices: list[int]) -> list[int]:
        self.added.extend(indices)
        return indices

    def closing_segments(self) -> list[int]:
        """What khanrc/swad's ``get_final_model`` adds at the end of a run whose valley is open and
        alive: the tolerance window but its oldest, while its lowest remaining loss stays under the
        threshold. Nothing is recorded: call ``update`` no more after using it."""
        if not self.converged or self.dead:
            return []
        remaining = list(self.tolerance_window)[1:]
        closing = []
        while remaining and min(s.loss for s in remaining) <= self.threshold:
            closing.append(remaining.pop(0).index)
        return closing

    def final_segments(self) -> list[int]:
        """The segments whose averages make the final weights if training ended now, with multiplicity:
        the added ones and the closing ones; the converge segment alone when none was added; the last
        segment alone when the valley never opened (khanrc/swad's fallback)."""
        if self.num_segments == 0:
            return []
        if not self.converged:
            return [self.converge_window[-1].index]
        segments = self.added + self.closing_segments()
        return segments or [self.converge_segment]

    def segments_to_keep(self) -> set[int]:
        """Segments whose weights a later decision may still need: those in either window, and the
        converge segment while it stands in for the average."""
        keep = {s.index for s in self.converge_window} | {s.index for s in self.tolerance_window}
        if self.converged and not self.added:
            keep.add(self.converge_segment)
        return keep

    def status(self) -> str:
        if not self.converged:
            return "valley never opened: the last segment's average"
        if self.dead:
            return "valley closed"
        return "run ended in the valley: the averaging so far"

    def state_dict(self) -> dict[str, Any]:
        return {
            "converge_window": [(s.index, s.loss) for s in self.converge_window],
            "tolerance_window": [(s.index, s.loss) for s in self.tolerance_window],
            "num_segments": self.num_segments,
            "converge_segment": self.converge_segment,
            "threshold": self.threshold,
            "dead": self.dead,
            "added": list(self.added),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.converge_window.extend(Segment(int(i), float(loss)) for i, loss in state["converge_window"])
        self.tolerance_window.extend(Segment(int(i), float(loss)) for i, loss in state["tolerance_window"])
        self.num_segments = int(state["num_segments"])
        self.converge_segment = state["converge_segment"]
        self.threshold = state["threshold"]
        self.dead = bool(state["dead"])
        self.added = [int(i) for i in state["added"]]


def swad_window(
    losses: Iterable[float], n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3
) -> SWADWindow:
    """The segments SWAD averages for a sequence of per-segment validation losses.

    Training stops at ``stopped_at`` when the valley dies, so later losses are not read.
    """
    valley = LossValley(n_converge, n_tolerance, tolerance_ratio)
    stopped_at = converged_at = None
    for index, loss in enumerate(losses):
        valley.update(loss)
        if converged_at is None and valley.converged:
            converged_at = index
        if valley.dead:
            stopped_at = index
            break
    if valley.num_segments == 0:
        raise LossValleyError("No validation loss was given: SWAD needs at least one evaluation.")
    return SWADWindow(tuple(valley.final_segments()), converged_at, stopped_at)
