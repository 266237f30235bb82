"""Medusa (Cai et al. 2024): extra decoding heads propose a token tree, one forward pass verifies it.

    llmkit medusa train --model base/ --data text.txt --out runs/medusa          # Medusa-1: the base stays frozen
    llmkit medusa generate --model base/ --heads runs/medusa --prompt "ROMEO:"

    heads = load_heads("runs/medusa", model)
    out = medusa_generate(model, heads, [prompt_ids], GenerationConfig(max_new_tokens=128))
    out.tokens, out.stats.mean_accepted

Head k (k = 0..K-1) reads the base model's last hidden state at position t and predicts token t+k+2 (the
base lm_head predicts t+1): a residual block (x + SiLU(W x), W zero-initialised) then a vocabulary
projection initialised from lm_head, so an untrained head starts as the base's own next-token guess.

A decoding step: the root is the base's next token (argmax, or a sample); head k's top-k tokens fill depth
k+1 of a sparse candidate tree (paths of top-k ranks, chosen best-first from the heads' measured top-k
accuracies). The tree's N tokens go through the base in one forward pass over the KV cache, each seeing the
committed tokens and its own ancestors only (tree attention mask), at position cur + depth. A node is right
when the base, at its parent, would have produced it: exactly its argmax (greedy: output identical to plain
greedy decoding) or, sampling, with probability above min(epsilon, delta * exp(-entropy)) (typical
acceptance). The longest right path is kept; its nodes' keys/values are copied into consecutive cache slots,
and its last node's logits and hidden state give the next root and the next heads' guesses.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.data.sft import SFTExample
from llmkit.infer.fast import compiled_decoder
from llmkit.infer.generate import GenerationConfig
from llmkit.infer.medusa_commands import MedusaTrainConfig
from llmkit.infer.sampling import make_generator, sample
from llmkit.model import Transformer, alibi_slopes
from llmkit.train.finetune import FineTuner
from llmkit.train.objectives import IGNORE
from llmkit.train.trainer import TrainError

HEADS_FILE = "medusa_heads.safetensors"
CONFIG_FILE = "medusa_config.json"


class MedusaError(ValueError):
    """Heads, tree or options that cannot be used with this model."""


# ----------------------------------------------------------------------------- heads


class ResBlock(nn.Module):
    """x + SiLU(W x); W starts at zero so the block starts as the identity."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.linear(x))


@dataclass
class HeadsConfig:
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    base_model: str = ""  # the base checkpoint the heads were trained on (informative)
    base_config_hash: str = ""  # sha256 of the base's llmkit config: a different base is warned about
    lm_head_checksum: float = 0.0  # mean |lm_head| over its first rows: the same shape but other weights
    topk_accuracy: list[list[float]] = field(default_factory=list)  # [head][r]: target within top-(r+1), validation

    @classmethod
    def from_file(cls, path: Path) -> "HeadsConfig":
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MedusaError(f"{path}: cannot read the Medusa heads config ({e})") from None
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("num_heads", "num_layers", "hidden_size", "vocab_size") if k not in raw]
        if missing:
            raise MedusaError(f"{path}: field {missing[0]!r} is missing")
        return cls(**{k: v for k, v in raw.items() if k in known})


