"""Task harness: lm-evaluation-harness task YAMLs, read and scored exactly as lm-eval does, on local data.

A task YAML uses lm-eval's fields (`task`, `dataset_path: json|csv` with `dataset_kwargs.data_files`,
`test_split`/`validation_split`/`training_split`/`fewshot_split`, Jinja `doc_to_text`/`doc_to_target`/
`doc_to_choice`, `description`, `target_delimiter`, `fewshot_delimiter`, `fewshot_config`, `process_docs`,
`output_type` multiple_choice|loglikelihood|loglikelihood_rolling|generate_until, `metric_list`,
`generation_kwargs` with `until`, `filter_list`, `repeats`, `num_fewshot`, `include`, `!function`, `tag`;
group YAMLs with `group`, `task` and `aggregate_metric_list`).
Relative `data_files` are read from `data_dir` (default: the working directory, as `datasets` does); nothing
is ever downloaded. Few-shot examples are drawn with `random.Random(fewshot_seed)` per task, in document order,
as lm-eval's sampler does, so contexts, requests and metrics match lm-eval's for the same model.

    results = evaluate(EvalLM(model, tokenizer), ["arc_easy"], include_path="my_tasks/", limit=100)
    results["results"]["arc_easy"]["acc,none"]
"""

from __future__ import annotations

import ast
import copy
import csv
import glob
import importlib.util
import json
import math
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from llmkit.data.io import iter_jsonl

TASKS_DIR = Path(__file__).resolve().parent.parent / "assets" / "tasks"
OUTPUT_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until")
DEFAULT_FEWSHOT_SEED = 1234
DEFAULT_BOOTSTRAP_ITERS = 100000
DEFAULT_MAX_GEN_TOKS = 256

# lm-eval's TaskConfig fields and their defaults (lm_eval/config/task.py)
TASK_FIELDS: dict[str, Any] = {
    "task": None, "task_alias": None, "tag": None, "custom_dataset": None, "dataset_path": None,
    "dataset_name": None, "dataset_kwargs": None, "training_split": None, "validation_split": None,
    "test_split": None, "fewshot_split": None, "process_docs": None, "doc_to_text": None, "doc_to_target": None,
    "doc_to_image": None, "doc_to_audio": None, "unsafe_code": False, "doc_to_choice": None,
    "process_results": None, "use_prompt": None, "description": "", "target_delimiter": " ",
    "fewshot_delimiter": "\n\n", "fewshot_config": None, "num_fewshot": None, "metric_list": None,
    "output_type": "generate_until", "generation_kwargs": None, "repeats": 1, "filter_list": None,
    "should_decontaminate": False, "doc_to_decontamination_query": None, "gen_prefix": None, "metadata": None,
}
FEWSHOT_FIELDS = ("sampler", "split", "process_docs", "fewshot_indices", "samples", "doc_to_text", "doc_to_choice",
                  "doc_to_target", "gen_prefix", "fewshot_delimiter", "target_delimiter")
STRUCTURAL = ("group", "include", "task_list", "class")
GROUP_FIELDS = ("group", "group_alias", "task", "aggregate_metric_list", "metadata", "tag")


class TaskError(ValueError):
    """A task YAML or its data cannot be used; the message names the file, line or field."""


# ----------------------------------------------------------------------------- YAML


def _import_function(qualname: str, base_dir: Path, yaml_path: Path) -> Callable:
    module_path, _, fn_name = qualname.rpartition(".")
    if not module_path:
        raise TaskError(f"{yaml_path}: !function {qualname!r} needs module.function")
    local = (base_dir / f"{module_path.replace('.', '/')}.py").resolve()
    if local.is_file():
        name = f"llmkit_task_{abs(hash(str(local)))}"
        module = sys.modules.get(name)
        if module is None or getattr(module, "__mtime__", None) != local.stat().st_mtime_ns:
            spec = importlib.util.spec_from_file_location(name, local)
            module = importlib.util.module_from_spec(spec)
            module.__mtime__ = local.stat().st_mtime_ns
            spec.loader.exec_module(module)
            sys.modules[name] = module
    else:
        try:
            module = __import__(module_path, fromlist=[fn_name])
        except ImportError as e:
            raise TaskError(f"{yaml_path}: !function {qualname}: no {local.name} beside the YAML and no importable "
                            f"module {module_path!r} ({e})") from None
    try:
        return getattr(module, fn_name)
    except AttributeError:
        raise TaskError(f"{yaml_path}: !function {qualname}: module {module_path!r} has no {fn_name!r}") from None


def load_yaml(path: str | Path, resolve_functions: bool = True, _seen: frozenset = frozenset()) -> dict[str, Any]:
    """A task YAML as a dict, `include:` merged (local keys win) and `!function` resolved, as lm-eval loads it."""
    import yaml

    path = Path(path).expanduser().resolve()
    if path in _seen:
        raise TaskError(f"{path}: include cycle")
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")

    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):
        spec = loader.construct_scalar(node)
        return _import_function(spec, path.parent, path) if resolve_functions else f"!function {spec}"

    Loader.add_constructor("!function", function)
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (SafeLoader + !function)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise TaskError(f"{path}{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise TaskError(f"{path}: a task YAML must be a mapping of fields, got {type(cfg).__name__}")
    if "include" not in cfg:
        return cfg
    includes = cfg.pop("include")
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        if not inc_path.is_file():
            raise TaskError(f"{path}: field 'include': {inc_path} not found")
        sub = load_yaml(inc_path, resolve_functions, _seen | {path})
        sub.pop("task_list", None)
        merged.update(sub)
    merged.update(cfg)
    return merged


class TaskIndex:
    """Task, tag and group names found in the shipped tasks and in include paths (later paths win)."""

    def __init__(self, include_path: str | Path | Sequence[str | Path] | None = None, include_defaults: bool = True):
        roots = [TASKS_DIR] if include_defaults else []
        if include_path:
            paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
            for p in paths:
                if not Path(p).is_dir():
                    raise TaskError(f"--include-path {p}: not a directory")
                roots.append(Path(p))
        self.tasks: dict[str, Path] = {}
        self.groups: dict[str, Path] = {}
        self.tags: dict[str, list[str]] = defaultdict(list)
        self.errors: dict[Path, str] = {}
        for root in roots:
            for yaml_path in sorted(Path(root).glob("**/*.yaml")):
                if any(part in ("__pycache__", ".ipynb_checkpoints") for part in yaml_path.parts):
                    continue
                try:
                    cfg = load_yaml(yaml_path, resolve_functions=False)
                except TaskError as e:
                    self.errors[yaml_path] = str(e)
                    continue
                if "group" in cfg and isinstance(cfg.get("task"), list):
                    self.groups[cfg["group"]] = yaml_path
                elif isinstance(cfg.get("task"), str):
                    self.tasks[cfg["task"]] = yaml_path
                    tags = cfg.get("tag") or []
                    for tag in [tags] if isinstance(tags, str) else tags:
                        if cfg["task"] not in self.tags[tag]:
                            self.tags[tag].append(cfg["task"])

    def resolve(self, names: Sequence[str]) -> list[str]:
        """Task names for task, tag and group names (groups expand to their member tasks)."""
        out: list[str] = []
        for name in names:
            if name in self.tasks:
                out.append(name)
            elif name in self.groups:
                out.extend(self.resolve(self.group_members(name)))
            elif name in self.tags:
                out.extend(self.tags[name])
            else:
                known = sorted(set(self.tasks) | set(self.tags) | set(self.groups))
                hint = "".join(f"; {p} could not be read: {e}" for p, e in self.errors.items())
                raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(known) or 'none'}{hint}")
        return list(dict.fromkeys(out))

    def group_config(self, name: str) -> dict[str, Any]:
        path = self.groups[name]
        cfg = load_yaml(path, resolve_functions=False)
        unknown = sorted(set(cfg) - set(GROUP_FIELDS))
        if unknown:
            raise TaskError(f"{path}: unknown group field(s) {unknown}; llmkit reads {sorted(GROUP_FIELDS)}")
        aggs = cfg.get("aggregate_metric_list") or []
        if isinstance(aggs, dict):
            aggs = [aggs]
        for i, agg in enumerate(aggs):
            if not isinstance(agg, dict) or "metric" not in agg:
                raise TaskError(f"{path}: aggregate_metric_list[{i}] needs a 'metric'")
            if agg.get("aggregation", "mean") != "mean":
                raise TaskError(f"{path}: aggregate_metric_list[{i}]: only aggregation 'mean' is supported")
        cfg["aggregate_metric_list"] = aggs
        return cfg

    def group_leaves(self, name: str, _seen: frozenset = frozenset()) -> list[str]:
        """The tasks under a group, nested groups and tags expanded."""
        if name in _seen:
            raise TaskError(f"{self.groups[name]}: group {name!r} contains itself")
        leaves: list[str] = []
        for member in self.group_members(name):
            if member in self.groups:
                leaves += self.group_leaves(member, _seen | {name})
            else:
                leaves += self.resolve([member])
        return list(dict.fromkeys(leaves))

    def group_members(self, name: str) -> list[str]:
        cfg = load_yaml(self.groups[name], resolve_functions=False)
        members = []
        for item in cfg["task"]:
            if isinstance(item, dict) and "task" in item:
                members.append(item["task"])
            elif isinstance(item, str):
                members.append(item)
            else:
                raise TaskError(f"{self.groups[name]}: field 'task': group members must be task names")
        return members

    def config(self, name: str) -> tuple[dict[str, Any], Path]:
        path = self.tasks[name]
        return load_yaml(path), path


