"""Scaling laws fitted to a sweep's rows: L(N), L(D), L(C) power laws (Kaplan et al. 2020) and
Chinchilla's L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3), with bootstrap
intervals and the compute-optimal N and D for a budget C = 6ND.

Which N: Kaplan's laws count non-embedding parameters (their C = 6ND too), Hoffmann's count every
parameter (the rows' `N_total`); each law is fitted with its own paper's N, since at small sizes the
embeddings are much of the model and the two counts give different exponents (Pearce and Song 2024
trace most of the papers' disagreement to this).

Chinchilla's fit, as the paper does it: minimise the Huber loss (δ = 1e-3) between the log of the
predicted and the observed loss, the prediction written as a log-sum-exp of (a - α log N,
b - β log D, e) with A = e^a, B = e^b, E = e^e, by L-BFGS from the best points of the paper's grid of
initialisations. The power laws L = A·x^-α (+ E when `irreducible`) are fitted the same way, so a
few bad runs do not drag the exponents.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from llmkit.errors import ConfigError, DataError
from llmkit.options import arg

HUBER_DELTA = 1e-3  # Hoffmann et al. (2022), appendix D.2

# Published fits, to set ours beside: Kaplan et al. (2020) eqs. 1.1-1.3 (N non-embedding, D tokens,
# C in PF-days) and Hoffmann et al. (2022) eq. 10.
KAPLAN = {"alpha_N": 0.076, "alpha_D": 0.095, "alpha_C": 0.050}
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


@dataclass
class PowerLaw:
    """L(x) = E + A·x^-alpha (E = 0 for a pure power law)."""

    A: float
    alpha: float
    E: float = 0.0

    def __call__(self, x):
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha


@dataclass
class Chinchilla:
    """L(N, D) = E + A/N^alpha + B/D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def compute_optimal(self, C: float) -> dict[str, float]:
        """N and D minimising L under C = 6ND (Hoffmann et al. eq. 4): N = G (C/6)^(β/(α+β)), D = (C/6)/N."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1 / (a + b))
        N = G * (C / 6) ** (b / (a + b))
        D = C / 6 / N
        return {"C": C, "N": N, "D": D, "tokens_per_parameter": D / N, "loss": float(self(N, D))}


def _huber(r: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of each residual and its derivative."""
    small = np.abs(r) <= delta
    return (np.where(small, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta)),
            np.where(small, r, delta * np.sign(r)))


