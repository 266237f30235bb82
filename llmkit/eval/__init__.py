"""Evaluation: perplexity, lm-eval-compatible task harness, metrics, arena ratings, judges, calibration,
under-trained token audit and harms.

Each module is a library first (`llmkit.eval.perplexity.perplexity`, `llmkit.eval.tasks.evaluate`, ...);
`llmkit.eval.commands` holds the thin `llmkit eval <kind>` CLI over them.
"""