# ----------------------------------------------------------------------------- data


class Docs:
    """A split as a list of dicts with the parts of `datasets.Dataset` that `process_docs` functions use."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows
        keys: dict[str, None] = {}
        for r in rows:
            keys.update(dict.fromkeys(r))
        for r in rows:  # Arrow fills a column a row lacks with null
            for k in keys:
                r.setdefault(k, None)
        self.features = {k: None for k in keys}

    @property
    def column_names(self) -> list[str]:
        return list(self.features)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i):
        if isinstance(i, str):
            return [r[i] for r in self.rows]
        if isinstance(i, slice):
            return {k: [r[k] for r in self.rows[i]] for k in self.features}
        return self.rows[i]

    def map(self, fn: Callable, with_indices: bool = False, batched: bool = False, batch_size: int = 1000,
            remove_columns: str | Sequence[str] | None = None, **_ignored) -> Docs:
        remove = {remove_columns} if isinstance(remove_columns, str) else set(remove_columns or ())
        out = []
        if batched:
            for start in range(0, len(self.rows), batch_size or len(self.rows) or 1):
                chunk = self.rows[start: start + (batch_size or len(self.rows))]
                batch = {k: [r[k] for r in chunk] for k in self.features}
                args = (batch, list(range(start, start + len(chunk)))) if with_indices else (batch,)
                result = fn(*args) or {}
                kept = {k: v for k, v in batch.items() if k not in remove}
                kept.update(result)
                n = len(next(iter(kept.values()))) if kept else 0
                out.extend({k: v[i] for k, v in kept.items()} for i in range(n))
        else:
            for i, row in enumerate(self.rows):
                result = fn(row, i) if with_indices else fn(row)
                new = {k: v for k, v in row.items() if k not in remove}
                new.update(result or {})
                out.append(new)
        return Docs(out)

    def filter(self, fn: Callable, with_indices: bool = False, **_ignored) -> Docs:
        return Docs([dict(r) for i, r in enumerate(self.rows) if (fn(r, i) if with_indices else fn(r))])

    def select(self, indices: Iterable[int]) -> Docs:
        return Docs([dict(self.rows[i]) for i in indices])

    def rename_column(self, old: str, new: str) -> Docs:
        return Docs([{(new if k == old else k): v for k, v in r.items()} for r in self.rows])

    def remove_columns(self, columns: str | Sequence[str]) -> Docs:
        drop = {columns} if isinstance(columns, str) else set(columns)
        return Docs([{k: v for k, v in r.items() if k not in drop} for r in self.rows])

    def shuffle(self, seed: int | None = None) -> Docs:
        rows = [dict(r) for r in self.rows]
        random.Random(seed).shuffle(rows)
        return Docs(rows)

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]


def _read_json_file(path: Path, field: str | None = None) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and field):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if field:
            if not isinstance(data, dict) or field not in data:
                raise TaskError(f"{path}: field {field!r} (dataset_kwargs.field) not found")
            data = data[field]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise TaskError(f"{path}: expected a JSON list of objects")
        return data
    rows = []
    for where, row in iter_jsonl(text.splitlines(), str(path), TaskError):
        if not isinstance(row, dict):
            raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _csv_value(text: str, kind: str):
    if text == "":
        return None
    return int(text) if kind == "int" else float(text) if kind == "float" else text


def _read_csv_file(path: Path, delimiter: str = ",") -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return []
        names = [h if h else f"Unnamed: {i}" for i, h in enumerate(header)]  # pandas' name for a blank header
        raw = []
        for n, row in enumerate(reader, 2):
            if len(row) != len(names):
                raise TaskError(f"{path}:{n}: {len(row)} fields, the header has {len(names)}")
            raw.append(row)
    kinds = {}
    for j, name in enumerate(names):  # pandas-like inference: int, float, else str
        values = [r[j] for r in raw if r[j] != ""]
        kind = "int"
        for v in values:
            if kind == "int":
                try:
                    int(v)
                    continue
                except ValueError:
                    kind = "float"
            try:
                float(v)
            except ValueError:
                kind = "str"
                break
        kinds[name] = kind
    return [{name: _csv_value(r[j], kinds[name]) for j, name in enumerate(names)} for r in raw]


class LocalDataset(dict):
    """Split name -> `Docs`, each split read from its files on first access (unused splits may be absent)."""

    def __init__(self, loaders: dict[str, Callable[[], Docs]]):
        super().__init__()
        self.loaders = loaders

    def __contains__(self, split) -> bool:
        return split in self.loaders

    def __getitem__(self, split: str) -> Docs:
        if not dict.__contains__(self, split):
            dict.__setitem__(self, split, self.loaders[split]())
        return dict.__getitem__(self, split)

    def splits(self) -> list[str]:
        return sorted(self.loaders)


def load_local_dataset(cfg: dict[str, Any], source: Path, data_dir: str | Path | None = None) -> LocalDataset:
    """Splits of a task's local dataset (`dataset_path: json|csv` + `dataset_kwargs.data_files`)."""
    kind = cfg.get("dataset_path")
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    kwargs.pop("trust_remote_code", None)
    if kind not in ("json", "csv"):
        raise TaskError(f"{source}: field 'dataset_path' must be json or csv with local dataset_kwargs.data_files "
                        f"(nothing is downloaded), got {kind!r}")
    files = kwargs.pop("data_files", None)
    if files is None:
        raise TaskError(f"{source}: field 'dataset_kwargs.data_files' is required (local files to read)")
    if isinstance(files, (str, list)):
        files = {"train": files}
    if not isinstance(files, dict):
        raise TaskError(f"{source}: field 'dataset_kwargs.data_files' must be a path, a list or a split: path map")
    base = Path(data_dir) if data_dir is not None else Path.cwd()

    def loader(split: str, paths) -> Callable[[], Docs]:
        def load() -> Docs:
            rows: list[dict[str, Any]] = []
            for pattern in [paths] if isinstance(paths, str) else list(paths):
                full = Path(pattern).expanduser()
                full = full if full.is_absolute() else base / full
                matches = sorted(glob.glob(str(full))) if any(c in str(full) for c in "*?[") else [str(full)]
                if not matches or not Path(matches[0]).is_file():
                    raise TaskError(f"{source}: data file {full} (split {split!r}) not found"
                                    + ("" if data_dir else "; relative data_files are read from the working "
                                       "directory or --data-dir"))
                for m in matches:
                    try:
                        if kind == "json":
                            rows.extend(_read_json_file(Path(m), kwargs.get("field")))
                        else:
                            rows.extend(_read_csv_file(Path(m), kwargs.get("sep", kwargs.get("delimiter", ","))))
                    except UnicodeDecodeError as e:
                        raise TaskError(f"{m}: not valid UTF-8 ({e})") from None
            return Docs(rows)

        return load

    return LocalDataset({split: loader(split, paths) for split, paths in files.items()})


