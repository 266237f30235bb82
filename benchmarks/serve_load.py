"""Load test of `llmkit serve`: N concurrent streaming chat clients against a server this script starts.

    python benchmarks/serve_load.py                                   # CPU: tiny model, 64 concurrent streams
    python benchmarks/serve_load.py --concurrency 1,8,64 --baseline   # + transformers' generate per request
    python benchmarks/serve_load.py --device cuda                     # tinyllama-1.1b shape, bf16, 1/8/64

The server runs in a subprocess (`python -m llmkit serve`, loopback only) on a random-weight model saved to a
temporary directory: the "tiny" preset (64 wide, 2 layers, a 512-token byte-level BPE vocabulary trained on
tinyshakespeare) on CPU, the tinyllama-1.1b shape in bf16 with --device cuda (--preset picks another shape).
For each concurrency C, --requests requests (at least C) go out from C client tasks (httpx, asyncio), each a
streamed chat completion of --max-tokens tokens (temperature 0; usage from stream_options.include_usage).
A concurrency level stops at --time-limit seconds; requests not finished by then count as errors.

Prints one JSON object: per concurrency, requests/s, generated tokens/s, time to first token and latency
(p50/p99, ms) and the error count. With --baseline (default with --device cuda), the same requests through
transformers' `generate` called once per request, as a plain server would: one request at a time on the model
(a lock), C client threads, in-process (no HTTP, which flatters it); its time to first token is its latency,
as `generate` returns the whole reply at once. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.tokenizer import CHAT_TEMPLATES, Tokenizer, train_tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
PROMPTS = ["Good morrow, what news?", "Speak of the king.", "Where is Romeo?", "What light through yonder window?"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_checkpoint(preset: str, workdir: Path) -> tuple[Path, dict]:
    corpus = workdir / "corpus.txt"
    corpus.write_text(CORPUS.read_text()[:200_000])
    tok = train_tokenizer([corpus], "byte-bpe", 512, chat_template=CHAT_TEMPLATES["chatml"])
    torch.manual_seed(0)
    if preset == "tiny":
        cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512)
    else:  # the preset's own vocabulary (32000 for tinyllama): ids the tokenizer lacks decode to nothing
        cfg = ModelConfig.from_preset(preset, max_seq_len=1024)
    model = Transformer(cfg)
    path = workdir / cfg.name
    llmkit.save(model, tok, path)
    return path, {"model": cfg.name, "params_m": round(model.num_params() / 1e6, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llmkit", "serve", "--model", str(path), "--host", "127.0.0.1", "--port", str(port),
           "--device", args.device, "--model-name", "bench", "--max-batch-size", str(max(args.concurrency)),
           "--max-waiting", str(4 * max(args.concurrency) + 64), "--log-level", "warning",
           "--prefix-caching" if args.prefix_caching else "--no-prefix-caching"]
    server = subprocess.Popen(cmd, stderr=sys.stderr, env={**os.environ, "LLMKIT_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start in 300 s")


# ----------------------------------------------------------------------------- HTTP load


async def one_stream(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """One streamed chat completion: start, first-content and end times, generated tokens."""
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": tokens}


async def http_load(url: str, concurrency: int, n_requests: int, max_tokens: int, time_limit: float) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results, errors = [], []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            try:
                results.append(await one_stream(http, PROMPTS[i % len(PROMPTS)], max_tokens))
            except Exception as e:  # counted, and the first few shown: the load goes on
                errors.append(repr(e))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=time_limit) as http:
        start = time.perf_counter()
        tasks = [asyncio.create_task(client(http)) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        for task in pending:
            task.cancel()
        elapsed = time.perf_counter() - start
    unfinished = n_requests - len(results) - len(errors)
    return summarise(results, len(errors) + unfinished, elapsed, errors[:3])


# ----------------------------------------------------------------------------- transformers baseline


def load_hf(path: Path, device: str):
    import transformers

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def hf_load(hf, tok: Tokenizer, device: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    """transformers' generate once per request, one at a time on the model, from `concurrency` threads."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
               for p in PROMPTS]
    lock = threading.Lock()  # a plain server runs one generate at a time on its model

    def request(i: int) -> dict:
        ids = torch.tensor([prompts[i % len(prompts)]], device=device)
        start = time.perf_counter()
        with lock, torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        end = time.perf_counter()
        return {"ttft": end - start, "latency": end - start, "tokens": out.shape[1] - ids.shape[1]}

    request(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(request, range(n_requests)))
    return summarise(results, 0, time.perf_counter() - start, [])


# ----------------------------------------------------------------------------- report


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarise(results: list[dict], errors: int, elapsed: float, samples: list[str]) -> dict:
    ms = lambda key, q: round(1000 * percentile([r[key] for r in results], q), 1)  # noqa: E731
    out = {"requests": len(results) + errors, "errors": errors, "seconds": round(elapsed, 2),
           "requests_per_s": round(len(results) / elapsed, 2),
           "tokens_per_s": round(sum(r["tokens"] for r in results) / elapsed, 1),
           "mean_tokens": round(statistics.mean(r["tokens"] for r in results), 1) if results else 0,
           "ttft_p50_ms": ms("ttft", 50), "ttft_p99_ms": ms("ttft", 99),
           "latency_p50_ms": ms("latency", 50), "latency_p99_ms": ms("latency", 99)}
    if samples:
        out["error_samples"] = samples
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the tinyllama-1.1b shape")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated client counts (default: 64 on CPU, 1,8,64 on CUDA)")
    parser.add_argument("--requests", type=int, default=None, help="requests per concurrency (default: 2 x C)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds a concurrency level may take")
    parser.add_argument("--baseline", action="store_true", help="also transformers' generate per request")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="start the server with --no-prefix-caching (every prompt computed in full)")
    parser.add_argument("--preset", default=None, help="model shape (default: tiny on CPU, tinyllama-1.1b on CUDA)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("CUDA is not available here: run without --device cuda for the CPU figures")
    args.concurrency = args.concurrency or ([1, 8, 64] if cuda else [64])
    args.preset = args.preset or ("tinyllama-1.1b" if cuda else "tiny")
    result: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as workdir:
        path, info = build_checkpoint(args.preset, Path(workdir))
        result.update(info)
        log(f"{info['model']}: {info['params_m']}M parameters; starting the server")
        server, url = start_server(path, args)
        try:
            asyncio.run(http_load(url, 1, 2, args.max_tokens, args.time_limit))  # warm-up
            result["llmkit_serve"] = {}
            for c in args.concurrency:
                n = max(args.requests or 2 * c, c)
                log(f"[serve] {c} concurrent streams, {n} requests")
                figures = asyncio.run(http_load(url, c, n, args.max_tokens, args.time_limit))
                result["llmkit_serve"][f"concurrency_{c}"] = figures
                log(f"[serve] {c}: {json.dumps(figures)}")
        finally:
            server.terminate()
            server.wait(timeout=30)
        if args.baseline or cuda:
            hf, tok = load_hf(path, args.device), Tokenizer.load(path)
            result["transformers_generate"] = {}
            for c in args.concurrency:
                n = max(args.requests or 2 * c, c)
                log(f"[transformers] {c} concurrent requests, {n} requests")
                figures = hf_load(hf, tok, args.device, c, n, args.max_tokens)
                result["transformers_generate"][f"concurrency_{c}"] = figures
                log(f"[transformers] {c}: {json.dumps(figures)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
