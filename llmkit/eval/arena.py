"""Arena ratings from pairwise battles: online Elo and Bradley-Terry maximum likelihood, as Chatbot Arena.

A battle log is JSONL, one battle per line: `{"model_a": ..., "model_b": ..., "winner": ...}` with winner
`model_a`, `model_b`, `tie` or `tie (bothbad)` (FastChat's values; `a`, `b` or a model's name also work).
- online Elo (FastChat `compute_elo`): K=4, base 10, scale 400, every model starts at 1000, battles in order;
- Bradley-Terry (FastChat `compute_mle_elo`): the logistic regression P(a beats b) = 1 / (1 + 10^((R_b-R_a)/400))
  fitted by maximum likelihood with every tie counted as one win each way, ratings 400*beta + 1000 with the
  betas summing to zero (the solution sklearn's unpenalised, intercept-free fit converges to);
- 95% intervals: 2.5th and 97.5th percentiles over bootstrap resamples of the battles (seeded);
- win-rate matrix: how often the row model beat the column model in their battles (ties count as battles).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from llmkit.data.io import iter_jsonl

K_FACTOR, BASE, SCALE, INIT_RATING = 4.0, 10.0, 400.0, 1000.0
WINNERS = {"model_a": 1.0, "a": 1.0, "model_b": 0.0, "b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5, "draw": 0.5}


class BattleError(ValueError):
    """A battle log that cannot be read; the message names the file, line and field."""


def read_battles(path: str | Path) -> list[dict[str, Any]]:
    """Battles of a JSONL file as dicts with model_a, model_b and winner in FastChat's values."""
    path = Path(path)
    if not path.is_file():
        raise BattleError(f"{path}: no such battle file")
    battles = []
    for where, obj in iter_jsonl(path.read_text(encoding="utf-8").splitlines(), str(path), BattleError):
        battles.append(normalize_battle(obj, where))
    if not battles:
        raise BattleError(f"{path}: no battles")
    return battles


def normalize_battle(obj: Any, where: str = "battle") -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise BattleError(f"{where}: expected a JSON object with model_a, model_b and winner")
    for field in ("model_a", "model_b", "winner"):
        if field not in obj:
            raise BattleError(f"{where}: missing field {field!r}")
    a, b, winner = obj["model_a"], obj["model_b"], obj["winner"]
    if not isinstance(a, str) or not a or not isinstance(b, str) or not b:
        raise BattleError(f"{where}: fields 'model_a' and 'model_b' must be model names")
    if a == b:
        raise BattleError(f"{where}: model_a and model_b are both {a!r}")
    if isinstance(winner, str) and winner in (a, b) and winner not in WINNERS:
        winner = "model_a" if winner == a else "model_b"
    if winner not in WINNERS:
        raise BattleError(f"{where}: field 'winner' must be model_a, model_b, tie or tie (bothbad) "
                          f"(or one of the two model names), got {winner!r}")
    return {"model_a": a, "model_b": b, "winner": {"a": "model_a", "b": "model_b", "draw": "tie"}.get(winner, winner)}


def _encode(battles: list[dict], models: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[x["model_a"]] for x in battles])
    b = np.array([index[x["model_b"]] for x in battles])
    score = np.array([WINNERS[x["winner"]] for x in battles])  # 1 a wins, 0 b wins, 0.5 tie
    return a, b, score


def models_of(battles: list[dict]) -> list[str]:
    return sorted({x["model_a"] for x in battles} | {x["model_b"] for x in battles})


def online_elo(battles: list[dict], k: float = K_FACTOR, base: float = BASE, scale: float = SCALE,
               init: float = INIT_RATING) -> dict[str, float]:
    """FastChat's sequential Elo over the battles in their order."""
    models = models_of(battles)
    a, b, s = _encode(battles, models)
    return dict(zip(models, _elo_rounds(a[None], b[None], s[None], len(models), k, base, scale, init)[0]))