# ----------------------------------------------------------------------------- templates


def _regex_replace(text, pattern, repl, count: int = 0):
    return re.sub(pattern, repl, text, count=count)


_ENV = None


def apply_template(template: str, doc: dict) -> str:
    """Render a Jinja template over a document (lm-eval's environment: strict undefined, trailing newline kept)."""
    global _ENV
    if _ENV is None:
        from jinja2 import BaseLoader, Environment, StrictUndefined

        _ENV = Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
        _ENV.filters["regex_replace"] = _regex_replace
    return _ENV.from_string(template).render(**doc)


def _maybe_delimit(prefix: str | None, suffix: str | None, delimiter: str = " ") -> str:
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix or ""
    return prefix + delimiter + suffix if not (prefix[-1].isspace() or suffix[0].isspace()) else prefix + suffix


def _requires_delimiter(prefix: str, suffix: str) -> bool:
    return prefix != "" and not (prefix[-1].isspace() or suffix[0].isspace())


# ----------------------------------------------------------------------------- metrics


def _mean(arr):
    return sum(arr) / len(arr)


def _sample_stddev(arr):
    mu = _mean(arr)
    return math.sqrt(sum((x - mu) ** 2 for x in arr) / (len(arr) - 1))


def _weighted_mean(items):
    a, b = zip(*items)
    return sum(a) / sum(b)


def _sacreformat(refs, preds):
    refs = list(refs)
    if isinstance(refs[0], str) or not isinstance(refs[0], Iterable):
        refs = [[r] for r in refs]
    refs = list(zip(*refs))
    preds = list(preds)
    if not isinstance(preds[0], str) and isinstance(preds[0], Iterable):
        preds = [p[0] for p in preds]
    return refs, preds


def _agg_bleu(items):
    import sacrebleu

    refs, preds = _sacreformat(*zip(*items))
    return sacrebleu.corpus_bleu(preds, refs).score


def _agg_chrf(items):
    import sacrebleu

    refs, preds = _sacreformat(*zip(*items))
    return sacrebleu.corpus_chrf(preds, refs).score


def _agg_ter(items):
    import sacrebleu

    refs, preds = _sacreformat(*zip(*items))
    return sacrebleu.corpus_ter(preds, refs).score


def _agg_f1(items):
    """Binary F1 of (gold, pred) with 1 the positive class (sklearn's `f1_score`, which lm-eval calls)."""
    golds, preds = zip(*items)
    labels = set(golds) | set(preds)
    if len(labels) > 2 or (len(labels) == 2 and 1 not in labels):
        raise TaskError(f"metric 'f1' is binary (labels 0/1, as lm-eval's); got labels {sorted(labels)}")
    tp = sum(1 for g, p in zip(golds, preds) if g == 1 and p == 1)
    fp = sum(1 for g, p in zip(golds, preds) if g != 1 and p == 1)
    fn = sum(1 for g, p in zip(golds, preds) if g == 1 and p != 1)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _agg_mcc(items):
    golds, preds = zip(*items)
    labels = sorted(set(golds) | set(preds))
    index = {label: i for i, label in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)))
    for g, p in zip(golds, preds):
        cm[index[g], index[p]] += 1
    t, p_sum, c, s = cm.sum(axis=1), cm.sum(axis=0), np.trace(cm), cm.sum()
    cov_ytyp = c * s - np.dot(t, p_sum)
    cov_ypyp = s**2 - np.dot(p_sum, p_sum)
    cov_ytyt = s**2 - np.dot(t, t)
    return 0.0 if cov_ypyp * cov_ytyt == 0 else float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def _agg_brier(items):
    gold, predictions = list(zip(*items))
    predictions = np.array(predictions)
    one_hot = np.eye(predictions.shape[1])[list(gold)]
    return float(np.mean(np.sum((predictions - one_hot) ** 2, axis=1)))


