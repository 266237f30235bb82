"""Data pipeline throughput: MB/s per `llmkit data` step, and llmkit against datatrove on the same corpus.

    python benchmarks/data_throughput.py                      # 100k documents, 2 workers (several minutes)
    python benchmarks/data_throughput.py --docs 10000         # quicker
    python benchmarks/data_throughput.py --no-datatrove       # llmkit only
    pip install -e ".[bench]" torch==2.13.0                   # datatrove (+ spacy, xxhash, orjson)

The corpus is synthetic but made of real text: documents are 10-16 random sentences from the SQuAD paragraphs
and Alpaca answers in ../shared/data (plus a few short and repetitive ones for the filters), and 10% of them
are planted near-duplicates of an earlier document with 1-3 word edits. Every tool reads the same two JSONL
files and runs with the same number of worker processes, each in its own subprocess so peak memory (RSS of
the process tree, sampled every 50 ms) is its own.

Dedup metrics: recall = planted pairs of which at least one document was removed; false-positive rate =
documents with no planted relative that were removed. datatrove runs its 4-stage MinHash pipeline with
5-grams and 8 buckets x 16 hashes (FineWeb's setting for this comparison); llmkit runs `llmkit data dedup`
with its defaults (5-word shingles, 128 permutations, threshold 0.8, exact dedup on). Gopher filters:
datatrove GopherRepetitionFilter + GopherQualityFilter against `llmkit data filter` with the same rules.
Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
if not DATA.exists():
    DATA = ROOT / "shared" / "data"

# ----------------------------------------------------------------------------- corpus


def sentence_pool() -> list[str]:
    texts = [json.loads(l)["text"] for l in open(DATA / "squad_rag_corpus.jsonl")]
    for l in open(DATA / "alpaca_2k.jsonl"):
        r = json.loads(l)
        texts += [r["output"], r["instruction"]]
    pool = []
    for t in texts:
        for s in re.split(r"(?<=[.!?])\s+", t.replace("\n", " ")):
            if 5 <= len(s.split()) <= 60:
                pool.append(s.strip())
    return sorted(set(pool))


def edit(words: list[str], k: int, rng: random.Random) -> list[str]:
    w = list(words)
    for _ in range(k):
        i = rng.randrange(len(w))
        op = rng.random()
        if op < 0.4:
            w[i] = rng.choice(["quickly", "house", "seven", "river", "green", "moreover"])
        elif op < 0.7 and len(w) > 10:
            del w[i]
        else:
            w.insert(i, rng.choice(["very", "also", "then", "still", "indeed"]))
    return w


def make_corpus(n_docs: int, out_dir: Path, seed: int = 0, dup_frac: float = 0.1):
    """Two JSONL files with `n_docs` documents in all; returns (files, planted pairs, singleton ids)."""
    rng = random.Random(seed)
    pool = sentence_pool()
    n_dup = int(n_docs * dup_frac)
    n_distinct = n_docs - n_dup
    docs = []
    for i in range(n_distinct):
        r = rng.random()
        if r < 0.03:  # short: fails the word-count rule
            text = " ".join(rng.sample(pool, 2))
        elif r < 0.05:  # repetitive: fails the repetition rules
            lines = rng.sample(pool, 4)
            text = "\n".join(lines + lines + lines[:2])
        else:
            text = " ".join(rng.sample(pool, rng.randint(10, 16)))
        docs.append((float(i), f"d{i}", text))
    pairs = []
    for k in range(n_dup):
        o = rng.randrange(n_distinct)
        words = docs[o][2].split()
        copy = " ".join(edit(words, rng.randint(1, 3), rng))
        pos = o + rng.uniform(0.5, n_distinct - o)
        docs.append((pos, f"c{k}", copy))
        pairs.append((f"d{o}", f"c{k}"))
    docs.sort(key=lambda d: d[0])
    related = {a for a, _ in pairs} | {b for _, b in pairs}
    singletons = [d[1] for d in docs if d[1] not in related]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "part-0.jsonl", out_dir / "part-1.jsonl"]
    half = len(docs) // 2
    for f, part in zip(files, (docs[:half], docs[half:])):
        with open(f, "w") as fh:
            for _, id_, text in part:
                fh.write(json.dumps({"id": id_, "text": text}) + "\n")
    texts = {id_: text for _, id_, text in docs}
    return [str(f) for f in files], pairs, singletons, texts


def dedup_quality(kept: set[str], pairs, singletons, texts) -> dict:
    from llmkit.data.dedup import normalize_text

    def shingles(t):
        w = normalize_text(t).split()
        return {" ".join(w[i:i + 5]) for i in range(len(w) - 4)}

    found = [not (a in kept and b in kept) for a, b in pairs]
    sims = []
    for a, b in pairs[:3000]:
        sa, sb = shingles(texts[a]), shingles(texts[b])
        sims.append(len(sa & sb) / max(len(sa | sb), 1))
    high = [f for f, s in zip(found, sims) if s >= 0.9]
    fp = sum(1 for s in singletons if s not in kept)
    return {"planted_pairs": len(pairs), "recall": round(sum(found) / max(len(pairs), 1), 4),
            "recall_jaccard_ge_0.9": round(sum(high) / max(len(high), 1), 4),
            "planted_jaccard_median": round(sorted(sims)[len(sims) // 2], 3) if sims else None,
            "false_positive_rate": round(fp / max(len(singletons), 1), 5), "false_positives": fp,
            "documents_kept": len(kept)}


# ----------------------------------------------------------------------------- measuring subprocesses


def _tree_rss(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/statm") as f:
                rss[int(d)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            children.setdefault(ppid, []).append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


def measure(cmd: list[str], cwd: str | None = None) -> dict:
    """Run a command; wall seconds and peak RSS of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1), "stdout": out}