def _elo_rounds(a: np.ndarray, b: np.ndarray, s: np.ndarray, n_models: int, k: float, base: float, scale: float,
                init: float) -> np.ndarray:
    """Elo for R battle sequences at once: a, b, s are [R, N]; returns ratings [R, M]."""
    R, N = a.shape
    rating = np.full((R, n_models), init)
    rows = np.arange(R)
    for t in range(N):
        ra, rb = rating[rows, a[:, t]], rating[rows, b[:, t]]
        ea = 1 / (1 + base ** ((rb - ra) / scale))
        eb = 1 / (1 + base ** ((ra - rb) / scale))
        rating[rows, a[:, t]] = ra + k * (s[:, t] - ea)
        rating[rows, b[:, t]] = rb + k * (1 - s[:, t] - eb)
    return rating


def _pair_counts(a: np.ndarray, b: np.ndarray, s: np.ndarray, n_models: int, weights: np.ndarray | None = None
                 ) -> np.ndarray:
    """wins[i, j]: wins of i over j, a tie counting one win each way (FastChat duplicates every battle)."""
    w = np.ones(len(a)) if weights is None else weights
    wins = np.zeros((n_models, n_models))
    np.add.at(wins, (a, b), w * 2 * s)
    np.add.at(wins, (b, a), w * 2 * (1 - s))
    return wins


def _bt_fit(wins: np.ndarray, base: float = BASE, tol: float = 1e-10, max_iter: int = 100
            ) -> tuple[np.ndarray, bool]:
    """Newton's method on the Bradley-Terry log-likelihood; betas sum to zero. Returns (beta, converged)."""
    M = wins.shape[0]
    c = math.log(base)
    n = wins + wins.T
    beta = np.zeros(M)
    converged = False
    for _ in range(max_iter):
        diff = c * (beta[:, None] - beta[None, :])
        p = 1 / (1 + np.exp(-diff))  # P(i beats j)
        grad = c * (wins - n * p).sum(axis=1)
        w = n * p * (1 - p) * c * c
        hess = -np.diag(w.sum(axis=1)) + w  # negative semi-definite, null space = constant vector
        # solve on the sum-zero subspace: add the constant direction to make it invertible
        ones = np.ones((M, M)) / M
        step = np.linalg.solve(hess - ones, -grad)
        step -= step.mean()
        beta_new = beta + step
        if np.max(np.abs(step)) < tol or np.max(np.abs(grad)) < tol:
            beta = beta_new
            converged = True
            break
        beta = beta_new
    return beta - beta.mean(), converged


def bradley_terry(battles: list[dict], base: float = BASE, scale: float = SCALE, init: float = INIT_RATING
                  ) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings on the Elo scale (mean rating = init)."""
    models = models_of(battles)
    a, b, s = _encode(battles, models)
    beta, converged = _bt_fit(_pair_counts(a, b, s, len(models)), base)
    if not converged:
        raise BattleError("Bradley-Terry did not converge: a model won (or lost) every battle, so its maximum-"
                          "likelihood rating is infinite; add battles or remove it")
    return dict(zip(models, scale * beta + init))


def win_rate_matrix(battles: list[dict]) -> dict[str, dict[str, float | None]]:
    """[row][col]: fraction of their battles the row model won (FastChat's pairwise win fraction)."""
    models = models_of(battles)
    a, b, s = _encode(battles, models)
    M = len(models)
    wins = np.zeros((M, M))
    games = np.zeros((M, M))
    np.add.at(wins, (a, b), (s == 1.0).astype(float))
    np.add.at(wins, (b, a), (s == 0.0).astype(float))
    np.add.at(games, (a, b), 1.0)
    np.add.at(games, (b, a), 1.0)
    return {m: {o: (float(wins[i, j] / games[i, j]) if games[i, j] else None) for j, o in enumerate(models)}
            for i, m in enumerate(models)}


def arena(battles: list[dict], rounds: int = 1000, seed: int = 0, k: float = K_FACTOR, base: float = BASE,
          scale: float = SCALE, init: float = INIT_RATING) -> dict[str, Any]:
    """Elo and Bradley-Terry ratings with bootstrap 95% intervals, a leaderboard and the win-rate matrix."""
    models = models_of(battles)
    M = len(models)
    a, b, s = _encode(battles, models)
    elo = online_elo(battles, k, base, scale, init)
    bt = bradley_terry(battles, base, scale, init)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"models": models, "battles": len(battles), "elo": elo, "bradley_terry": bt,
                           "bootstrap_rounds": rounds, "seed": seed}
    if rounds > 0:
        idx = rng.integers(0, len(battles), size=(rounds, len(battles)))
        elo_samples = _elo_rounds(a[idx], b[idx], s[idx], M, k, base, scale, init)
        bt_samples = np.empty((rounds, M))
        for r in range(rounds):
            weights = np.bincount(idx[r], minlength=len(battles)).astype(float)
            beta, _ = _bt_fit(_pair_counts(a, b, s, M, weights), base, max_iter=50)
            bt_samples[r] = scale * beta + init
        out["elo_ci"] = {m: [float(v) for v in np.percentile(elo_samples[:, i], [2.5, 97.5])]
                         for i, m in enumerate(models)}
        out["bradley_terry_ci"] = {m: [float(v) for v in np.percentile(bt_samples[:, i], [2.5, 97.5])]
                                   for i, m in enumerate(models)}
    games = {m: 0 for m in models}
    record = {m: [0, 0, 0] for m in models}  # wins, losses, ties
    for x in battles:
        games[x["model_a"]] += 1
        games[x["model_b"]] += 1
        score = WINNERS[x["winner"]]
        for name, mine in ((x["model_a"], score), (x["model_b"], 1 - score)):
            record[name][0 if mine == 1 else 1 if mine == 0 else 2] += 1
    order = sorted(models, key=lambda m: -bt[m])
    out["leaderboard"] = [
        {"rank": r + 1, "model": m, "rating": bt[m], "ci_low": out.get("bradley_terry_ci", {}).get(m, [None])[0],
         "ci_high": out.get("bradley_terry_ci", {}).get(m, [None, None])[1], "elo": elo[m], "battles": games[m],
         "wins": record[m][0], "losses": record[m][1], "ties": record[m][2]} for r, m in enumerate(order)]
    out["win_rate"] = win_rate_matrix(battles)
    return out