AGGREGATIONS: dict[str, Callable] = {
    "mean": _mean,
    "median": lambda arr: sorted(arr)[len(arr) // 2],
    "nanmean": lambda arr: float("nan") if not arr or all(np.isnan(arr)) else float(np.nanmean(arr)),
    "perplexity": lambda items: math.exp(-_mean(items)),
    "weighted_perplexity": lambda items: math.exp(-_weighted_mean(items)),
    "bits_per_byte": lambda items: -_weighted_mean(items) / math.log(2),
    "f1": _agg_f1,
    "matthews_corrcoef": _agg_mcc,
    "bleu": _agg_bleu,
    "chrf": _agg_chrf,
    "ter": _agg_ter,
    "brier_score": _agg_brier,
    "bypass": lambda arr: 999,
}
# lm-eval bootstraps these (stderr_for_metric); "mean" has the closed form
BOOTSTRAPPED = ("median", "matthews_corrcoef", "f1", "perplexity", "bleu", "chrf", "ter", "nanmean")


def _exact_match_metric(references, predictions, regexes_to_ignore=None, ignore_case=False, ignore_punctuation=False,
                        ignore_numbers=False, **_):
    from llmkit.eval.metrics import exact_match

    return {"exact_match": exact_match(predictions, references, regexes_to_ignore, ignore_case, ignore_punctuation,
                                       ignore_numbers)}


def _rouge_metric(references, predictions, use_stemmer=False, **_):
    """Hugging Face evaluate's `rouge` (lm-eval's fallback for metric 'rouge'): F-measures per document."""
    from llmkit.eval.metrics import rouge

    return rouge(predictions, [r if isinstance(r, str) else list(r) for r in references], use_stemmer=use_stemmer)


def _token_f1_metric(references, predictions, **_):
    from llmkit.eval.metrics import token_f1

    return {"token_f1": token_f1(predictions[0], references[0])}


# name -> (function for generate_until or None for passthrough, default aggregation, higher is better)
METRICS: dict[str, tuple[Callable | None, str, bool]] = {
    "acc": (None, "mean", True), "acc_norm": (None, "mean", True), "acc_bytes": (None, "mean", True),
    "acc_mutual_info": (None, "mean", True), "likelihood": (None, "mean", True),
    "brier_score": (None, "brier_score", False),
    "perplexity": (None, "perplexity", False), "word_perplexity": (None, "weighted_perplexity", False),
    "byte_perplexity": (None, "weighted_perplexity", False), "bits_per_byte": (None, "bits_per_byte", False),
    "f1": (None, "f1", True), "mcc": (None, "matthews_corrcoef", True), "bleu": (None, "bleu", True),
    "chrf": (None, "chrf", True), "ter": (None, "ter", False), "bypass": (None, "bypass", True),
    "exact_match": (_exact_match_metric, "mean", True),
    # not in lm-eval's registry (there "rouge" is HF evaluate's, which needs a download): llmkit computes it locally
    "rouge": (_rouge_metric, "mean", True), "token_f1": (_token_f1_metric, "mean", True),
}
DEFAULT_METRICS = {
    "loglikelihood": ["perplexity", "acc"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "multiple_choice": ["acc", "acc_norm"],
    "generate_until": ["exact_match"],
}


# ----------------------------------------------------------------------------- filters


def _filter_regex(resps, regex_pattern=r"#### (\-?[0-9\.\,]+)", group_select=0, fallback="[invalid]"):
    regex = re.compile(regex_pattern)
    out = []
    for inst in resps:
        filtered = []
        for resp in inst:
            match = regex.findall(resp if isinstance(resp, str) else "")
            if match:
                match = match[group_select]
                if isinstance(match, tuple):
                    match = [m for m in match if m]
                    match = match[0] if match else fallback
                match = match.strip()
            else:
                match = fallback
            filtered.append(match)
        out.append(filtered)
    return out


def _filter_map(resps, mapping_dict=None, default_value=None):
    mapping = mapping_dict or {}
    return [[mapping.get(r, default_value) for r in inst] for inst in resps]


FILTERS: dict[str, Callable] = {
    "regex": _filter_regex,
    "take_first": lambda resps: [r[0] for r in resps],
    "take_first_k": lambda resps, k: [r[:k] for r in resps],
    "majority_vote": lambda resps: [[Counter(r).most_common(1)[0][0]] for r in resps],
    "remove_whitespace": lambda resps: [[x.strip() for x in r] for r in resps],
    "lowercase": lambda resps: [[x.lower() for x in r] for r in resps],
    "uppercase": lambda resps: [[x.upper() for x in r] for r in resps],
    "map": _filter_map,
}


# ----------------------------------------------------------------------------- the task


class Task:
    """One lm-eval `ConfigurableTask` built from its YAML dict."""

    # (n, doc) -> n few-shot documents for `doc`, replacing lm-eval's sampler (llmkit.prompting.harness sets it
    # for kNN / MMR demonstration selection)
    fewshot_selector: Callable[[int, dict], list[dict]] | None = None

    def __init__(self, config: dict[str, Any], source: Path | str = "<config>", data_dir: str | Path | None = None):
        self.source = Path(source)
        raw = {k: v for k, v in config.items() if k not in STRUCTURAL}
        unknown = sorted(set(raw) - set(TASK_FIELDS))
        if unknown:
            raise TaskError(f"{source}: unknown task field(s) {unknown}; lm-eval task fields are "
                            f"{sorted(TASK_FIELDS)}")
        if "class" in config:
            raise TaskError(f"{source}: field 'class': Python task classes are not supported; use a YAML task")
        self.config = {**TASK_FIELDS, **copy.copy(raw)}
        cfg = self.config
        self.name = cfg["task"]
        if not isinstance(self.name, str) or not self.name:
            raise TaskError(f"{source}: field 'task' must be the task's name")
        if cfg["output_type"] not in OUTPUT_TYPES:
            raise TaskError(f"{source}: field 'output_type' must be one of {list(OUTPUT_TYPES)}, "
                            f"got {cfg['output_type']!r}")
        self.output_type = cfg["output_type"]
        for key in ("doc_to_text", "doc_to_target"):
            if cfg[key] is None and self.output_type != "loglikelihood_rolling":
                raise TaskError(f"{source}: field {key!r} is required")
        if self.output_type == "multiple_choice" and cfg["doc_to_choice"] is None:
            raise TaskError(f"{source}: field 'doc_to_choice' is required for output_type multiple_choice")
        for key in ("doc_to_image", "doc_to_audio", "use_prompt", "custom_dataset"):
            if cfg[key]:
                raise TaskError(f"{source}: field {key!r} is not supported")
        if not isinstance(cfg["repeats"], int) or cfg["repeats"] < 1:
            raise TaskError(f"{source}: field 'repeats' must be a positive integer, got {cfg['repeats']!r}")
        self._setup_generation_kwargs()
        self._setup_fewshot_config()
        self._setup_metrics()
        self._setup_filters()
        self.version = (cfg["metadata"] or {}).get("version", "Yaml") if isinstance(cfg["metadata"], dict) else "Yaml"
        self.dataset = load_local_dataset(cfg, self.source, data_dir)
        for key in ("test_split", "validation_split", "training_split", "fewshot_split"):
            split = cfg[key]
            if split is not None and split not in self.dataset:
                raise TaskError(f"{source}: field {key!r} names split {split!r}, but data_files has only "
                                f"{self.dataset.splits()}")
        if cfg["test_split"] is None and cfg["validation_split"] is None:
            raise TaskError(f"{source}: set field 'test_split' or 'validation_split' (the split to evaluate)")
        self.eval_docs = self._split_docs(cfg["test_split"] or cfg["validation_split"])
        if len(self.eval_docs) == 0:
            raise TaskError(f"{source}: the evaluation split has no documents")
        self.features = set(self.eval_docs.features)
        self._fewshot_pool: list[dict] | None = None
        self.fewshot_rnd = random.Random(DEFAULT_FEWSHOT_SEED)
        first = self.eval_docs[0]
        text = self.doc_to_text(first)
        self.multiple_input = len(self.doc_to_choice(first)) if isinstance(text, int) and cfg["doc_to_choice"] else 0
        target = self.doc_to_target(first)
        self.multiple_target = len(target) if isinstance(target, list) else 0

    # -- setup

    def _setup_generation_kwargs(self) -> None:
        cfg = self.config
        if cfg["generation_kwargs"] is not None:
            gk = dict(cfg["generation_kwargs"])
            if "temperature" in gk:
                gk["temperature"] = float(gk["temperature"])
            if "until" not in gk:
                gk["until"] = [cfg["fewshot_delimiter"]]
            cfg["generation_kwargs"] = gk
        elif self.output_type == "generate_until":
            cfg["generation_kwargs"] = {"temperature": 0.0, "do_sample": False, "max_gen_toks": DEFAULT_MAX_GEN_TOKS,
                                        "until": [cfg["fewshot_delimiter"]]}

    def _setup_fewshot_config(self) -> None:
        cfg = self.config
        given = cfg["fewshot_config"] or {}
        if not isinstance(given, dict):
            raise TaskError(f"{self.source}: field 'fewshot_config' must be a mapping")
        unknown = sorted(set(given) - set(FEWSHOT_FIELDS))
        if unknown:
            raise TaskError(f"{self.source}: unknown fewshot_config field(s) {unknown}")
        inherited = {"split": cfg["fewshot_split"], "process_docs": cfg["process_docs"],
                     "fewshot_delimiter": cfg["fewshot_delimiter"], "target_delimiter": cfg["target_delimiter"],
                     "gen_prefix": cfg["gen_prefix"], "doc_to_text": cfg["doc_to_text"],
                     "doc_to_choice": cfg["doc_to_choice"], "doc_to_target": cfg["doc_to_target"]}
        self.fewshot_cfg = {"sampler": "default", "fewshot_indices": None, "samples": None, **inherited, **given}
        if self.fewshot_cfg["sampler"] not in ("default", "first_n"):
            raise TaskError(f"{self.source}: field 'fewshot_config.sampler' must be default or first_n, "
                            f"got {self.fewshot_cfg['sampler']!r}")

    def _setup_metrics(self) -> None:
        cfg = self.config
        self.metric_fns: dict[str, Callable | None] = {}
        self.metric_kwargs: dict[str, dict] = {}
        self.aggregations: dict[str, Callable] = {}
        self.higher_is_better: dict[str, bool] = {}
        self._aggregation_names: dict[str, str] = {}
        entries = cfg["metric_list"]
        if entries is None:
            entries = [{"metric": m} for m in DEFAULT_METRICS[self.output_type]]
        if not isinstance(entries, list):
            raise TaskError(f"{self.source}: field 'metric_list' must be a list of {{metric: name, ...}}")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "metric" not in entry:
                raise TaskError(f"{self.source}: metric_list[{i}] needs a 'metric' key")
            metric = entry["metric"]
            kwargs = {k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better",
                                                                   "hf_evaluate")}
            if entry.get("hf_evaluate"):
                raise TaskError(f"{self.source}: metric_list[{i}]: hf_evaluate metrics need a download; not supported")
            if callable(metric):
                name = metric.__name__
                self.metric_fns[name], default_agg, default_hib = metric, "mean", True
            elif cfg["process_results"] is not None and metric not in METRICS:
                name, default_agg, default_hib = metric, "mean", True  # process_results computes it
                self.metric_fns[name] = None
            elif metric in METRICS:
                name = metric
                fn, default_agg, default_hib = METRICS[metric]
                self.metric_fns[name] = fn
            else:
                raise TaskError(f"{self.source}: metric_list[{i}]: unknown metric {metric!r}; known: "
                                f"{sorted(METRICS)} or a !function")
            if cfg["process_results"] is not None:
                self.metric_fns[name] = None
            self.metric_kwargs[name] = kwargs
            agg = entry.get("aggregation", default_agg)
            if isinstance(agg, str):
                if agg not in AGGREGATIONS:
                    raise TaskError(f"{self.source}: metric_list[{i}]: unknown aggregation {agg!r}; known: "
                                    f"{sorted(AGGREGATIONS)}")
                self.aggregations[name] = AGGREGATIONS[agg]
                self._aggregation_names[name] = agg
            elif callable(agg):
                self.aggregations[name] = agg
            else:
                raise TaskError(f"{self.source}: metric_list[{i}]: aggregation must be a name or !function")
            self.higher_is_better[name] = entry.get("higher_is_better", default_hib)

    def _setup_filters(self) -> None:
        cfg = self.config
        if cfg["filter_list"] is None:
            self.filters = [("none", [("take_first", {})])]
            return
        if not isinstance(cfg["filter_list"], list):
            raise TaskError(f"{self.source}: field 'filter_list' must be a list")
        self.filters = []
        for i, entry in enumerate(cfg["filter_list"]):
            if not isinstance(entry, dict) or "name" not in entry or "filter" not in entry:
                raise TaskError(f"{self.source}: filter_list[{i}] needs 'name' and 'filter'")
            steps = []
            for j, step in enumerate(entry["filter"]):
                fn = step.get("function") if isinstance(step, dict) else None
                if fn not in FILTERS:
                    raise TaskError(f"{self.source}: filter_list[{i}].filter[{j}]: unknown function {fn!r}; known: "
                                    f"{sorted(FILTERS)}")
                steps.append((fn, {k: v for k, v in step.items() if k != "function"}))
            self.filters.append((entry["name"], steps))

    # -- documents

    def _split_docs(self, split: str) -> Docs:
        docs = self.dataset[split]
        fn = self.config["process_docs"]
        return _as_docs(fn(docs), self.source) if fn is not None else docs

    def _fewshot_docs(self) -> list[dict]:
        fc, cfg = self.fewshot_cfg, self.config
        if fc["split"] is not None:
            docs = self.dataset[fc["split"]]
            pool = _as_docs(fc["process_docs"](docs), self.source) if fc["process_docs"] is not None else docs
        elif cfg["fewshot_config"] is not None and fc["samples"] is not None:
            pool = fc["samples"]() if callable(fc["samples"]) else fc["samples"]
        elif cfg["training_split"] is not None:
            pool = self._split_docs(cfg["training_split"])
        elif cfg["validation_split"] is not None:
            pool = self._split_docs(cfg["validation_split"])
        else:
            pool = self._split_docs(cfg["test_split"])
        pool = list(pool)
        if fc["fewshot_indices"]:
            pool = [pool[i] for i in fc["fewshot_indices"]]
        return pool

    @property
    def fewshot_pool(self) -> list[dict]:
        if self._fewshot_pool is None:  # read on first use: a zero-shot run needs no few-shot file
            self._fewshot_pool = self._fewshot_docs()
        return self._fewshot_pool

    def set_fewshot_seed(self, seed: int | None) -> None:
        self.fewshot_rnd = random.Random(seed)

    def _sample_fewshot(self, n: int, eval_doc: dict | None) -> list[dict]:
        if n == 0:
            return []
        pool = self.fewshot_pool
        if not pool:
            raise TaskError(f"{self.source}: num_fewshot={n} but there are no few-shot documents")
        if self.fewshot_cfg["sampler"] == "first_n":
            candidates = [x for x in pool if x != eval_doc] if eval_doc is not None else pool
            if n > len(candidates):
                raise TaskError(f"{self.source}: num_fewshot={n} but only {len(candidates)} few-shot documents")
            return candidates[:n]
        if eval_doc is None:
            return self.fewshot_rnd.sample(pool, n)
        res = [x for x in self.fewshot_rnd.sample(pool, n + 1) if x != eval_doc][:n]
        if len(res) < n:
            res = self.fewshot_rnd.sample([x for x in pool if x != eval_doc], n)
        return res

    def _field(self, doc: dict, spec):
        return doc[spec] if spec in doc else apply_template(spec, doc)

    def doc_to_text(self, doc: dict, spec=None):
        spec = self.config["doc_to_text"] if spec is None else spec
        if isinstance(spec, int):
            return spec
        if isinstance(spec, str):
            if spec in self.features:
                return doc[spec]
            text = self._render(spec, doc, "doc_to_text")
            return ast.literal_eval(text) if text.isdigit() and self.config["doc_to_choice"] is not None else text
        if callable(spec):
            return spec(doc)
        raise TaskError(f"{self.source}: field 'doc_to_text' must be a template, a column or a !function")

    def doc_to_target(self, doc: dict, spec=None):
        spec = self.config["doc_to_target"] if spec is None else spec
        if isinstance(spec, int) or isinstance(spec, list):
            return spec
        if isinstance(spec, str):
            if spec in self.features:
                return doc[spec]
            text = self._render(spec, doc, "doc_to_target")
            if text.isdigit() and self.config["doc_to_choice"] is not None:
                return ast.literal_eval(text)
            if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
                try:
                    return ast.literal_eval(text)
                except (SyntaxError, ValueError):
                    return text
            return text
        if callable(spec):
            return spec(doc)
        raise TaskError(f"{self.source}: field 'doc_to_target' must be a template, a column or a !function")

    def doc_to_choice(self, doc: dict, spec=None) -> list:
        spec = self.config["doc_to_choice"] if spec is None else spec
        if isinstance(spec, str):
            if spec in self.features:
                return doc[spec]
            text = self._render(spec, doc, "doc_to_choice")
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                raise TaskError(f"{self.source}: field 'doc_to_choice' rendered {text[:80]!r}, which is not a "
                                "Python list literal") from None
        if isinstance(spec, list):
            return spec
        if isinstance(spec, dict):
            return list(spec.values())
        if callable(spec):
            return spec(doc)
        raise TaskError(f"{self.source}: field 'doc_to_choice' must be a template, a column, a list or a !function")

    def _render(self, template: str, doc: dict, field: str) -> str:
        from jinja2 import TemplateError

        try:
            return apply_template(template, doc)
        except TemplateError as e:
            raise TaskError(f"{self.source}: field {field!r}: template {template[:60]!r} failed on a document "
                            f"with keys {sorted(doc)}: {e}") from None

    # -- requests

    def fewshot_context(self, doc: dict, num_fewshot: int) -> str | list[str]:
        cfg, fc = self.config, self.fewshot_cfg
        gen_prefix = self.doc_to_prefix(doc)
        parts: list[str] = []
        description = (self._field(doc, cfg["description"]) if cfg["description"] else "") or ""
        if description:
            parts.append(description)
        if num_fewshot > 0:
            eval_doc = doc if fc["split"] == cfg["test_split"] else None
            shots = (self.fewshot_selector(num_fewshot, doc) if self.fewshot_selector
                     else self._sample_fewshot(num_fewshot, eval_doc))
            for fs_doc in shots:
                q = self.doc_to_text(fs_doc, fc["doc_to_text"])
                c = self.doc_to_choice(fs_doc, fc["doc_to_choice"]) if fc["doc_to_choice"] else None
                a = self.doc_to_target(fs_doc, fc["doc_to_target"])
                fs_prefix = self._field(fs_doc, fc["gen_prefix"]) if fc["gen_prefix"] else None
                if self.multiple_input:
                    q, c = c[q], None
                parts.append(self._qa_turn(q, c, a, fs_prefix, fc["target_delimiter"], fc["fewshot_delimiter"]))
        q = self.doc_to_text(doc)
        c = self.doc_to_choice(doc) if cfg["doc_to_choice"] else None
        if self.multiple_input:
            prev = "".join(parts)
            return [prev + self._qa_turn(ctx, None, None, gen_prefix, "", "") for ctx in c]
        parts.append(self._qa_turn(q, c, None, gen_prefix, cfg["target_delimiter"], ""))
        return "".join(parts)

    def _qa_turn(self, q, c, a, gen_prefix, tgt_delim: str, few_delim: str) -> str:
        """lm-eval's `build_qa_turn` rendered as plain text."""
        if not isinstance(q, str):
            raise TaskError(f"{self.source}: doc_to_text must give a string here, got {type(q).__name__}")
        has_answer = a is not None and a != ""
        if has_answer and not gen_prefix:
            text = q + tgt_delim
        elif gen_prefix and _requires_delimiter(q, gen_prefix):
            text = q + tgt_delim
        else:
            text = q
        if has_answer:
            answer = c[a] if (c and isinstance(a, int)) else a[0] if isinstance(a, list) else a
            if not isinstance(answer, str):
                raise TaskError(f"{self.source}: a few-shot answer must be a string (or a choice index), "
                                f"got {answer!r}")
            text += _maybe_delimit(gen_prefix, answer, " ") + few_delim
        elif gen_prefix:
            text += gen_prefix
        return text

    def doc_to_prefix(self, doc: dict) -> str | None:
        prefix = self.config["gen_prefix"]
        return None if prefix is None else self._field(doc, prefix)

    def construct_requests(self, doc: dict, ctx) -> list[tuple[str, tuple]]:
        """(request type, arguments) for one document, in lm-eval's order."""
        if self.output_type == "loglikelihood":
            return [("loglikelihood", (ctx, self.doc_to_target(doc)))]
        if self.output_type == "loglikelihood_rolling":
            return [("loglikelihood_rolling", (self.doc_to_target(doc),))]
        if self.output_type == "generate_until":
            return [("generate_until", (ctx, copy.deepcopy(self.config["generation_kwargs"])))]
        delim = self.config["target_delimiter"]
        if self.multiple_input:
            cont = self.doc_to_target(doc)
            args = [(context, f"{delim}{cont}") for context in ctx]
        else:
            args = [(ctx, f"{delim}{choice}") for choice in self.doc_to_choice(doc)]
        if "acc_mutual_info" in self.metric_fns:
            args += [("", f"{delim}{choice}") for choice in self.doc_to_choice(doc)]
        return [("loglikelihood", a) for a in args]

    # -- results

    def apply_filters(self, resps: list[list]) -> dict[str, list]:
        out = {}
        for name, steps in self.filters:
            values = resps
            for fn, kwargs in steps:
                values = FILTERS[fn](values, **kwargs)
            out[name] = list(values)
        return out

    def process_results(self, doc: dict, results: list) -> dict[str, Any]:
        cfg = self.config
        if callable(cfg["process_results"]):
            return cfg["process_results"](doc, results)
        use = self.metric_fns
        if self.output_type == "loglikelihood":
            ll, is_greedy = results[0]
            out = {}
            if "perplexity" in use:
                out["perplexity"] = ll
            if "acc" in use:
                out["acc"] = int(is_greedy)
            return out
        if self.output_type == "loglikelihood_rolling":
            (ll,) = results
            target = self.doc_to_target(doc)
            words, n_bytes = len(re.split(r"\s+", target)), len(target.encode("utf-8"))
            out = {}
            if "word_perplexity" in use:
                out["word_perplexity"] = (ll, words)
            if "byte_perplexity" in use:
                out["byte_perplexity"] = (ll, n_bytes)
            if "bits_per_byte" in use:
                out["bits_per_byte"] = (ll, n_bytes)
            return out
        if self.output_type == "multiple_choice":
            return self._multiple_choice_results(doc, results)
        return self._generation_results(doc, results[0])

    def _multiple_choice_results(self, doc: dict, results: list) -> dict[str, Any]:
        use = self.metric_fns
        lls, is_greedy = zip(*results)
        choices = self.doc_to_choice(doc)
        completion_len = np.array([float(len(c)) for c in choices])
        byte_length = np.array([float(len(c.encode("utf-8"))) for c in choices])
        lls_unconditional = None
        if 2 * len(choices) == len(lls) and "acc_mutual_info" in use:
            lls_unconditional, lls = lls[len(choices):], lls[: len(choices)]
        pred = np.argmax(lls)
        pred_norm = np.argmax(lls / completion_len)
        pred_byte = np.argmax(lls / byte_length)
        gold = self.gold_index(doc, choices)
        if self.multiple_target:
            acc = 1.0 if pred in gold else 0.0
            acc_norm = 1.0 if pred_norm in gold else 0.0
            acc_bytes = 1.0 if pred_byte in gold else 0.0
            exact = int(any(is_greedy[i] if i != -100 else 0 for i in gold))
        else:
            acc = 1.0 if pred == gold else 0.0
            acc_norm = 1.0 if pred_norm == gold else 0.0
            acc_bytes = 1.0 if pred_byte == gold else 0.0
            exact = int(is_greedy[gold]) if gold != -100 else 0
        prob_norm = np.exp(np.array(lls) - np.max(lls))
        prob_norm = prob_norm / prob_norm.sum()
        out: dict[str, Any] = {}
        values = {"acc": acc, "f1": (gold, pred), "mcc": (gold, pred), "acc_norm": acc_norm, "acc_bytes": acc_bytes,
                  "exact_match": exact, "brier_score": (gold, prob_norm), "likelihood": (gold, lls)}
        for key, value in values.items():
            if key in use:
                out[key] = value
        if "acc_mutual_info" in use:
            mi = [c - u for c, u in zip(lls, lls_unconditional)]
            out["acc_mutual_info"] = 1.0 if np.argmax(mi) == gold else 0.0
        return out

    def gold_index(self, doc: dict, choices: list | None = None):
        """The gold choice index (a list of them for multiple targets; -100 when not among the choices)."""
        choices = self.doc_to_choice(doc) if choices is None else choices
        gold = self.doc_to_text(doc) if self.multiple_input else self.doc_to_target(doc)
        if isinstance(gold, list):
            return [i if i < len(choices) else -100 for i in gold]
        if isinstance(gold, int):
            return gold if gold < len(choices) else -100
        if isinstance(gold, str):
            return choices.index(gold) if gold in choices else -100
        return gold

    def _generation_results(self, doc: dict, result) -> dict[str, Any]:
        gold = self.doc_to_target(doc)
        if self.config["doc_to_choice"] is not None:
            gold = self.doc_to_choice(doc)[gold]
        elif self.multiple_target:
            gold = list(gold)
        elif type(gold) is not type(result) and not ("bypass" in self.metric_fns or isinstance(result, list)):
            gold = type(result)(gold)
        out: dict[str, Any] = {}
        for metric, fn in self.metric_fns.items():
            kwargs = self.metric_kwargs[metric]
            if self.multiple_target:
                golds = gold if isinstance(gold, list) else [gold]
                if metric == "exact_match":
                    score = fn(references=golds, predictions=[result] * len(golds), **kwargs)["exact_match"]
                    out[metric] = 1.0 if score > 0.0 else 0.0
                    continue
                scores = []
                for g in golds:
                    s = self._call_metric(fn, metric, g, result, kwargs)
                    scores.append(s[metric] if isinstance(s, dict) else s)
                out[metric] = 1.0 if any(scores) else 0.0
                continue
            score = self._call_metric(fn, metric, gold, result, kwargs)
            if isinstance(score, dict):
                for key, value in score.items():
                    out[key] = value
                    if metric in self.aggregations and key not in self.aggregations:
                        self.aggregations[key] = self.aggregations[metric]
                        self.higher_is_better[key] = self.higher_is_better[metric]
            else:
                out[metric] = score
        return out

    @staticmethod
    def _call_metric(fn, metric, gold, result, kwargs):
        if fn is None:  # passthrough metrics (bleu, chrf, ter, ...) aggregate (gold, prediction) pairs
            return (gold, result)
        try:
            return fn(references=[gold], predictions=[result], **kwargs)
        except TypeError:
            return fn([gold, result])

    def dump_config(self) -> dict[str, Any]:
        return {k: (f"{v.__module__}.{v.__qualname__}" if callable(v) else v) for k, v in self.config.items()
                if v is not None}


def _as_docs(value, source: Path) -> Docs:
    if isinstance(value, Docs):
        return value
    try:
        return Docs([dict(r) for r in value])
    except (TypeError, ValueError):
        raise TaskError(f"{source}: process_docs must return documents (dicts)") from None


# ----------------------------------------------------------------------------- evaluation


class TaskSet(dict):
    """Task name -> `Task`, plus the requested groups (`groups`: name -> config with its leaf `tasks`)."""

    groups: dict[str, dict[str, Any]]


def load_tasks(names: Sequence[str], include_path=None, data_dir=None, include_defaults: bool = True
               ) -> TaskSet:
    """Tasks by task, tag or group name from the shipped YAMLs and `include_path`."""
    index = TaskIndex(include_path, include_defaults)
    tasks = TaskSet()
    tasks.groups = {}
    for name in names:
        if name in index.groups and name not in index.tasks:
            tasks.groups[name] = {**index.group_config(name), "tasks": index.group_leaves(name)}
    for name in index.resolve(list(names)):
        cfg, path = index.config(name)
        tasks[name] = Task(cfg, path, data_dir)
    return tasks


def aggregate_groups(results: dict[str, Any], groups: dict[str, dict[str, Any]]) -> None:
    """Group scores as lm-eval computes them: size-weighted (or plain) means of the leaf tasks' metrics,
    with the pooled standard error, for each entry of the group's `aggregate_metric_list`."""
    task_results = results["results"]
    for name, cfg in groups.items():
        leaves = [t for t in cfg["tasks"] if t in task_results]
        out: dict[str, Any] = {"alias": cfg.get("group_alias") or name, "name": name,
                               "sample_len": sum(task_results[t].get("sample_len", 0) for t in leaves)}
        for agg in cfg["aggregate_metric_list"]:
            metric = agg["metric"]
            filters = agg.get("filter_list")
            if filters is None:
                filters = list(dict.fromkeys(key.split(",", 1)[1] for t in leaves for key in task_results[t]
                                             if key.startswith(metric + ",")))
            for filter_key in [filters] if isinstance(filters, str) else filters:
                key, stderr_key = f"{metric},{filter_key}", f"{metric}_stderr,{filter_key}"
                have = [t for t in leaves if key in task_results[t]]
                if not have:
                    continue
                values = [task_results[t][key] for t in have]
                sizes = [task_results[t].get("sample_len", 0) for t in have]
                weights = sizes if agg.get("weight_by_size", True) else [1] * len(sizes)
                out[key] = sum(v * w for v, w in zip(values, weights)) / sum(weights)
                stderrs = [task_results[t].get(stderr_key) for t in have]
                if all(isinstance(s, (int, float)) for s in stderrs):
                    if agg.get("weight_by_size", True):
                        pooled = sum((n - 1) * s**2 * n for n, s in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
                        out[stderr_key] = math.sqrt(pooled / sum(sizes))
                    else:
                        out[stderr_key] = math.sqrt(sum(s**2 for s in stderrs)) / len(stderrs)
                else:
                    out[stderr_key] = "N/A"
                out.setdefault("sample_count", {})[key] = sum(sizes)
        results.setdefault("groups", {})[name] = out
        results["results"][name] = out


def evaluate(lm, tasks: Sequence[str] | dict[str, Task], include_path=None, data_dir=None,
             num_fewshot: int | None = None, limit: int | float | None = None,
             fewshot_seed: int | None = DEFAULT_FEWSHOT_SEED, bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
             log_samples: bool = False, gen_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run tasks (names, or loaded `Task`s) through `lm` (an `EvalLM`): lm-eval's `simple_evaluate` results.

    `num_fewshot` overrides every task's own value except an explicit 0; `limit` is a document count (or a
    fraction of each task when below 1); `gen_kwargs` update generate_until tasks' generation_kwargs.
    """
    if not isinstance(tasks, dict):
        tasks = load_tasks(tasks, include_path, data_dir)
    for task in tasks.values():
        if gen_kwargs and task.output_type == "generate_until":
            task.config["generation_kwargs"].update(gen_kwargs)
    requests: dict[str, list[tuple[str, int, int, tuple]]] = defaultdict(list)  # type -> (task, doc, idx, args)
    docs_by_task: dict[str, list[tuple[int, dict]]] = {}
    per_doc: dict[str, dict[int, list]] = {}
    for name, task in tasks.items():
        shots = task.config["num_fewshot"]
        if num_fewshot is not None and shots != 0:  # lm-eval never overrides a task's explicit 0
            shots = num_fewshot
        task.config["num_fewshot"] = shots if shots is not None else 0
        task.set_fewshot_seed(fewshot_seed)
        n_docs = len(task.eval_docs)
        n = None if limit is None else (int(math.ceil(n_docs * limit)) if limit < 1.0 else int(limit))
        docs = list(enumerate(task.eval_docs))[:n]
        docs_by_task[name] = docs
        per_doc[name] = {}
        for doc_id, doc in docs:
            ctx = task.fewshot_context(doc, task.config["num_fewshot"])
            reqs = task.construct_requests(doc, ctx)
            per_doc[name][doc_id] = [[] for _ in reqs]
            for idx, (kind, args) in enumerate(reqs):
                for _ in range(task.config["repeats"]):
                    requests[kind].append((name, doc_id, idx, args))
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        reqs = requests.get(kind)
        if not reqs:
            continue
        args = [r[3] for r in reqs]
        if kind == "loglikelihood":
            outputs = lm.loglikelihood(args)
        elif kind == "loglikelihood_rolling":
            outputs = lm.loglikelihood_rolling([a[0] for a in args])
        else:
            outputs = lm.generate_until(args)
        for (name, doc_id, idx, _), out in zip(reqs, outputs):
            per_doc[name][doc_id][idx].append(out)

    results: dict[str, Any] = {"results": {}, "configs": {}, "versions": {}, "n-shot": {}, "higher_is_better": {},
                               "n-samples": {}}
    if log_samples:
        results["samples"] = {}
    for name, task in tasks.items():
        # filters run over every instance of the task: resps[doc][request] is the list of repeats
        flat = [(doc_id, idx, resps) for doc_id, _ in docs_by_task[name]
                for idx, resps in enumerate(per_doc[name][doc_id])]
        filtered = task.apply_filters([r for _, _, r in flat])
        raw: dict[tuple[str, str], list] = defaultdict(list)
        samples = []
        for filter_key, values in filtered.items():
            by_doc: dict[int, list] = defaultdict(list)
            for (doc_id, _, _), value in zip(flat, values):
                by_doc[doc_id].append(value)
            for doc_id, doc in docs_by_task[name]:
                metrics = task.process_results(doc, by_doc[doc_id])
                for metric, value in metrics.items():
                    raw[(metric, filter_key)].append(value)
                if log_samples:
                    extra = {}
                    if task.output_type == "multiple_choice":
                        extra = {"choices": task.doc_to_choice(doc), "gold": _plain(task.gold_index(doc))}
                    samples.append({"doc_id": doc_id, "doc": doc, "target": task.doc_to_target(doc), **extra,
                                    "resps": per_doc[name][doc_id], "filtered_resps": by_doc[doc_id],
                                    "filter": filter_key, **{k: _plain(v) for k, v in metrics.items()}})
        agg: dict[str, Any] = {"name": name, "alias": task.config.get("task_alias") or name}
        sample_len = 0
        for (metric, filter_key), items in raw.items():
            fn = task.aggregations.get(metric, _mean)
            agg[f"{metric},{filter_key}"] = _plain(fn(items))
            agg[f"{metric}_stderr,{filter_key}"] = _stderr(fn, task, metric, items, bootstrap_iters)
            sample_len = max(sample_len, len(items))
        agg["sample_len"] = sample_len
        results["results"][name] = agg
        results["configs"][name] = task.dump_config()
        results["versions"][name] = task.version
        results["n-shot"][name] = task.config["num_fewshot"]
        results["higher_is_better"][name] = dict(task.higher_is_better)
        results["n-samples"][name] = {"original": len(task.eval_docs), "effective": sample_len}
        if log_samples:
            results["samples"][name] = samples
    aggregate_groups(results, getattr(tasks, "groups", {}))
    return results


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return [_plain(v) for v in x]
    return x


def _stderr(fn, task: Task, metric: str, items: list, bootstrap_iters: int):
    """lm-eval's stderr: closed form for means, a seeded bootstrap for the metrics it bootstraps."""
    if not isinstance(bootstrap_iters, int) or bootstrap_iters <= 0 or len(items) <= 1:
        return "N/A"
    agg_name = task._aggregation_names.get(metric)
    if agg_name is None and fn is _mean:
        agg_name = "mean"
    if agg_name == "mean":
        return _sample_stddev(items) / math.sqrt(len(items))
    if agg_name not in BOOTSTRAPPED:
        return "N/A"
    iters = min(bootstrap_iters, 100) if metric in ("bleu", "chrf", "chrf++", "ter") else bootstrap_iters
    chunk = min(1000, iters)
    res = []
    for i in range(iters // chunk):  # lm-eval seeds chunk i with random.Random(i)
        rnd = random.Random(i)
        for _ in range(chunk):
            res.append(fn(rnd.choices(items, k=len(items))))
    return _sample_stddev(res)


def format_results(results: dict[str, Any]) -> str:
    """A markdown table like lm-eval's: task, filter, n-shot, metric, value, stderr."""
    lines = ["|Task|Filter|n-shot|Metric|Value|Stderr|", "|---|---|---:|---|---:|---:|"]
    for name, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filter_key = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_key}", "N/A")
            value_s = f"{value:.4f}" if isinstance(value, float) else str(value)
            stderr_s = f"{stderr:.4f}" if isinstance(stderr, float) else str(stderr)
            shots = results["n-shot"].get(name, "")  # groups have none
            lines.append(f"|{name}|{filter_key}|{shots}|{metric}|{value_s}|{stderr_s}|")
    return "\n".join(lines)


def parse_gen_kwargs(text: str | None) -> dict[str, Any]:
    """`key=value,key=value` (lm-eval's --gen_kwargs) with ints, floats and booleans converted."""
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise TaskError(f"--gen-kwargs: expected key=value, got {part!r}")
        value = value.strip()
        if value.lower() in ("true", "false"):
            out[key.strip()] = value.lower() == "true"
            continue
        for cast in (int, float):
            try:
                out[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = value
    return out