def llmkit_step(step: str, files: list[str], out: Path, workers: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "llmkit", "data", step, "--input", *files, "--output", str(out),
           "--workers", str(workers), "--quiet", *extra]
    m = measure(cmd, cwd=str(ROOT))
    report = json.loads(Path(str(out) + ".report.json").read_text())
    return {"seconds": m["seconds"], "peak_rss_mb": m["peak_rss_mb"], "documents_in": report["documents_in"],
            "documents_out": report["documents_out"], "docs_per_s": round(report["documents_in"] / m["seconds"], 1),
            "mb_per_s": round(report["bytes_in"] / 1e6 / m["seconds"], 2),
            "mb_per_s_excluding_startup": report["mb_per_s"]}


# ----------------------------------------------------------------------------- datatrove (run in a subprocess)


def datatrove_dedup(input_dir: str, work: str, workers: int) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, \
        MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    config = MinhashConfig(n_grams=5, num_buckets=8, hashes_per_bucket=16, hash_config=HashConfig(precision=64))
    logs = f"{work}/logs"
    s1 = LocalPipelineExecutor([JsonlReader(input_dir), MinhashDedupSignature(f"{work}/sigs", config=config)],
                               tasks=2, workers=workers, logging_dir=f"{logs}/1")
    s2 = LocalPipelineExecutor([MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=config)],
                               tasks=config.num_buckets, workers=workers, logging_dir=f"{logs}/2", depends=s1)
    s3 = LocalPipelineExecutor([MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=config)],
                               tasks=1, workers=1, logging_dir=f"{logs}/3", depends=s2)
    s4 = LocalPipelineExecutor([JsonlReader(input_dir), MinhashDedupFilter(f"{work}/remove"),
                                JsonlWriter(f"{work}/out", compression=None)],
                               tasks=2, workers=workers, logging_dir=f"{logs}/4", depends=s3)
    s4.run()


def datatrove_gopher(input_dir: str, work: str, workers: int) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    LocalPipelineExecutor([JsonlReader(input_dir), GopherRepetitionFilter(), GopherQualityFilter(),
                           JsonlWriter(f"{work}/out", compression=None)],
                          tasks=2, workers=workers, logging_dir=f"{work}/logs").run()