def format_leaderboard(result: dict[str, Any]) -> str:
    lines = [f"{'rank':>4}  {'model':<24} {'rating':>8} {'95% CI':>17} {'elo':>8} {'battles':>8} {'W-L-T':>12}"]
    for row in result["leaderboard"]:
        ci = f"{row['ci_low']:.1f} .. {row['ci_high']:.1f}" if row["ci_low"] is not None else "-"
        wlt = f"{row['wins']}-{row['losses']}-{row['ties']}"
        lines.append(f"{row['rank']:>4}  {row['model']:<24} {row['rating']:>8.1f} {ci:>17} {row['elo']:>8.1f} "
                     f"{row['battles']:>8} {wlt:>12}")
    models = [row["model"] for row in result["leaderboard"]]
    lines.append("")
    lines.append("win rate (row beat column)")
    width = max(8, *(len(m) for m in models)) + 1
    lines.append(" " * width + "".join(f"{m[:8]:>9}" for m in models))
    for m in models:
        cells = "".join(f"{result['win_rate'][m][o]:>9.2f}" if result["win_rate"][m][o] is not None else f"{'-':>9}"
                        for o in models)
        lines.append(f"{m:<{width}}" + cells)
    return "\n".join(lines)


def plot_ratings(result: dict[str, Any], path: str | Path, which: str = "bradley_terry") -> Path:
    """A PNG of the ratings with their 95% intervals, best model first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratings, ci = result[which], result.get(f"{which}_ci")
    models = sorted(ratings, key=lambda m: -ratings[m])
    values = [ratings[m] for m in models]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(models) + 2), 4))
    if ci:
        lower = [ratings[m] - ci[m][0] for m in models]
        upper = [ci[m][1] - ratings[m] for m in models]
        ax.errorbar(range(len(models)), values, yerr=[np.maximum(lower, 0), np.maximum(upper, 0)], fmt="o",
                    capsize=4)
    else:
        ax.plot(range(len(models)), values, "o")
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_ylabel("rating")
    ax.set_title(("Bradley-Terry" if which == "bradley_terry" else "Elo") + " ratings with 95% bootstrap intervals")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_win_rates(result: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [row["model"] for row in result["leaderboard"]]
    grid = np.array([[np.nan if result["win_rate"][m][o] is None else result["win_rate"][m][o] for o in models]
                     for m in models])
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(models) + 2), max(3, 0.6 * len(models) + 1.5)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_yticks(range(len(models)), models)
    for i in range(len(models)):
        for j in range(len(models)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="row beats column")
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