class MedusaHeads(nn.Module):
    """K heads over the base's last hidden states: `heads(hidden [..., C])` -> logits [K, ..., V]."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        C, V = config.hidden_size, config.vocab_size
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResBlock(C) for _ in range(config.num_layers)], nn.Linear(C, V, bias=False))
            for _ in range(config.num_heads))

    @classmethod
    def for_model(cls, model: Transformer, num_heads: int, num_layers: int = 1, base_model: str = "") -> "MedusaHeads":
        """Fresh heads for `model`, each vocabulary projection a copy of its lm_head."""
        lm_head = getattr(model.lm_head, "weight", None)
        if lm_head is None:
            raise MedusaError("the base model's lm_head has no plain weight (quantised?): heads copy it at init")
        cfg = model.config
        heads = cls(HeadsConfig(num_heads, num_layers, cfg.d_model, cfg.vocab_size, base_model,
                                base_config_hash(model), lm_head_checksum(model)))
        with torch.no_grad():
            for head in heads.heads:
                head[-1].weight.copy_(lm_head.float())
        return heads.to(lm_head.device, lm_head.dtype)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.stack([head(hidden) for head in self.heads])


def base_config_hash(model: Transformer) -> str:
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("name", "extra")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def lm_head_checksum(model: Transformer) -> float:
    weight = getattr(model.lm_head, "weight", None)
    return 0.0 if weight is None else float(weight[:64].detach().float().abs().mean())


def check_heads(heads_cfg: HeadsConfig, model: Transformer, where: str, warn: bool = True) -> None:
    """Refuse heads of another shape; warn about heads trained on another base of the same shape."""
    cfg = model.config
    for name, have, want in (("hidden_size", heads_cfg.hidden_size, cfg.d_model),
                             ("vocab_size", heads_cfg.vocab_size, cfg.vocab_size)):
        if have != want:
            raise MedusaError(f"{where}: field {name!r} is {have} but the base model's is {want}: these heads were "
                              f"trained for another model ({heads_cfg.base_model or 'unknown base'})")
    if cfg.architecture != "decoder":
        raise MedusaError(f"Medusa decodes with a decoder-only base; this one is {cfg.architecture!r}")
    if not warn:
        return
    same = heads_cfg.base_config_hash in ("", base_config_hash(model))
    checksum = lm_head_checksum(model)
    close = heads_cfg.lm_head_checksum == 0 or math.isclose(checksum, heads_cfg.lm_head_checksum, rel_tol=1e-2)
    if not (same and close):
        print(f"llmkit medusa: warning: {where}: the heads were trained on {heads_cfg.base_model or 'another base'} "
              "whose config or lm_head differs from this model's; decoding stays exact but fewer tokens will be "
              "accepted", file=sys.stderr)


def write_heads(heads: MedusaHeads, directory: Path) -> None:
    """The two files into `directory` (no atomicity: callers write into a temp dir)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in heads.state_dict().items()}
    save_file(state, str(directory / HEADS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(heads.config.__dict__, indent=2) + "\n")


def save_heads(heads: MedusaHeads, path: str | Path) -> Path:
    """Write medusa_heads.safetensors + medusa_config.json into `path` (created if needed), file by file atomically."""
    from llmkit.checkpoint import _move_into_place

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_heads(heads, tmp)
        _move_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_heads(path: str | Path, model: Transformer) -> MedusaHeads:
    """Heads saved by `save_heads` (or `llmkit medusa train`), checked against `model`, on its device and dtype."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise MedusaError(f"{path}: no {CONFIG_FILE}; expected the --out directory of `llmkit medusa train`")
    cfg = HeadsConfig.from_file(path / CONFIG_FILE)
    check_heads(cfg, model, str(path / CONFIG_FILE))
    heads = MedusaHeads(cfg)
    try:
        state = load_file(str(path / HEADS_FILE))
    except (OSError, ValueError) as e:
        raise MedusaError(f"{path / HEADS_FILE}: cannot read the heads ({e})") from None
    expected = heads.state_dict()
    for name, ref in expected.items():
        if name not in state or state[name].shape != ref.shape:
            got = tuple(state[name].shape) if name in state else "missing"
            raise MedusaError(f"{path / HEADS_FILE}: tensor {name!r} is {got}, expected {tuple(ref.shape)} "
                              f"from {CONFIG_FILE}")
    heads.load_state_dict(state)
    p = model.model.embed_tokens.weight
    return heads.to(p.device, p.dtype).eval()


# ----------------------------------------------------------------------------- the candidate tree


@dataclass(frozen=True)
class TokenTree:
    """A candidate tree: node 0 is the root (the base's own next token); every other node is a path of
    top-k ranks, (r1, ..., rd) meaning head 0's r1-th guess, then head 1's r2-th, ... (Medusa's "choices").

    Nodes are ordered by depth, so a parent comes before its children.
    """

    paths: tuple[tuple[int, ...], ...]  # per node; the root's is ()
    parents: Tensor  # [N] long, -1 for the root
    depths: Tensor  # [N] long, 0 for the root
    ranks: Tensor  # [N] long: the node's top-k rank at its depth (0 for the root)
    ancestors: Tensor  # [N, N] bool: j is i or an ancestor of i (the attention pattern inside the tree)
    leaf_paths: Tensor  # [P, D+1] long: node ids root..leaf of every leaf, padded with N

    @classmethod
    def from_paths(cls, paths: Sequence[tuple[int, ...]]) -> "TokenTree":
        nodes = sorted(set(tuple(p) for p in paths), key=lambda p: (len(p), p))
        for p in nodes:
            if not p or any(not isinstance(r, int) or r < 0 for r in p):
                raise MedusaError(f"tree path {list(p)} must be a non-empty list of top-k ranks >= 0")
            if len(p) > 1 and p[:-1] not in nodes:
                raise MedusaError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree")
        nodes = [(), *nodes]
        index = {p: i for i, p in enumerate(nodes)}
        parents = torch.tensor([index[p[:-1]] if p else -1 for p in nodes])
        N = len(nodes)
        ancestors = torch.eye(N, dtype=torch.bool)
        for i in range(1, N):  # parents come first, so a parent's row is complete when its child copies it
            ancestors[i] |= ancestors[parents[i]]
        is_parent = torch.zeros(N, dtype=torch.bool)
        is_parent[parents[1:]] = True
        depth = max(len(p) for p in nodes)
        leaves = [i for i in range(N) if not is_parent[i]]
        leaf_paths = torch.full((len(leaves), depth + 1), N)
        for row, leaf in enumerate(leaves):
            chain = [leaf]
            while parents[chain[-1]] >= 0:
                chain.append(int(parents[chain[-1]]))
            leaf_paths[row, : len(chain)] = torch.tensor(chain[::-1])
        return cls(tuple(nodes), parents, torch.tensor([len(p) for p in nodes]),
                   torch.tensor([p[-1] if p else 0 for p in nodes]), ancestors, leaf_paths)

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max([len(p) for p in self.paths])

    @property
    def width(self) -> int:
        """Top-k guesses taken from a head: the largest rank in the tree, plus one."""
        return max([p[-1] for p in self.paths[1:]] + [0]) + 1  # a list, not a generator: traceable by dynamo

    def to(self, device) -> "TokenTree":
        return TokenTree(self.paths, *(t.to(device) for t in (self.parents, self.depths, self.ranks, self.ancestors,
                                                               self.leaf_paths)))


def prior_accuracy(num_heads: int, topk: int = 10) -> list[list[float]]:
    """Top-k accuracies assumed for heads that were never measured: head k's top-1 right 0.6 * 0.7^k of the
    time, each further rank adding half the previous rank's share (the shape Medusa reports for trained heads)."""
    rows = []
    for k in range(num_heads):
        top1 = 0.6 * 0.7**k
        rows.append([top1 * (2 - 0.5**r) for r in range(topk)])
    return rows


def sparse_tree(topk_accuracy: Sequence[Sequence[float]], size: int = 64) -> TokenTree:
    """The `size`-node tree (root included) with the highest expected accepted length, best first.

    P(node) = prod over its depths d of P(head d's rank r_d is right), with P(rank r) = acc@(r+1) - acc@r and
    heads independent (Medusa's assumption). A child is never more likely than its parent, nor a rank than
    the rank before it, so expanding the most likely frontier node each time is optimal; its frontier
    successors are its next sibling and its first child.
    """
    if size < 1:
        raise MedusaError(f"tree size must be >= 1 (the root), got {size}")
    rank_prob = [[max(row[0], 1e-6)] + [max(b - a, 1e-6) for a, b in zip(row, row[1:])] for row in topk_accuracy]
    frontier = [(-rank_prob[0][0], (0,))]
    chosen: list[tuple[int, ...]] = []
    while frontier and len(chosen) < size - 1:
        neg_p, path = heapq.heappop(frontier)
        chosen.append(path)
        depth, rank = len(path) - 1, path[-1]
        if rank + 1 < len(rank_prob[depth]):
            sibling_p = -neg_p / rank_prob[depth][rank] * rank_prob[depth][rank + 1]
            heapq.heappush(frontier, (-sibling_p, path[:-1] + (rank + 1,)))
        if depth + 1 < len(rank_prob):
            heapq.heappush(frontier, (neg_p * rank_prob[depth + 1][0], path + (0,)))
    return TokenTree.from_paths(chosen)


def default_tree(heads: MedusaHeads, size: int = 64) -> TokenTree:
    """The best `size`-node tree for these heads' measured top-k accuracies (a prior when none were measured)."""
    accuracy = heads.config.topk_accuracy or prior_accuracy(heads.config.num_heads)
    return sparse_tree(accuracy[: heads.config.num_heads], size)


def tree_tokens(root: Tensor, head_logits: Tensor, tree: TokenTree) -> Tensor:
    """The tree's token ids [N]: root [] then, at depth d, head d-1's top-(rank+1) token. head_logits [K, V]."""
    top = head_logits.topk(tree.width, dim=-1).indices  # [K, width]
    nodes = top[tree.depths[1:] - 1, tree.ranks[1:]]
    return torch.cat([root.view(1), nodes])


def tree_attention(tree: TokenTree, cur: int | Tensor, n_keys: int, slopes: Tensor | None = None,
                   sliding_window: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(mask [1,1|H,N,n_keys], position ids [1,N]) for the tree's N tokens written at cache slots cur..cur+N-1.

    A node sees every committed slot (< cur) and its own ancestors; its position is cur + depth. With ALiBi
    slopes [H] the mask is additive float with the distance bias between positions (a tree slot's position is
    not its slot number); otherwise bool (True = may attend). Slots past the tree stay masked (a static cache).
    Built from comparisons only, so `cur` may be a 0-d tensor and the shapes never depend on it (one graph).
    """
    N = tree.size
    keys = torch.arange(n_keys, device=tree.depths.device)
    rel = keys - cur  # a key's node number when it is a tree slot
    in_tree = (rel >= 0) & (rel < N)
    node = rel.clamp(0, N - 1)
    allowed = (rel < 0)[None, :] | (tree.ancestors[:, node] & in_tree[None, :])  # [N, S]
    positions = cur + tree.depths  # [N]
    key_positions = torch.where(in_tree, cur + tree.depths[node], keys)
    distance = positions[:, None] - key_positions[None, :]  # [N, S]
    if sliding_window is not None:
        allowed &= distance < sliding_window
    if slopes is None:
        return allowed[None, None], positions[None]
    bias = -slopes.to(keys.device).view(1, -1, 1, 1) * distance.abs().float()[None, None]
    return torch.where(allowed[None, None], bias, float("-inf")).to(dtype), positions[None]


# ----------------------------------------------------------------------------- acceptance


def greedy_accept(parent_logits: Tensor, tokens: Tensor) -> Tensor:
    """Bool [...]: each token is the argmax of the logits [..., V] at its parent."""
    return parent_logits.argmax(dim=-1) == tokens


def typical_accept(parent_logits: Tensor, tokens: Tensor, temperature: float, epsilon: float = 0.09,
                   delta: float = 0.3) -> Tensor:
    """Bool [...]: p(token) > min(epsilon, delta * exp(-H(p))) under p = softmax(logits / temperature) [..., V].

    Typical acceptance (Medusa, sec. 2.3.1): a token the target finds plausible enough is kept; a flat target
    (high entropy H) lowers the bar, a peaked one raises it up to epsilon.
    """
    logp = F.log_softmax(parent_logits.float() / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    threshold = torch.clamp(delta * torch.exp(-entropy), max=epsilon)
    return logp.gather(-1, tokens[..., None]).squeeze(-1).exp() > threshold


def best_path(tree: TokenTree, node_ok: Tensor, node_logp: Tensor) -> tuple[Tensor, Tensor]:
    """(node ids [D+1], length []) of the longest root path whose nodes are all right (the root always is); among
    equally long paths the one the target finds most likely. node_ok [N] bool, node_logp [N] log p of each node's
    token. The ids past `length` repeat the last accepted node: fixed shapes, no host synchronisation."""
    pad_false = torch.cat([node_ok, node_ok.new_zeros(1)])
    pad_zero = torch.cat([node_logp, node_logp.new_zeros(1)])
    right = pad_false[tree.leaf_paths].long().cumprod(-1)  # [P, D+1]: 1 while every node so far is right
    lengths = right.sum(-1)
    score = (pad_zero[tree.leaf_paths] * right).sum(-1)
    score = torch.where(lengths == lengths.max(), score, float("-inf"))
    best = score.argmax().view(1)  # 1-element index tensors: compiled graphs take no data-dependent ints
    row, length = tree.leaf_paths.index_select(0, best)[0], lengths.index_select(0, best)
    steps = torch.arange(row.shape[0], device=row.device)
    return torch.where(steps < length, row, row.index_select(0, length - 1)), length[0]


def compact_cache(model: Transformer, path_slots: Tensor, cur: int | Tensor) -> None:
    """Copy the keys/values at slots `path_slots` [A] into slots cur, cur+1, ... in every layer."""
    dst = cur + torch.arange(path_slots.shape[0], device=path_slots.device)
    for layer in model.model.layers:
        cache = layer.self_attn.kv_cache
        # index_select copies first: a source slot may be a later destination
        cache.k.index_copy_(2, dst, cache.k.index_select(2, path_slots))
        cache.v.index_copy_(2, dst, cache.v.index_select(2, path_slots))


# ----------------------------------------------------------------------------- decoding


@dataclass
class MedusaStats:
    new_tokens: int = 0
    steps: int = 0  # tree verification passes
    forwards: int = 0  # base forward passes, prefills included
    accepted_by_depth: list[int] = field(default_factory=list)  # steps whose tree path reached depth d+1

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per verification step (the root plus the accepted head tokens)."""
        return (sum(self.accepted_by_depth) + self.steps) / max(self.steps, 1)

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.forwards, 1)

    def to_dict(self) -> dict:
        rates = [round(n / max(self.steps, 1), 4) for n in self.accepted_by_depth]
        return {"new_tokens": self.new_tokens, "steps": self.steps, "forwards": self.forwards,
                "mean_accepted": round(self.mean_accepted, 4), "tokens_per_forward": round(self.tokens_per_forward, 4),
                "acceptance_by_depth": rates}

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens in {self.forwards} forward passes ({self.tokens_per_forward:.2f} tokens/"
                f"forward, {self.mean_accepted:.2f} accepted per tree step)")


@dataclass
class MedusaOutput:
    tokens: list[list[int]]  # new tokens per prompt, up to and including the first EOS
    stats: MedusaStats


@dataclass
class _Acceptance:
    """How a step picks its root and judges tree nodes: greedy (exact) or sampling (typical acceptance)."""

    gen: GenerationConfig
    epsilon: float
    delta: float
    generator: torch.Generator | None

    def root(self, logits: Tensor) -> Tensor:
        sp = self.gen.sampling
        if sp.greedy:
            return logits.argmax(-1)
        return sample(logits.float()[None], sp, generator=self.generator)[0]

    def judge(self, tree: TokenTree, tokens: Tensor, node_logits: Tensor) -> tuple[Tensor, Tensor]:
        """(node ids [D+1], length []) of the accepted path (see best_path)."""
        parent_logits = node_logits[tree.parents[1:]]  # [N-1, V]
        child = tokens[1:]
        sp = self.gen.sampling
        if sp.greedy:
            ok = greedy_accept(parent_logits, child)
            logp = torch.zeros_like(ok, dtype=torch.float32)
        else:
            ok = typical_accept(parent_logits, child, sp.temperature, self.epsilon, self.delta)
            logp = F.log_softmax(parent_logits.float() / sp.temperature, -1).gather(-1, child[:, None])[:, 0]
        return best_path(tree, torch.cat([ok.new_ones(1), ok]), torch.cat([logp.new_zeros(1), logp]))


def check_generation(model: Transformer, heads: MedusaHeads, gen: GenerationConfig, tree: TokenTree) -> None:
    gen.validate()
    sp = gen.sampling
    unsupported = [name for name, on in (("logits_processors", bool(gen.logits_processors)),
                                         ("repetition_penalty", sp.repetition_penalty != 1.0),
                                         ("presence_penalty", bool(sp.presence_penalty)),
                                         ("frequency_penalty", bool(sp.frequency_penalty)),
                                         ("use_cache=False", not gen.use_cache)) if on]
    if unsupported:
        raise MedusaError(f"Medusa decoding does not support GenerationConfig {', '.join(unsupported)}: the tree "
                          "judges every node against the target's own distribution; use plain generate for these")
    check_heads(heads.config, model, "heads", warn=False)  # load_heads warned already
    if tree.depth > heads.config.num_heads:
        raise MedusaError(f"the tree is {tree.depth} levels deep but there are only {heads.config.num_heads} heads")


class _TreeDecoder:
    """The two halves of a decoding step for one model, heads, tree and acceptance rule.

    verify(tokens [N], cur [], n_keys) -> logits [N, V], hidden [N, C]: the tree pass over the first n_keys cache
        slots (the whole cache when compiled, so the shapes stay fixed; only the filled part when eager).
    advance(tokens, logits, hidden, cur) -> accepted tokens [D+1] (valid up to `length`), length [], next tree
        tokens [N]: judge the nodes, copy the accepted path's keys/values to slots cur.., take the next root from
        its last node's logits and the heads' guesses from its hidden state.
    Everything stays on the device with fixed shapes, so with `compiled` both halves are compiled (CUDA graphs on
    GPU; `advance` only when greedy: sampling draws from a generator) and a step synchronises with the host once.
    Compiled, the cache is the fast path's bucket (infer/fast.py: the same cache tensors every time, so a graph
    finds the buffers it was captured with), read whole with the unwritten slots masked.
    """

    def __init__(self, model: Transformer, heads: MedusaHeads, tree: TokenTree, acceptance: _Acceptance,
                 compiled: bool):
        self.model, self.heads, self.tree, self.acceptance, self.compiled = model, heads, tree, acceptance, compiled
        cfg = model.config
        self.slopes = alibi_slopes(cfg.n_head).to(tree.depths.device) if cfg.position == "alibi" else None
        self.cache_len = 0
        greedy = acceptance.gen.sampling.greedy
        self.verify = self._compile(self._verify) if compiled else self._verify
        self.advance = self._compile(self._advance) if compiled and greedy else self._advance

    def _compile(self, fn: Callable) -> Callable:
        cuda = self.model.model.embed_tokens.weight.is_cuda
        compiled = torch.compile(fn, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None)
        if not cuda:
            return compiled
        # CUDA graphs reuse their output buffers on the next replay: keep copies
        return lambda *args: tuple(t.clone() for t in compiled(*args))

    def setup_cache(self, needed: int) -> None:
        """A KV cache of at least `needed` slots (for one row)."""
        if self.compiled:
            self.cache_len = compiled_decoder(self.model).attach(1, needed)
        else:
            self.model.setup_cache(1, needed)
            self.cache_len = needed

    def first_tokens(self, logits: Tensor, hidden: Tensor) -> Tensor:
        """The first tree's tokens from the prefill's last logits [V] and hidden state [C]."""
        return tree_tokens(self.acceptance.root(logits), self.heads(hidden), self.tree)

    def keys_read(self, cur: int) -> int:
        return self.cache_len if self.compiled else cur + self.tree.size

    def _verify(self, tokens: Tensor, cur: Tensor, n_keys: int) -> tuple[Tensor, Tensor]:
        model, tree = self.model, self.tree
        mask, positions = tree_attention(tree, cur, n_keys, self.slopes, model.config.sliding_window,
                                         model.model.embed_tokens.weight.dtype)
        slots = cur + torch.arange(tree.size, device=tokens.device)
        hidden = model.model(tokens[None], position_ids=positions, slots=slots, kv_len=n_keys, attn_mask=mask)[0]
        return model.lm_head(hidden), hidden

    def _advance(self, tokens: Tensor, logits: Tensor, hidden: Tensor, cur: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        path, length = self.acceptance.judge(self.tree, tokens, logits)
        compact_cache(self.model, path + cur, cur)  # D+1 slots: those past `length` are junk the next tree overwrites
        last = path.index_select(0, (length - 1).view(1))
        return tokens[path], length, self.first_tokens(logits.index_select(0, last)[0], hidden.index_select(0, last)[0])


_decoders: weakref.WeakKeyDictionary[Transformer, dict] = weakref.WeakKeyDictionary()


def tree_decoder(model: Transformer, heads: MedusaHeads, tree: TokenTree, acceptance: _Acceptance,
                 compiled: bool) -> _TreeDecoder:
    """A `_TreeDecoder`; compiled ones are kept per model, heads, tree and rule so each compiles once."""
    if not compiled:
        return _TreeDecoder(model, heads, tree, acceptance, False)
    sp = acceptance.gen.sampling
    key = (id(heads), tree.paths, sp, acceptance.epsilon, acceptance.delta)
    kept = _decoders.setdefault(model, {})
    if key not in kept or kept[key].heads is not heads:
        kept[key] = _TreeDecoder(model, heads, tree, acceptance, True)
    kept[key].acceptance.generator = acceptance.generator  # this run's random stream
    return kept[key]


@torch.inference_mode()
def _decode_one(decoder: _TreeDecoder, prompt: Sequence[int], gen: GenerationConfig, stats: MedusaStats) -> list[int]:
    model, tree = decoder.model, decoder.tree
    cfg, device = model.config, model.model.embed_tokens.weight.device
    T0, budget = len(prompt), gen.max_new_tokens
    if cfg.position == "learned" and T0 + budget + tree.depth > cfg.max_seq_len:
        raise MedusaError(f"prompt ({T0} tokens) + max_new_tokens ({budget}) + tree depth ({tree.depth}) exceeds "
                          f"the model's context of {cfg.max_seq_len} tokens")
    decoder.setup_cache(T0 + budget + tree.size)
    eos = set(gen.eos_token_ids)
    out: list[int] = []
    try:
        ids = torch.tensor([list(prompt)], device=device)
        hidden = model.model(ids, prefix_len=T0 if cfg.mask == "prefix" else None,
                             slots=torch.arange(T0, device=device), kv_len=T0)[0, -1]
        tokens, cur = decoder.first_tokens(model.lm_head(hidden), hidden), T0
        stats.forwards += 1
        while budget - len(out) > 1:
            cur_t = torch.tensor(cur, device=device)
            logits, hidden = decoder.verify(tokens, cur_t, decoder.keys_read(cur))
            accepted, length, tokens = decoder.advance(tokens, logits, hidden, cur_t)
            *accepted, n = torch.cat([accepted, length[None]]).tolist()  # the step's one host synchronisation
            _count_step(stats, n)
            out += accepted[: _until_stop(accepted[:n], eos, budget - len(out))]
            if out[-1] in eos:
                break
            cur += n
        else:
            if len(out) < budget:  # one token left: the root needs no verification pass
                out.append(int(tokens[0]))
    finally:
        model.clear_cache()
    stats.new_tokens += len(out)
    return out


def _count_step(stats: MedusaStats, path_len: int) -> None:
    stats.steps += 1
    stats.forwards += 1
    for d in range(path_len - 1):
        stats.accepted_by_depth[d] += 1


def _until_stop(tokens: list[int], eos: set[int], room: int) -> int:
    """How many of `tokens` to keep: up to and including the first EOS, at most `room`."""
    for i, tok in enumerate(tokens[:room]):
        if tok in eos:
            return i + 1
    return min(len(tokens), room)


def medusa_generate(model: Transformer, heads: MedusaHeads, prompts: Sequence[Sequence[int]],
                    gen: GenerationConfig | None = None, tree: TokenTree | None = None, tree_size: int = 64,
                    epsilon: float = 0.09, delta: float = 0.3) -> MedusaOutput:
    """New token ids per prompt (each decoded alone: Medusa trades compute for latency at batch 1), with statistics.

    Greedy (temperature 0) output is plain greedy decoding's, token for token. Sampling draws each root from
    the target and accepts head tokens by typical acceptance with thresholds epsilon and delta.
    """
    gen = gen or GenerationConfig()
    device = model.model.embed_tokens.weight.device
    tree = (tree or default_tree(heads, tree_size)).to(device)
    check_generation(model, heads, gen, tree)
    stats = MedusaStats(accepted_by_depth=[0] * tree.depth)
    if gen.max_new_tokens == 0:
        return MedusaOutput([[] for _ in prompts], stats)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MedusaError("every prompt needs at least one token")
    acceptance = _Acceptance(gen, epsilon, delta, make_generator(gen.sampling, device))
    decoder = tree_decoder(model, heads, tree, acceptance, gen.compile)
    tokens = [_decode_one(decoder, p, gen, stats) for p in prompts]
    return MedusaOutput(tokens, stats)


def medusa_generate_text(model: Transformer, heads: MedusaHeads, tokenizer, prompt: str, gen: GenerationConfig,
                         **options) -> tuple[str, MedusaStats]:
    """The completion of one prompt (cut at EOS and the first stop string) and the decoding statistics."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out = medusa_generate(model, heads, [ids], gen, **options)
    eos = set(gen.eos_token_ids)
    text = tokenizer.decode([t for t in out.tokens[0] if t not in eos], skip_special_tokens=True)
    cuts = [text.find(s) for s in gen.stop if s and s in text]
    return (text[: min(cuts)] if cuts else text), out.stats


# ----------------------------------------------------------------------------- training


def medusa_loss(head_logits: Sequence[Tensor], labels: Tensor, decay: float, topk: int = 1,
                segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(weighted summed cross-entropy, hits [K, topk], counts [K]) of K heads' logits [B, T, V] (a list, or one
    tensor [K, B, T, V]) on shifted labels [B, T].

    labels[:, i] is token i+1, so head k's target at position i is labels[:, i + k + 1] (token i + k + 2);
    it counts only where that label is trained on and, in packed rows, lies in the same example.
    hits[k, r]: targets within head k's top-(r+1).
    """
    K, T = len(head_logits), labels.shape[1]
    total = torch.zeros((), device=labels.device)
    hits = torch.zeros(K, topk, device=labels.device)
    counts = torch.zeros(K, device=labels.device)
    for k in range(K):
        shift = k + 1
        if shift >= T:
            break
        logits, target = head_logits[k][:, : T - shift].float(), labels[:, shift:]
        if segment_ids is not None:
            same = segment_ids[:, : T - shift] == segment_ids[:, shift:]
            target = torch.where(same, target, IGNORE)
        valid = target != IGNORE
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE, reduction="sum")
        total = total + decay**k * ce
        with torch.no_grad():
            top = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices
            found = (top == target[..., None]).cumsum(-1).clamp(max=1) & valid[..., None]
            hits[k, : top.shape[-1]] = found.flatten(0, 1).sum(0).float()
            counts[k] = valid.sum()
    return total, hits, counts


class MedusaModel(nn.Module):
    """The frozen base and the heads, as the training loop sees them: `model(ids)` -> K head logits [B, T, V]."""

    def __init__(self, base: Transformer, heads: MedusaHeads):
        super().__init__()
        self.base, self.heads = base, heads
        self.config = base.config

    def train(self, mode: bool = True) -> "MedusaModel":
        super().train(mode)
        self.base.eval()  # frozen: no dropout in the features the heads learn from
        return self

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                segment_ids: Tensor | None = None) -> list[Tensor]:
        with torch.no_grad():  # Medusa-1: no gradient reaches the backbone, so none is computed through it
            hidden = self.base.model(input_ids, position_ids=position_ids, segment_ids=segment_ids)
        return [head(hidden) for head in self.heads.heads]  # a list: stacking would copy K vocabulary-wide logits


def _prompt_length(example: SFTExample, text_prompt: int) -> int:
    """Tokens of an example that prompt self-distillation: up to its first trained token (the reply of a chat),
    or, when every token is trained (plain text), the first `text_prompt`, leaving at least one."""
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    if first > 0:
        return first + 1
    return max(1, min(text_prompt, len(example) - 1))


class MedusaTrainer(FineTuner):
    """The fine-tuning loop (progress, metrics.jsonl, TensorBoard, checkpoints, exact resume) training only the
    heads, with per-head top-1 accuracy in every record and top-k accuracies on validation."""

    stage = "medusa"

    def __init__(self, cfg: MedusaTrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                 on_step: Callable[[int, dict], None] | None = None):
        cfg.validate()
        self.medusa = cfg
        self._hits = self._counts = None
        self.val_topk: list[list[float]] = []
        super().__init__(cfg.finetune_config(), out, resume, overwrite, on_step)

    def _load_model(self):
        from llmkit.checkpoint import load

        cfg = self.medusa
        base, tok = load(cfg.model)
        if base.config.architecture != "decoder":
            raise TrainError(f"{cfg.model}: Medusa heads are trained on a decoder-only base, this one is "
                             f"{base.config.architecture!r}")
        base.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        heads = MedusaHeads.for_model(base, cfg.num_heads, cfg.num_layers, str(Path(cfg.model).resolve()))
        self.task = "lm"
        self.base = base.to(self.device)  # self-distillation generates with it before the loop moves the model
        return MedusaModel(base, heads), tok

    def _load_data(self):
        batches, val = super()._load_data()
        if self.medusa.self_distill:
            batches.examples = self._self_distilled(batches.examples)
            val = self._self_distilled(val)
        return batches, val

    def _self_distilled(self, examples: list[SFTExample]) -> list[SFTExample]:
        """Each example as its prompt followed by the base's greedy continuation, the loss on the continuation:
        heads learn what the base will say, which is what decoding checks them against."""
        from llmkit.infer.generate import generate

        cfg, tok = self.medusa, self.tokenizer
        prompts = [e.input_ids[: _prompt_length(e, cfg.distill_prompt_tokens)] for e in examples]
        gen = GenerationConfig(max_new_tokens=cfg.self_distill,
                               eos_token_ids=(tok.eos_id,) if tok.eos_id is not None else ())
        pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
        out = []
        for start in range(0, len(prompts), 32):
            print(f"llmkit medusa: self-distillation: {start}/{len(prompts)} examples", file=sys.stderr)
            batch = prompts[start: start + 32]
            for prompt, reply, e in zip(batch, generate(self.base, batch, gen, pad), examples[start: start + 32]):
                ids = (prompt + reply)[: cfg.max_seq_len + 1]
                labels = [IGNORE] * (len(prompt) - 1) + ids[len(prompt):]
                out.append(SFTExample(ids[:-1], labels[: len(ids) - 1], e.where))
        return out

    def _reset_stats(self, topk: int) -> None:
        K = self.medusa.num_heads
        self._hits, self._counts = torch.zeros(K, topk), torch.zeros(K)

    def _task_loss(self, batch: dict[str, Tensor]) -> Tensor:
        labels = batch["labels"].to(self.device)
        segments = batch["segment_ids"].to(self.device) if self.cfg.pack else None
        loss, hits, counts = medusa_loss(self.logits(batch), labels, self.medusa.decay, self._hits.shape[1],
                                         segments)
        self._hits += hits.cpu()
        self._counts += counts.cpu()
        return loss

    def _accuracy(self) -> Tensor:
        return self._hits / self._counts.clamp(min=1)[:, None]  # [K, topk]

    def _train_step(self) -> dict:
        self._reset_stats(1)
        record = super()._train_step()
        record.update({f"head{k}_acc": round(float(a), 4) for k, a in enumerate(self._accuracy()[:, 0])})
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        self._reset_stats(self.medusa.eval_topk)
        out = super().evaluate()
        if out:
            accuracy = self._accuracy()
            out.update({f"val_head{k}_acc": round(float(a), 4) for k, a in enumerate(accuracy[:, 0])})
            self.val_topk = [[round(float(a), 4) for a in row] for row in accuracy]
        return out

    def _heads(self) -> MedusaHeads:
        heads = self.raw_model.heads
        heads.config.topk_accuracy = self.val_topk
        return heads

    def _write_weights(self, directory: Path) -> None:
        write_heads(self._heads(), directory)

    def _load_weights(self, path: Path) -> None:
        self.raw_model.heads.load_state_dict(load_heads(path, self.raw_model.base).state_dict())

    def save_final(self) -> Path:
        """The heads into OUT itself (medusa_heads.safetensors + medusa_config.json), beside the run's logs."""
        return save_heads(self._heads(), self.out)
