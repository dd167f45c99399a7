"""L-BFGS in NumPy for smooth convex objectives, searching along lines the objective can
price cheaply.

An objective may offer `line(point, direction)`: a function of the step t returning the
value and the slope at point + t * direction, and `gradient(t)` for the step taken. A
linear model prices a line with one product (the scores of the direction), after which
any step costs elementwise work only; the step search then refines the step along the
line for free, where a plain function would pay a full evaluation per trial.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np


class Line(Protocol):
    def __call__(self, step: float) -> tuple[float, float]: ...  # value and slope at the step
    def gradient(self, step: float) -> np.ndarray: ...  # the gradient at a step just priced


class FunctionLine:
    """The line of a plain function returning (value, gradient): each step costs a call."""

    def __init__(self, function: Callable[[np.ndarray], tuple[float, np.ndarray]], point: np.ndarray,
                 direction: np.ndarray) -> None:
        self.function, self.point, self.direction = function, point, direction
        self.last: tuple[float, np.ndarray] | None = None

    def __call__(self, step: float) -> tuple[float, float]:
        value, gradient = self.function(self.point + step * self.direction)
        self.last = (step, gradient)
        return value, dot(gradient, self.direction)

    def gradient(self, step: float) -> np.ndarray:
        if self.last is None or self.last[0] != step:
            self(step)
        return self.last[1]


def lbfgs(function: Callable[[np.ndarray], tuple[float, np.ndarray]], point: np.ndarray, *, max_iter: int,
          gtol: float, memory: int = 10, history: deque | None = None,
          diagonal: Callable[[], np.ndarray] | None = None,
          known: tuple[float, np.ndarray] | None = None) -> tuple[np.ndarray, float, np.ndarray, deque, int]:
    """Minimise a smooth convex `function` (returning value and gradient) by L-BFGS.

    Stops when the largest gradient entry is at most `gtol` (scipy's and scikit-learn's
    criterion for lbfgs) or after `max_iter` iterations. Each iteration searches along
    `function.line(point, direction)` when the function has one (else a `FunctionLine`):
    see `search_step`. `history` (pairs s, y, 1/s'y) may be given to start from curvature
    learned elsewhere; it is updated in place and returned. `diagonal()`, if given,
    returns an estimate of the Hessian's diagonal at the point last evaluated; its inverse
    gives the first direction, taken before any curvature pair is known (then the usual
    scalar s'y / y'y: scaling the diagonal by the pairs instead stopped further from the
    optimum at weak penalties, in tests/test_heads.py). `known`: the value and gradient at
    `point`, when the caller has them (saves an evaluation).
    Returns (point, value, gradient, history, iterations).

    Why not scipy's L-BFGS-B: its bookkeeping, for bounds this problem does not have,
    cost 40 ms a call at 20,000 variables and grows with them (a sixth of the sweep at
    10 classes, measured); the two-loop recursion here costs 4 x memory x n flops.
    """
    history = history if history is not None else deque(maxlen=memory)
    value, gradient = function(point) if known is None else known
    line_of = getattr(function, "line", lambda at, direction: FunctionLine(function, at, direction))
    iterations = 0
    while iterations < max_iter and np.max(np.abs(gradient), initial=0.0) > gtol:
        iterations += 1
        inverse = 1.0 / diagonal() if diagonal is not None and not history else None
        direction = -two_loop(gradient, history, inverse)
        slope = dot(direction, gradient)
        if slope >= 0:  # not a descent direction (stale curvature): restart as steepest descent
            history.clear()
            direction = -two_loop(gradient, history, None if diagonal is None else 1.0 / diagonal())
            slope = dot(direction, gradient)
        line = line_of(point, direction)
        found = search_step(line, value, slope)
        if found is None:  # no decrease found: at the precision of float32 products, as scipy stops too
            break
        step, trial_value = found
        trial_gradient = line.gradient(step)
        s, y = step * direction, trial_gradient - gradient
        sy = dot(s, y)
        if sy > 1e-10 * dot(y, y):
            history.append((s, y, 1.0 / sy))
        point, value, gradient = point + s, trial_value, trial_gradient
    return point, value, gradient, history, iterations


REFINEMENTS = 2  # secant steps along a line whose slope shows the step far from its minimum


def search_step(line: Line, value: float, slope: float) -> tuple[float, float] | None:
    """A step along `line` (from `value`, with `slope` < 0 at step 0) and its value, or
    None when no step decreases the value.

    Starts at the unit step. A step that decreases the value enough (Armijo) is taken
    unless the slope there is still more than half the starting slope, either way; then
    secant steps on the slope (exact on a quadratic) look for the minimum, keeping the
    best value seen. Why: the first direction of a solve is scaled by an estimated
    diagonal only, and on 30,000 x 2048 features at 100 classes its unit step overshot
    the line's minimum (0.63) enough to cost one more iteration of the final solve (two
    products on every row), where the search costs elementwise passes. A step that does
    not decrease enough is cut back by safeguarded quadratic interpolation.
    """
    step, best, refinements = 1.0, None, 0
    for _ in range(30):
        trial_value, trial_slope = line(step)
        decreased = trial_value <= value + 1e-4 * step * slope
        # Near the optimum, decreases fall below the float32 rounding of the value
        # (~1e-7 relative): accept a step that the slope shows to be good (Hager and
        # Zhang's approximate Wolfe conditions) if the value did not rise beyond that.
        flat = trial_value <= value + 1e-6 * abs(value) and 0.9 * slope <= trial_slope <= -0.8 * slope
        if decreased or flat:
            if best is None or trial_value < best[1]:
                best = (step, trial_value)
            if abs(trial_slope) <= 0.5 * -slope or refinements == REFINEMENTS or trial_slope <= slope:
                break
            refinements += 1
            step = min(10.0 * step, step * slope / (slope - trial_slope))  # where the slope's secant is zero
            continue
        if best is not None:  # a refinement went wrong: keep the good step found before it
            break
        curvature = trial_value - value - slope * step
        step = min(0.5 * step, max(0.1 * step, -slope * step * step / (2.0 * curvature)))
    return best


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b without BLAS: OpenBLAS threads a vector dot above 10,000 entries, and on a
    busy 2-core machine waking its threads cost 8 ms a call at 200,000 (einsum: 0.3 ms)."""
    return float(np.einsum("i,i->", a, b))


def two_loop(gradient: np.ndarray, history: deque, inverse: np.ndarray | None = None) -> np.ndarray:
    """The L-BFGS inverse-Hessian approximation applied to `gradient`; `inverse`, used only
    without history, is a diagonal inverse Hessian for the first step (None: a cautious one)."""
    q = gradient.copy()
    alphas = []
    for s, y, rho in reversed(history):
        alpha = rho * dot(s, q)
        q -= alpha * y
        alphas.append(alpha)
    if history:
        s, y, _ = history[-1]
        q *= dot(s, y) / dot(y, y)
    elif inverse is not None:
        q *= inverse
    else:
        q /= max(1.0, dot(gradient, gradient) ** 0.5)  # a cautious first step, as scipy takes
    for (s, y, rho), alpha in zip(history, reversed(alphas)):
        q += (alpha - rho * dot(y, q)) * s
    return q


def shift_penalty(history: deque, change: float) -> deque:
    """Curvature pairs for an L2 penalty `change` higher: y gains change * s."""
    shifted = deque(maxlen=history.maxlen)
    for s, y, _ in history:
        y = y + change * s
        sy = dot(s, y)
        if sy > 1e-10 * dot(y, y):
            shifted.append((s, y, 1.0 / sy))
    return shifted
