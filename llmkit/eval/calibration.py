"""Calibration of multiple-choice answers: confidence (normalised choice probability) against correctness.

For each question the choice log-likelihoods are normalised over the choices (softmax, as lm-eval's
`brier_score` does); the prediction is the most likely choice and its probability is the confidence.
- expected calibration error: ECE = sum over M equal-width confidence bins of |bin| / n * |accuracy - mean conf|
  (Guo et al. 2017); also the maximum calibration error over non-empty bins;
- Brier score: mean over questions of sum_k (p_k - 1[k = gold])^2 (multi-class, lm-eval's), and the top-label
  Brier score mean((confidence - correct)^2);
- a reliability diagram: accuracy per bin against confidence, with the diagonal and the bin counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def normalise(loglikelihoods: Sequence[float]) -> np.ndarray:
    x = np.asarray(loglikelihoods, dtype=float)
    e = np.exp(x - x.max())
    return e / e.sum()


def calibration(probs: Sequence[Sequence[float]], golds: Sequence[int], bins: int = 10) -> dict[str, Any]:
    """Calibration metrics of per-question choice probabilities (each summing to 1) and gold indices."""
    if len(probs) != len(golds) or not probs:
        raise ValueError(f"calibration needs one gold per question, got {len(probs)} questions and {len(golds)} golds")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    conf = np.array([float(np.max(p)) for p in probs])
    pred = np.array([int(np.argmax(p)) for p in probs])
    gold = np.asarray(golds)
    correct = (pred == gold).astype(float)
    brier = float(np.mean([np.sum((np.asarray(p) - np.eye(len(p))[g]) ** 2) for p, g in zip(probs, gold)]))
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin m holds confidences in (edges[m], edges[m+1]]; a confidence of exactly 0 joins the first bin
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    table = []
    ece = mce = 0.0
    for m in range(bins):
        mask = which == m
        n = int(mask.sum())
        row = {"low": float(edges[m]), "high": float(edges[m + 1]), "count": n,
               "accuracy": float(correct[mask].mean()) if n else None,
               "confidence": float(conf[mask].mean()) if n else None}
        if n:
            gap = abs(row["accuracy"] - row["confidence"])
            ece += n / len(conf) * gap
            mce = max(mce, gap)
        table.append(row)
    return {"n": len(conf), "accuracy": float(correct.mean()), "mean_confidence": float(conf.mean()),
            "ece": float(ece), "mce": float(mce), "brier": brier,
            "brier_top_label": float(np.mean((conf - correct) ** 2)), "bins": table}


def calibration_from_results(results: dict[str, Any], bins: int = 10) -> dict[str, Any]:
    """Per task and overall calibration from `tasks.evaluate(..., log_samples=True)` of multiple-choice tasks."""
    out: dict[str, Any] = {"tasks": {}}
    all_probs, all_golds = [], []
    for task, samples in results.get("samples", {}).items():
        probs, golds = [], []
        seen = set()
        for s in samples:
            if s["doc_id"] in seen:  # one entry per filter; multiple choice has one filter
                continue
            seen.add(s["doc_id"])
            gold, n_choices = s.get("gold"), len(s.get("choices") or [])
            if not isinstance(gold, int) or not 0 <= gold < n_choices:
                continue  # not multiple choice, or a gold outside the choices
            lls = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in s["resps"][:n_choices]]
            probs.append(normalise(lls))
            golds.append(gold)
        if probs:
            out["tasks"][task] = calibration(probs, golds, bins)
            all_probs += probs
            all_golds += golds
    if not all_probs:
        raise ValueError("no multiple-choice answers to calibrate: run multiple_choice tasks with log_samples")
    out["overall"] = calibration(all_probs, all_golds, bins)
    return out


def reliability_diagram(result: dict[str, Any], path: str | Path, title: str = "Reliability diagram") -> Path:
    """A PNG: accuracy per confidence bin against the diagonal, with counts below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["bins"]
    centers = [(r["low"] + r["high"]) / 2 for r in rows]
    width = rows[0]["high"] - rows[0]["low"]
    acc = [r["accuracy"] if r["accuracy"] is not None else 0.0 for r in rows]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.bar(centers, acc, width=width * 0.95, edgecolor="black", alpha=0.8, label="accuracy")
    conf = [(c, r["confidence"]) for c, r in zip(centers, rows) if r["count"]]
    if conf:
        ax.plot(*zip(*conf), "o", color="tab:red", label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}\nECE {result['ece']:.3f}, Brier {result['brier']:.3f}, n={result['n']}")
    ax.legend(loc="upper left")
    ax2.bar(centers, [r["count"] for r in rows], width=width * 0.95, color="gray")
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("questions")
    ax2.set_xlim(0, 1)
    fig.tight_layout()
    from llmkit.eval.arena import _save_figure

    return _save_figure(fig, path)