def read_ids(folder: Path) -> set[str]:
    ids = set()
    for f in folder.glob("*.jsonl"):
        for line in open(f):
            ids.add(json.loads(line)["id"])
    return ids


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-datatrove", action="store_true")
    ap.add_argument("--work-dir", type=str, default=None)
    ap.add_argument("--datatrove-run", nargs=4, metavar=("WHAT", "INPUT", "WORK", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.datatrove_run:
        what, inp, work, w = args.datatrove_run
        (datatrove_dedup if what == "dedup" else datatrove_gopher)(inp, work, int(w))
        return
    sys.path.insert(0, str(ROOT))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="llmkit-bench-"))
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    t = time.perf_counter()
    files, pairs, singletons, texts = make_corpus(args.docs, work / "corpus")
    size = sum(os.path.getsize(f) for f in files)
    log(f"corpus: {args.docs} documents, {size / 1e6:.1f} MB, {len(pairs)} planted pairs ({time.perf_counter() - t:.1f} s)")
    result: dict = {"corpus": {"documents": args.docs, "mb": round(size / 1e6, 2), "planted_pairs": len(pairs),
                               "workers": args.workers, "cpus": os.cpu_count()}, "llmkit": {}}
    squad_q = str(DATA / "squad_rag_questions.jsonl")
    steps = {
        "clean": [],
        "filter": ["--skip-rules", "lorem_ipsum"],  # the Gopher quality + repetition rules, as datatrove runs them
        "dedup": [],
        "pii": [],
        "decontaminate": ["--eval", squad_q, "--eval-field", "question", "answers"],
    }
    for step, extra in steps.items():
        out = work / "llmkit" / f"{step}.jsonl"
        r = llmkit_step(step, files, out, args.workers, extra)
        if step == "dedup":
            kept = {json.loads(l)["id"] for l in open(out)}
            r.update(dedup_quality(kept, pairs, singletons, texts))
        result["llmkit"][step] = r
        log(f"llmkit {step}: {json.dumps(r)}")
    if not args.no_datatrove:
        try:
            import datatrove  # noqa: F401
        except ImportError:
            result["datatrove"] = "not installed (pip install datatrove spacy xxhash orjson torch==2.13.0)"
        else:
            result["datatrove"] = {}
            for what in ("dedup", "gopher"):
                wdir = work / f"datatrove-{what}"
                m = measure([sys.executable, __file__, "--datatrove-run", what, str(work / "corpus"), str(wdir),
                             str(args.workers)])
                kept = read_ids(wdir / "out")
                r = {"seconds": m["seconds"], "peak_rss_mb": m["peak_rss_mb"],
                     "docs_per_s": round(args.docs / m["seconds"], 1), "mb_per_s": round(size / 1e6 / m["seconds"], 2),
                     "documents_out": len(kept)}
                if what == "dedup":
                    r.update(dedup_quality(kept, pairs, singletons, texts))
                result["datatrove"][what] = r
                log(f"datatrove {what}: {json.dumps(r)}")
            ll, dt = result["llmkit"], result["datatrove"]
            result["ratios"] = {
                "dedup_docs_per_s_llmkit_over_datatrove": round(ll["dedup"]["docs_per_s"] / dt["dedup"]["docs_per_s"], 2),
                "dedup_peak_memory_llmkit_over_datatrove": round(ll["dedup"]["peak_rss_mb"] / dt["dedup"]["peak_rss_mb"], 2),
                "gopher_docs_per_s_llmkit_over_datatrove": round(ll["filter"]["docs_per_s"] / dt["gopher"]["docs_per_s"], 2),
            }
            result["goal_met"] = {
                "dedup_2x_faster": result["ratios"]["dedup_docs_per_s_llmkit_over_datatrove"] >= 2,
                "dedup_recall_ge_0.95": ll["dedup"]["recall"] >= 0.95,
                "dedup_fp_le_0.01": ll["dedup"]["false_positive_rate"] <= 0.01,
                "filters_at_least_as_fast": result["ratios"]["gopher_docs_per_s_llmkit_over_datatrove"] >= 1,
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