def _lse_fit(terms: np.ndarray, log_loss: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Minimise Σ huber(logsumexp_k(terms_k(θ)) - log L) over θ, where `terms(θ)` are linear in θ:
    terms[k] is a (n_params, n_rows) matrix M_k and the k-th exponent is θ·M_k (a constant row of 1s
    carries a, b or e, a row of -log x carries an exponent). L-BFGS from each start; the best wins."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    def objective(theta):
        z = (theta[None, :, None] * terms).sum(1)  # (terms, rows)
        top = z.max(0)
        w = np.exp(z - top)
        s = w.sum(0)
        pred = top + np.log(s)
        h, dh = _huber(pred - log_loss)
        grad = (((w / s) * dh)[:, None, :] * terms).sum((0, 2))
        return h.sum(), grad

    best = None
    with threadpool_limits(1):  # five parameters: more BLAS threads only wait for each other, on a busy machine for long
        for start in starts:
            res = minimize(objective, start, jac=True, method="L-BFGS-B",
                           options={"maxiter": 2000, "gtol": 1e-12, "ftol": 1e-15})
            if best is None or res.fun < best.fun:
                best = res
    return best.x


def _best_starts(terms: np.ndarray, log_loss: np.ndarray, grid: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` points of `grid` with the lowest objective, to start L-BFGS from."""
    z = (grid[:, None, :, None] * terms[None]).sum(2)
    top = z.max(1)
    pred = top + np.log(np.exp(z - top[:, None]).sum(1))
    scores = _huber(pred - log_loss)[0].sum(1)
    return grid[np.argsort(scores)[:keep]]


def _check(name: str, values: np.ndarray) -> None:
    if values.ndim != 1 or len(values) < 3:
        raise DataError(f"a scaling fit needs at least 3 points in {name}, got {len(values)}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise DataError(f"{name} must be finite and positive for a power law; got {values.tolist()}")


def fit_power_law(x: Sequence[float], loss: Sequence[float], irreducible: bool = False,
                  init: PowerLaw | None = None) -> PowerLaw:
    """L = A·x^-α (+ E when `irreducible`), by Huber loss on log L; from `init` alone when given (a
    bootstrap resample starts from the full data's fit), else from the best points of a grid."""
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    _check("x", x)
    _check("loss", loss)
    if len(x) != len(loss):
        raise DataError(f"x has {len(x)} values but loss has {len(loss)}")
    one, logx = np.ones_like(x), np.log(x)
    if not irreducible:  # log L = a - α log x: one term, θ = (a, α), from least squares
        terms = np.stack([np.stack([one, -logx])])
        slope, intercept = np.polyfit(logx, np.log(loss), 1)
        grid = np.array([[intercept, -slope]])
    else:  # θ = (a, α, e)
        z = np.zeros_like(x)
        terms = np.stack([np.stack([one, -logx, z]), np.stack([z, z, one])])
        grid = np.array(list(itertools.product(np.arange(-5, 30, 2.5), np.arange(0, 2.01, 0.25),
                                               np.arange(-1, 1.51, 0.5))))
    if init is not None:
        starts = np.array([[math.log(init.A), init.alpha] + ([math.log(max(init.E, 1e-9))] if irreducible else [])])
    else:
        starts = _best_starts(terms, np.log(loss), grid, keep=8)
    theta = _lse_fit(terms, np.log(loss), starts)
    return PowerLaw(A=math.exp(theta[0]), alpha=float(theta[1]), E=math.exp(theta[2]) if irreducible else 0.0)


# Hoffmann et al.'s grid of initialisations: α, β ∈ {0, 0.5, ..., 2}, e ∈ {-1, -0.5, ..., 1}, a, b ∈ {0, 5, ..., 25}.
_CHINCHILLA_GRID = np.array([(a, b, e, al, be) for a in range(0, 26, 5) for b in range(0, 26, 5)
                             for e in np.arange(-1, 1.01, 0.5) for al in np.arange(0, 2.01, 0.5)
                             for be in np.arange(0, 2.01, 0.5)])


def fit_chinchilla(N: Sequence[float], D: Sequence[float], loss: Sequence[float], starts: int = 16,
                   init: Chinchilla | None = None) -> Chinchilla:
    """L(N, D) = E + A/N^α + B/D^β by Huber loss on log L (Hoffmann et al. 2022, approach 3): L-BFGS from
    the `starts` best points of the paper's grid, or from `init` alone."""
    N, D, loss = (np.asarray(v, dtype=float) for v in (N, D, loss))
    for name, v in (("N", N), ("D", D), ("loss", loss)):
        _check(name, v)
    if not len(N) == len(D) == len(loss):
        raise DataError(f"N, D and loss have {len(N)}, {len(D)} and {len(loss)} values; expected one each per run")
    if len(N) < 5:
        raise DataError(f"Chinchilla's L(N, D) has 5 parameters; it needs at least 5 runs, got {len(N)}")
    one, z = np.ones_like(N), np.zeros_like(N)  # θ = (a, b, e, α, β)
    terms = np.stack([np.stack([one, z, z, -np.log(N), z]), np.stack([z, one, z, z, -np.log(D)]),
                      np.stack([z, z, one, z, z])])
    log_loss = np.log(loss)
    if init is not None:
        points = np.array([[math.log(init.A), math.log(init.B), math.log(init.E), init.alpha, init.beta]])
    else:
        points = _best_starts(terms, log_loss, _CHINCHILLA_GRID, keep=starts)
    theta = _lse_fit(terms, log_loss, points)
    a, b, e, alpha, beta = theta
    return Chinchilla(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))


# ---- a sweep's rows -> every fit ------------------------------------------------------------------


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The sweep's JSONL rows (N, D, C, val_loss ...); a half-written last line (a killed sweep) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected the rows of `llmkit scaling sweep`")
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise DataError(f"{path}:{i + 1} is not JSON") from None
        missing = [k for k in ("N", "D", "C", "val_loss") if k not in row]
        if missing:
            raise DataError(f"{path}:{i + 1} lacks {missing}; each row needs N, D, C and val_loss")
        rows.append(row)
    return rows


def frontier(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the lower envelope: the runs whose loss is below every run with a smaller x."""
    order = np.argsort(x, kind="stable")
    keep, best = [], math.inf
    for i in order:
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep, dtype=int)


def _best_per(key: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Index of the lowest loss for each distinct key (L(N): each size at its best budget)."""
    return np.array([min(np.flatnonzero(key == k), key=lambda i: loss[i]) for k in np.unique(key)], dtype=int)


def total_parameters(rows: list[dict[str, Any]]) -> np.ndarray:
    """Each run's parameter count as Chinchilla counts it: all of them (`N_total`), or `N` for rows
    written without it."""
    return np.array([float(r.get("N_total", r["N"])) for r in rows])


def _fits(N, D, C, loss, N_total, init: dict[str, Any] | None = None) -> dict[str, Any]:
    """L(N): each size at its best budget; L(D): each budget at its best size; L(C): the compute
    frontier (Kaplan's C_min), all with non-embedding N; L(N, D): every run, with all parameters
    (`N_total`). `init`: the full data's fits, to start from."""
    init = init or {}
    fits: dict[str, Any] = {}
    n_i, d_i, c_i = _best_per(N, loss), _best_per(D, loss), frontier(C, loss)
    for name, x, idx in (("L(N)", N, n_i), ("L(D)", D, d_i), ("L(C)", C, c_i)):
        start = PowerLaw(**init[name]) if init.get(name) else None
        fits[name] = asdict(fit_power_law(x[idx], loss[idx], init=start)) if len(idx) >= 3 else None
    start = Chinchilla(**init["L(N,D)"]) if init.get("L(N,D)") else None
    fits["L(N,D)"] = asdict(fit_chinchilla(N_total, D, loss, init=start)) if len(N) >= 5 else None
    return fits


def fit_rows(rows: list[dict[str, Any]], budget: float | None = None, bootstrap: int = 100,
             seed: int = 0) -> dict[str, Any]:
    """Every fit of the rows, each exponent with a 95 % bootstrap interval (rows resampled with
    replacement, every fit redone), and the compute-optimal N, D (all parameters) for `budget` (default:
    the sweep's largest 6 N_total D)."""
    if len(rows) < 3:
        raise DataError(f"the sweep has {len(rows)} finished runs; a fit needs at least 3 (5 for L(N, D))")
    N, D, C, loss = (np.array([float(r[k]) for r in rows]) for k in ("N", "D", "C", "val_loss"))
    N_total = total_parameters(rows)
    fits = _fits(N, D, C, loss, N_total)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(bootstrap):
        pick = rng.integers(0, len(rows), len(rows))
        if len(np.unique(N[pick])) < 3 or len(np.unique(D[pick])) < 2:
            continue
        try:
            again = _fits(N[pick], D[pick], C[pick], loss[pick], N_total[pick], init=fits)
        except DataError:
            continue
        for name, fit in again.items():
            for k, v in (fit or {}).items():
                samples.setdefault(f"{name}.{k}", []).append(v)
    intervals = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                 for k, v in samples.items() if len(v) >= 10}
    budget = budget or float((6 * N_total * D).max())
    if budget <= 0:
        raise ConfigError(f"budget={budget}; expected a positive number of FLOPs")
    optimal = Chinchilla(**fits["L(N,D)"]).compute_optimal(budget) if fits["L(N,D)"] else None
    return {"runs": len(rows), "fits": fits, "bootstrap": {"resamples": bootstrap, "intervals_95": intervals},
            "compute_optimal": optimal, "published": {"kaplan": KAPLAN, "hoffmann": HOFFMANN},
            "parameters": {"L(N), L(C)": "non-embedding (Kaplan)", "L(N,D), compute-optimal": "all (Hoffmann)"}}


def render_fit(result: dict[str, Any]) -> str:
    """The fits as Markdown: each law with its exponent, the interval, and the published value."""
    iv = result["bootstrap"]["intervals_95"]

    def ci(key: str) -> str:
        return f"[{iv[key][0]:.3f}, {iv[key][1]:.3f}]" if key in iv else "(too few resamples)"

    lines = [f"# Scaling-law fit of {result['runs']} runs", "",
             "| law | fitted | 95 % bootstrap interval | published |", "|---|---|---|---|"]
    published = {"L(N)": f"α_N = {KAPLAN['alpha_N']} (Kaplan)", "L(D)": f"α_D = {KAPLAN['alpha_D']} (Kaplan)",
                 "L(C)": f"α_C = {KAPLAN['alpha_C']} (Kaplan, C_min)"}
    for name in ("L(N)", "L(D)", "L(C)"):
        f = result["fits"][name]
        if f:
            lines.append(f"| {name} = A·x^-α | A = {f['A']:.4g}, α = {f['alpha']:.4f} | α {ci(name + '.alpha')} | "
                         f"{published[name]} |")
    f = result["fits"]["L(N,D)"]
    if f:
        lines.append(f"| L(N,D) = E + A/N^α + B/D^β | E = {f['E']:.3f}, A = {f['A']:.4g}, B = {f['B']:.4g}, "
                     f"α = {f['alpha']:.4f}, β = {f['beta']:.4f} | α {ci('L(N,D).alpha')}, β {ci('L(N,D).beta')} | "
                     f"E = {HOFFMANN['E']}, A = {HOFFMANN['A']}, B = {HOFFMANN['B']}, α = {HOFFMANN['alpha']}, "
                     f"β = {HOFFMANN['beta']} (Hoffmann) |")
    o = result["compute_optimal"]
    if o:
        lines += ["", "N is non-embedding parameters in L(N) and L(C) (C = 6ND, as Kaplan), all parameters in "
                      "L(N, D) and below (as Hoffmann).",
                  "", f"Compute-optimal for C = 6·N·D = {o['C']:.3g} FLOPs: N = {o['N']:.4g} parameters, D = {o['D']:.4g} "
                      f"tokens, {o['tokens_per_parameter']:.1f} tokens per parameter (Chinchilla: ~20), "
                      f"predicted loss {o['loss']:.4f}."]
    return "\n".join(lines) + "\n"


def run_fit(sweep: Annotated[str, arg("the sweep's folder or its sweep.jsonl", positional=True)],
            out: Annotated[str | None, arg("where fit.json, fit.md and scaling.png go (default: beside the rows)")]
            = None,
            budget: Annotated[float | None, arg("FLOPs budget for the compute-optimal N and D (default: the "
                                                "sweep's largest C)")] = None,
            bootstrap: Annotated[int, arg("resamples for the bootstrap intervals (2.5th to 97.5th percentile)")] = 100,
            seed: int = 0) -> dict[str, Any]:
    """`llmkit scaling fit`: read the sweep's rows, fit, write fit.json, fit.md and scaling.png (beside
    the rows unless `out` is given)."""
    from llmkit.analysis.plots import plot_scaling
    from llmkit.files import atomic_write_json, atomic_write_text

    if bootstrap < 0:
        raise ConfigError(f"bootstrap={bootstrap}; expected a number of resamples >= 0")
    path = Path(sweep)
    if path.is_dir():
        path = path / "sweep.jsonl"
    rows = read_rows(path)
    result = fit_rows(rows, budget=budget, bootstrap=bootstrap, seed=seed)
    result["sweep"] = str(path)
    result["command"] = " ".join(["llmkit scaling fit", str(sweep), *([f"--out {out}"] if out else []),
                                  *([f"--budget {budget:g}"] if budget else []), f"--bootstrap {bootstrap}",
                                  f"--seed {seed}"])
    result["recorded"] = _recorded()
    out = Path(out) if out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "fit.json", result)
    atomic_write_text(out / "fit.md", render_fit(result) + "\n![scaling](scaling.png)\n")
    plot_scaling(rows, result, out / "scaling.png")
    return result


def _recorded() -> dict[str, Any]:
    """The code that fitted (llmkit's version and, in a git checkout, its commit), the machine and the date."""
    import datetime
    import importlib.metadata
    import platform
    import subprocess

    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).parents[1]), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"llmkit": importlib.metadata.version("llmkit"), "commit": commit, "machine": platform.machine(),
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
