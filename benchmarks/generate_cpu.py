"""CPU decode speed: llmkit `generate` against transformers `generate` on the same weights.

    python benchmarks/generate_cpu.py                      # both shapes, 7 repeats, 128 new tokens
    python benchmarks/generate_cpu.py --shapes tiny --repeats 9 --new-tokens 64

Batch 1, a 32-token prompt, greedy decoding, fp32, torch's default thread count. llmkit runs
its fast path (`GenerationConfig(compile=True)`: a compiled static-cache decode step, see
llmkit/infer/fast.py; compiled during the warm-up), the same fast path on an int8 weight-only copy
(`quantize_model(model, "int8", skip=())`: every linear layer, lm_head included, per-channel int8,
a quarter of the fp32 weight bytes a token must read), and, for reference, the eager path. Each shape's
llmkit model is built with a fixed seed, saved with `llmkit.save`, and loaded back by
`transformers.AutoModelForCausalLM.from_pretrained` with transformers' default attention
implementation (printed to stderr; "sdpa" in transformers 5) and its default DynamicCache.
Both are warmed up, then timed alternately (and the bound with them, for small); the median of
the repeats counts. tokens/s is new tokens / wall time of one whole `generate` call (prefill
included, as a user sees it). The machine's load moves all of these: compare runs, not single
repeats.

Shapes:
  tiny  4 layers, width 128, vocab 512 (~1M parameters): fits in cache, per-token overhead dominates.
  small 6 layers, width 384, FFN 1024, vocab 8192 (~17M parameters): bound by streaming the fp32
        weights from memory. Its `bound_tok_s` is measured in the same run: the rate of a bare
        Python loop doing one `W @ x` per linear layer and the lm_head, i.e. one full read of the
        weights a decode step must touch, with no attention, norms or framework in between.

Goals (issue): tiny ratio >= 2; small fraction_of_bound >= 0.9 and ratio >= 1.2. The int8 rows
(`int8_ratio`, `int8_fraction_of_bound`, against the same hf run and the same fp32 bound) may pass
the fp32 bound, since they read fewer bytes; their greedy tokens may differ from fp32's and are
not part of `tokens_match`.
Progress goes to stderr; stdout holds one JSON object only.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time

import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.quantize import quantize_model
from llmkit.model import Transformer

PROMPT_LEN = 32
SEED = 0
SHAPES = {
    # d_ff 384 keeps the tiny model at ~1.0M parameters (the swiglu default of 512 gives 1.2M)
    "tiny": dict(vocab_size=512, n_layer=4, n_head=4, d_model=128, d_ff=384),
    "small": dict(vocab_size=8192, n_layer=6, n_head=6, d_model=384, d_ff=1024),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_models(shape: str, new_tokens: int, workdir: str):
    # ModelConfig's defaults are Llama's (RMSNorm, SwiGLU, RoPE, untied head), so it saves as "llama"
    cfg = ModelConfig(name=f"bench-{shape}", max_seq_len=max(256, PROMPT_LEN + new_tokens), **SHAPES[shape])
    torch.manual_seed(SEED)
    model = Transformer(cfg).eval()
    path = llmkit.save(model, None, f"{workdir}/{shape}")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep stderr to our own progress lines
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    log(f"[{shape}] {model.num_params() / 1e6:.2f}M parameters; transformers {transformers.__version__}, "
        f"attn_implementation={hf.config._attn_implementation!r}")
    return model, hf


def llmkit_run(model: Transformer, prompt: list[int], new_tokens: int, compile: bool = True) -> list[int]:
    return generate(model, [prompt], GenerationConfig(max_new_tokens=new_tokens, compile=compile))[0]


@torch.inference_mode()
def hf_run(hf, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    # min_new_tokens and eos_token_id=None: both sides produce exactly new_tokens tokens
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matvec_pass(model: Transformer):
    """A function doing one fp32 `W @ x` per linear layer and the lm_head: a decode step's weight reads, bare."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {n: torch.randn(n) for n in {w.shape[1] for w in weights}}

    @torch.inference_mode()
    def one_pass():
        for w in weights:
            w @ xs[w.shape[1]]

    return one_pass


def bench_shape(shape: str, repeats: int, new_tokens: int, workdir: str) -> dict:
    model, hf = build_models(shape, new_tokens, workdir)
    g = torch.Generator().manual_seed(SEED + 1)
    prompt = torch.randint(1, model.config.vocab_size, (PROMPT_LEN,), generator=g).tolist()
    int8 = quantize_model(copy.deepcopy(model), "int8", skip=())
    runners = {  # name -> one whole generation; "llmkit" is the fast (compiled) path
        "llmkit": lambda: llmkit_run(model, prompt, new_tokens),
        "llmkit_eager": lambda: llmkit_run(model, prompt, new_tokens, compile=False),
        "hf": lambda: hf_run(hf, prompt, new_tokens),
        "llmkit_int8": lambda: llmkit_run(int8, prompt, new_tokens),
    }
    outputs = {name: run() for name, run in runners.items()}  # warm-up (compiles), and the tokens to compare
    match = len({tuple(o) for name, o in outputs.items() if name != "llmkit_int8"}) == 1
    if not match:
        log(f"[{shape}] WARNING: greedy tokens differ between {list(outputs)}")

    with_bound = shape == "small"
    if with_bound:
        one_pass = matvec_pass(model)
        for _ in range(5):
            one_pass()
        passes = 50  # ~0.3 s of matvecs for the small shape
        runners["bound"] = lambda: [one_pass() for _ in range(passes)]
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(repeats):  # interleaved, so that drift in machine load hits all of them alike
        for name, run in runners.items():
            times[name].append(timed(run))
        log(f"[{shape}] repeat {r + 1}/{repeats}: " + ", ".join(
            f"{name} {(passes if name == 'bound' else new_tokens) / t[-1]:.1f} tok/s" for name, t in times.items()))
    rate = {name: (passes if name == "bound" else new_tokens) / statistics.median(t) for name, t in times.items()}
    result = {"llmkit_tok_s": round(rate["llmkit"], 1), "llmkit_eager_tok_s": round(rate["llmkit_eager"], 1),
              "hf_tok_s": round(rate["hf"], 1), "ratio": round(rate["llmkit"] / rate["hf"], 3), "tokens_match": match,
              "llmkit_int8_tok_s": round(rate["llmkit_int8"], 1), "int8_ratio": round(rate["llmkit_int8"] / rate["hf"], 3)}
    if with_bound:
        result.update(bound_tok_s=round(rate["bound"], 1), fraction_of_bound=round(rate["llmkit"] / rate["bound"], 3),
                      int8_fraction_of_bound=round(rate["llmkit_int8"] / rate["bound"], 3))
    log(f"[{shape}] {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,small", help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per side; the median counts")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    if args.repeats < 1 or args.new_tokens < 1:
        parser.error("--repeats and --new-tokens must be >= 1")

    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as workdir:
        results = {s: bench_shape(s, args.repeats, args.new_tokens, workdir) for s in shapes}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
