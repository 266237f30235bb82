"""Parallel layouts: tensor (TP) x pipeline (PP) x context (CP) x data (DP, ZeRO/FSDP, HSDP) parallelism.

    llmkit plan --model gpt3-175b --gpus 1024 --tp 8 --pp 16 --microbatches 192 --recompute full --gpu a100-80gb
    llmkit plan --model llama-2-7b --gpus 8 --global-batch 64 --search

For one layout: per-GPU memory of every pipeline stage, communication per step for each strategy, the pipeline
bubble, the step time and MFU; `search` ranks every layout of a cluster that fits, fastest first.

Ranks are placed TP innermost, then CP, DP-shard, DP-replicate and PP outermost (Megatron-LM's order): a group
whose GPUs lie in one node (stride x degree <= GPUs per node) talks at the intra-node bandwidth, else at the
inter-node one. Collectives cost what a ring sends per GPU (all-reduce 2(n-1)/n of the buffer, all-gather and
reduce-scatter (n-1)/n). TP, CP and PP transfers sit on the critical path of each micro-batch (no overlap
assumed); DP gradient reduction overlaps the last micro-batch's backward pass (ZeRO-3 gathers are prefetched under
the whole step's compute), only the rest is exposed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.config import ModelConfig
from llmkit.plan import (DTYPE_BYTES, GB, GIB, GPUS, OPTIMIZER_STATE_BYTES, RESERVED_GB, PlanError,
                         activation_parts, stage_layers, validate_layout)

if TYPE_CHECKING:
    from llmkit.plan import PlanConfig

RECOMPUTE = ("none", "selective", "full")
# nominal bandwidth per GPU and direction, GB/s: (within a node: NVLink or PCIe, between nodes: one NIC per GPU)
INTERCONNECT_GB_PER_S: dict[str, tuple[float, float]] = {
    "h100": (450, 50), "h200": (450, 50), "b200": (900, 50),  # NVLink 4/5; 400 Gb/s NDR InfiniBand
    "h100-pcie": (64, 50),  # PCIe 5 x16
    "a100-80gb": (300, 25), "a100-40gb": (300, 25),  # NVLink 3; 200 Gb/s HDR InfiniBand (DGX A100)
    "v100": (150, 12.5),  # NVLink 2; 100 Gb/s EDR
    "a10": (32, 12.5), "l4": (32, 12.5), "l40s": (32, 12.5), "rtx4090": (32, 12.5),  # PCIe 4 x16; 100 GbE
    "mi300x": (448, 50),  # Infinity Fabric, 7 links x 64 GB/s
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1  # data-parallel degree = dp_replicate x dp_shard
    cp: int = 1
    dp_replicate: int = 1  # HSDP: replicas of each ZeRO/FSDP shard group
    microbatches: int = 1  # m: micro-batches per step through each pipeline (gradient accumulation when pp = 1)
    micro_batch: int = 1  # b: sequences per micro-batch
    schedule: str = "1f1b"
    virtual_stages: int = 1  # interleaved 1F1B: model chunks per pipeline rank
    zero: int = 0
    recompute: str = "none"
    sequence_parallel: bool = True

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def shard_group(self) -> int:
        """GPUs that ZeRO/FSDP shards over: the DP shard ranks times the CP ranks (which hold the same weights)."""
        return self.dp_shard * self.cp

    @property
    def tp_sp(self) -> int:
        """The factor sequence parallelism divides d_model-wide activations by."""
        return self.tp if self.sequence_parallel else 1


def layout_from(pc: PlanConfig, cfg: ModelConfig, seq_len: int) -> Layout:
    """The layout the options describe, validated (one PlanError naming the numbers)."""
    inner = pc.tp * pc.pp * pc.cp
    dp = pc.dp if pc.dp is not None else max(1, pc.gpus // inner)
    if dp % pc.dp_replicate:
        raise PlanError(f"bad parallel layout: dp_replicate {pc.dp_replicate} does not divide dp {dp}")
    layout = Layout(tp=pc.tp, pp=pc.pp, dp=dp, cp=pc.cp, dp_replicate=pc.dp_replicate,
                    microbatches=pc.microbatches or pc.grad_accum, micro_batch=pc.micro_batch,
                    schedule=pc.pp_schedule, virtual_stages=pc.virtual_stages, zero=pc.zero, recompute=pc.recompute,
                    sequence_parallel=pc.sequence_parallel)
    check_layout(cfg, layout, pc.gpus, seq_len)
    return layout


def check_layout(cfg: ModelConfig, layout: Layout, world_size: int, seq_len: int) -> None:
    if layout.tp * layout.pp * layout.cp > 1:
        check_plannable(cfg)
    try:
        validate_layout(cfg, world_size, layout.tp, layout.pp, layout.dp_shard, layout.dp_replicate, layout.cp,
                        layout.microbatches, schedule=layout.schedule, virtual_stages=layout.virtual_stages,
                        seq_len=seq_len)
    except PlanError as e:
        raise PlanError(str(e).replace("the world size is", "--gpus is")) from None


def check_plannable(cfg: ModelConfig) -> None:
    """Stages and shards are counted for dense decoder-only models."""
    if cfg.architecture != "decoder":
        raise PlanError(f"tensor, pipeline and context parallel layouts are planned for decoder-only models; "
                        f"{cfg.name} is {cfg.architecture!r}")
    if cfg.n_experts:
        raise PlanError(f"tensor, pipeline and context parallel layouts are planned for dense models; {cfg.name} "
                        f"has {cfg.n_experts} experts per MoE layer (plan it data-parallel)")


# ----------------------------------------------------------------------------- pipeline


def bubble_fraction(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle share of a pipeline step: (p - 1) / (m + p - 1) (GPipe, 1F1B; Narayanan et al. 2021, section 2.2);
    interleaving v chunks per rank shrinks the bubble v-fold: (p - 1) / (v m + p - 1)."""
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


def in_flight_microbatches(schedule: str, pp: int, microbatches: int, stage: int, virtual_stages: int = 1) -> float:
    """Micro-batches whose activations a stage holds at once, in units of the whole stage's activations.

    GPipe runs every forward before any backward (m); 1F1B starts backwards after p - stage warm-up forwards
    (PipeDream-Flush; Narayanan et al. 2021); interleaved 1F1B warms up 2(p - stage - 1) + (v - 1)p chunk
    forwards plus the one in progress (Megatron-LM's schedule), each chunk 1/v of the stage.
    """
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b" or virtual_stages == 1:
        return min(microbatches, pp - stage)
    chunks = 2 * (pp - stage - 1) + (virtual_stages - 1) * pp + 1
    return min(microbatches * virtual_stages, chunks) / virtual_stages


# ----------------------------------------------------------------------------- parameters


def block_params(cfg: ModelConfig, tp: int = 1) -> int:
    """Parameters of one block on one TP rank: q/k/v and gate/up column-parallel, o and down row-parallel
    (their biases and the norms replicated; Shoeybi et al. 2019, section 3)."""
    C, F, H, K, D = cfg.d_model, cfg.d_ff, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    attn = C * H * D + 2 * C * K * D + H * D * C + (H * D + 2 * K * D if cfg.qkv_bias else 0)
    mlp = (3 if cfg.gated else 2) * C * F + ((2 * F if cfg.gated else F) if cfg.mlp_bias else 0)
    replicated = (C if cfg.attn_out_bias else 0) + (C if cfg.mlp_bias else 0) + _norm_params(cfg) * (
        1 if cfg.parallel_block and cfg.norm_placement == "pre" else 2)
    return math.ceil(attn / tp) + math.ceil(mlp / tp) + replicated


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)


def stage_params(cfg: ModelConfig, tp: int = 1, pp: int = 1) -> list[dict[str, int]]:
    """Parameters each pipeline stage holds on one TP rank (the largest shard where a size does not divide).

    The first stage holds the vocabulary-parallel embedding (and learned positions, replicated); the last the
    final norm and the column-parallel head. Tied embeddings under PP keep a copy of the embedding on the last
    stage for the head, its gradient all-reduced with the first (Megatron-LM).
    """
    if cfg.architecture != "decoder":
        raise PlanError(f"per-stage parameters are planned for decoder-only models; {cfg.name} is "
                        f"{cfg.architecture!r}")
    C, V = cfg.d_model, cfg.vocab_size
    vocab_shard = math.ceil(V / tp) * C
    stages = []
    for i, layers in enumerate(stage_layers(cfg.n_layer, pp)):
        first, last = i == 0, i == pp - 1
        part = {"layers": layers, "blocks": layers * block_params(cfg, tp),
                "embedding": vocab_shard if first else 0,
                "positions": cfg.max_seq_len * C if first and cfg.position == "learned" else 0,
                "final_norm": _norm_params(cfg) if last and cfg.norm_placement == "pre" else 0,
                "head": vocab_shard if last and not (cfg.tie_embeddings and pp == 1) else 0}
        part["total"] = part["blocks"] + part["embedding"] + part["positions"] + part["final_norm"] + part["head"]
        stages.append(part)
    return stages


# ----------------------------------------------------------------------------- activations


def korthikanti_layer_bytes(seq_len: int, batch: int, d_model: int, n_head: int, tp: int = 1,
                            sequence_parallel: bool = False, recompute: str = "none") -> float:
    """Activation bytes of one GPT block (16-bit activations, 1-byte dropout masks, 4h MLP, materialised
    softmax): Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", table 2."""
    s, b, h, a, t = seq_len, batch, d_model, n_head, tp
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh  # only the block's input is kept
    if recompute == "selective":  # the attention core (softmax, its dropout, QK^T) is recomputed
        return sbh * 34 / t if sequence_parallel else sbh * (10 + 24 / t)
    if sequence_parallel:
        return sbh * (34 / t + 5 * a * s / (h * t))
    return sbh * (10 + 24 / t + 5 * a * s / (h * t))


def rank_activation_parts(cfg: ModelConfig, layout: Layout, seq_len: int, dtype: str, attention: str,
                          formula: str = "llmkit") -> dict[str, float]:
    """One micro-batch's activation bytes on one TP x CP rank, from llmkit's op-by-op count (`activation_parts`).

    TP splits everything that scales with heads or d_ff (and the vocabulary-parallel logits); sequence
    parallelism also splits the d_model-wide norm/dropout tensors and the block inputs; CP splits the sequence.
    Selective recomputation drops the eager attention scores (flash attention never keeps them). `stored` is
    what a block keeps until its backward, `working` one block's tensors while it is recomputed.
    """
    t, ts, b, s = layout.tp, layout.tp_sp, layout.micro_batch, seq_len // layout.cp
    p = activation_parts(cfg, b, s, dtype, "flash" if layout.recompute == "selective" else attention)
    per_layer = (p["per_layer"] - p["per_layer_c_wide"]) / t + p["per_layer_c_wide"] / ts
    out = {"per_layer": per_layer, "layer_input": p["layer_input"] / ts, "shared": p["shared"],
           "head": (p["head"] - p["head_c_wide"]) / t + p["head_c_wide"] / ts, "logits": p["logits"] / t,
           "head_transient": p["head_transient"] / t,
           "layer_transient": b * s * DTYPE_BYTES[dtype] * (2 * cfg.d_ff / t + 2 * cfg.d_model / ts)}
    if formula == "korthikanti":
        out["per_layer"] = korthikanti_layer_bytes(s, b, cfg.d_model, cfg.n_head, t, layout.sequence_parallel)
        out["layer_input"] = korthikanti_layer_bytes(s, b, cfg.d_model, cfg.n_head, t, recompute="full") / ts
        stored = korthikanti_layer_bytes(s, b, cfg.d_model, cfg.n_head, t, layout.sequence_parallel,
                                         layout.recompute)
    else:
        stored = out["layer_input"] if layout.recompute == "full" else out["per_layer"]
    out["stored"] = stored
    out["working"] = out["per_layer"]
    return out


def stage_activation_bytes(act: dict[str, float], layers: int, last: bool, recompute: str,
                           in_flight: float) -> dict[str, float]:
    """Peak activations of a stage: `in_flight` micro-batches' stored tensors plus the transient peak of one
    backward (the head's logits and loss gradients on the last stage; one block's gradients, or its recomputed
    tensors, elsewhere). `stored` is one micro-batch's saved tensors."""
    stored = layers * act["stored"] + act["shared"]
    if last:
        head = act["head"] + act["head_transient"]
        transient = head if recompute != "full" else max(
            head, act["working"] + act["logits"] + act["layer_transient"])
    else:
        transient = act["layer_transient"] + (act["working"] if recompute == "full" else 0)
    return {"stored_per_microbatch": stored, "transient": transient, "peak": in_flight * stored + transient}


# ----------------------------------------------------------------------------- memory


def model_state_bytes(params: int, layout: Layout, pc: PlanConfig) -> tuple[float, float, float, float]:
    """Weights, gradients, optimizer states on the GPU and bytes offloaded to the host, for `params` of one
    rank: mixed precision keeps 16-bit weights and gradients plus fp32 master weights with the optimizer
    (ZeRO paper); ZeRO-1/2/3 divide optimizer / + gradients / + weights over the shard group."""
    mixed = pc.dtype != "fp32"
    n = layout.shard_group
    weights = (2 if mixed else 4) * params / (n if layout.zero >= 3 else 1)
    grads = (2 if mixed else 4) * params / (n if layout.zero >= 2 else 1)
    optimizer = ((4 if mixed else 0) + OPTIMIZER_STATE_BYTES[pc.optimizer]) * params / (n if layout.zero >= 1 else 1)
    offloaded = 0.0
    if pc.offload != "none":  # ZeRO-Offload: optimizer states in host memory; ZeRO-Infinity: the weights too
        offloaded, optimizer = optimizer, 0.0
    if pc.offload == "optimizer+params":
        offloaded, weights = offloaded + weights, 0.0
    return weights, grads, optimizer, offloaded


def stage_memory(cfg: ModelConfig, pc: PlanConfig, layout: Layout, seq_len: int) -> list[dict[str, Any]]:
    """Bytes per GPU of every pipeline stage (in GB): weights, gradients, optimizer states (ZeRO over the
    shard group, optimizer offload to CPU), activations with the schedule's in-flight micro-batches."""
    act = rank_activation_parts(cfg, layout, seq_len, pc.dtype, pc.attention, pc.activation_formula)
    # DDP buckets / FSDP gradient shards live through the whole step
    buffers = layout.shard_group * layout.dp_replicate > 1
    out = []
    for i, part in enumerate(stage_params(cfg, layout.tp, layout.pp)):
        weights, grads, optimizer, offloaded = model_state_bytes(part["total"], layout, pc)
        last = i == layout.pp - 1
        k = in_flight_microbatches(layout.schedule, layout.pp, layout.microbatches, i, layout.virtual_stages)
        a = stage_activation_bytes(act, part["layers"], last, layout.recompute, k)
        if buffers or k < layout.microbatches:  # later micro-batches go in flight while gradients exist
            dynamic = a["peak"] + grads
        elif layout.recompute == "full" and layout.pp == 1:  # one micro-batch: see plan.peak_step_bytes
            dynamic = max(a["stored_per_microbatch"] + act["head"] + act["head_transient"], a["peak"] + grads)
        else:  # gradients appear during the first backward, which frees its micro-batch as they grow
            dynamic = max(a["peak"], a["peak"] - a["stored_per_microbatch"] + grads)
        out.append({"stage": i, "layers": part["layers"], "params": part["total"], "in_flight_microbatches": k,
                    "weights": weights / GB, "gradients": grads / GB, "optimizer": optimizer / GB,
                    "activations": a["peak"] / GB, "total": (weights + optimizer + dynamic) / GB,
                    "cpu_offload": offloaded / GB})
    return out


# ----------------------------------------------------------------------------- communication and time


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    intra_gb_per_s: float
    inter_gb_per_s: float
    peak_flops: float  # per GPU, FLOP/s
    rate_flops: float  # what the compute kernels achieve, FLOP/s
    usable_gb: float

    def bandwidth(self, stride: int, degree: int) -> float:
        """Bytes/s per GPU for a group of `degree` ranks `stride` apart."""
        return (self.intra_gb_per_s if self.in_node(stride, degree) else self.inter_gb_per_s) * 1e9

    def in_node(self, stride: int, degree: int) -> bool:
        return stride * degree <= self.gpus_per_node


def cluster_from(pc: PlanConfig) -> Cluster:
    gpu = GPUS[pc.gpu]
    intra, inter = INTERCONNECT_GB_PER_S[pc.gpu]
    peak = (pc.peak_tflops or (gpu.peak_tflops if pc.dtype != "fp32" else gpu.peak_tflops_fp32)) * 1e12
    capacity = pc.gpu_memory_gb * GB if pc.gpu_memory_gb else gpu.memory_gib * GIB
    return Cluster(pc.gpus_per_node, pc.intra_node_bandwidth or intra, pc.inter_node_bandwidth or inter, peak,
                   pc.tflops * 1e12 if pc.tflops else peak * pc.mfu, capacity / GB - RESERVED_GB)


def _ring(n: int, nbytes: float, kind: str) -> float:
    """Bytes each GPU sends in a ring collective over n GPUs (NCCL's algorithm bandwidth model)."""
    return (2 if kind == "all-reduce" else 1) * (n - 1) / n * nbytes if n > 1 else 0.0


def microbatch_comm_bytes(cfg: ModelConfig, layout: Layout, seq_len: int, dtype: str, layers: int,
                          first: bool, last: bool) -> dict[str, float]:
    """Bytes one GPU of a stage sends per micro-batch for TP, CP and PP."""
    a, t, c, b = DTYPE_BYTES[dtype], layout.tp, layout.cp, layout.micro_batch
    x = b * (seq_len // c) * cfg.d_model * a  # one b x s x h activation of this CP rank
    # Megatron TP: 2 all-reduces forward (attention and MLP outputs), 2 backward, 2 more when the forward is
    # recomputed (sequence parallelism swaps each for an all-gather + reduce-scatter of the same volume); plus
    # the vocabulary-parallel embedding's forward and the head input's backward
    per_layer = 4 + (2 if layout.recompute == "full" else 0)
    tp = _ring(t, x, "all-reduce") * (layers * per_layer + first + last)
    # ring attention: K and V go round the CP ring (c - 1 hops) forward; backward K, V and their gradients
    kv = 2 * b * (seq_len // c) * cfg.n_kv_head * cfg.head_dim * a / t
    passes = 3 + (1 if layout.recompute == "full" else 0)
    cp = layers * passes * (c - 1) * kv
    # PP: activations forward to the next stage, their gradients back (split over TP with SP); interleaving
    # sends across every chunk boundary
    sends = (2 * layout.virtual_stages) if layout.virtual_stages > 1 else (not last) + (not first)
    pp = sends * x / layout.tp_sp if layout.pp > 1 else 0.0
    return {"tp": tp, "cp": cp, "pp": pp}


def step_dp_bytes(cfg: ModelConfig, layout: Layout, stage_params_total: int, dtype: str,
                  tied_copy: bool) -> dict[str, float]:
    """Bytes one GPU sends per step for gradient reduction: over the shard group (all-reduce without ZeRO;
    reduce-scatter of gradients + all-gather of weights with ZeRO-1/2; ZeRO-3/FSDP re-gathers weights for each
    micro-batch's forward and backward) and across HSDP replicas (all-reduce of the shard)."""
    g = DTYPE_BYTES[dtype] * stage_params_total
    n, r, m = layout.shard_group, layout.dp_replicate, layout.microbatches
    if layout.zero == 0:
        shard, replica = _ring(n * r, g, "all-reduce"), 0.0
    else:
        gathers = 2 * m if layout.zero >= 3 else 1
        shard = _ring(n, g, "reduce-scatter") + gathers * _ring(n, g, "all-gather")
        replica = _ring(r, g / n, "all-reduce")
    # tied embeddings under PP: the first and last stages all-reduce the embedding's gradient
    embed = DTYPE_BYTES[dtype] * math.ceil(cfg.vocab_size / layout.tp) * cfg.d_model if tied_copy else 0.0
    return {"shard": shard, "replica": replica, "tied_embedding": embed}


def groups(layout: Layout) -> dict[str, tuple[int, int]]:
    """(stride, degree) of each communication group under the rank order TP, CP, DP-shard, DP-replicate, PP."""
    t, c = layout.tp, layout.cp
    return {"tp": (1, t), "cp": (t, c), "dp": (t, layout.shard_group),
            "dp_replicate": (t * layout.shard_group, layout.dp_replicate), "pp": (t * c * layout.dp, layout.pp)}


def stage_times(cfg: ModelConfig, pc: PlanConfig, layout: Layout, seq_len: int,
                cluster: Cluster) -> list[dict[str, Any]]:
    """Per stage: compute and TP/CP/PP communication seconds of one micro-batch, DP seconds per step and the
    part of them the backward pass does not hide."""
    bw = {k: cluster.bandwidth(*g) for k, g in groups(layout).items()}
    t, c, p = layout.tp, layout.cp, layout.pp
    recompute_factor = 4 / 3 if layout.recompute == "full" else 1.0  # one more forward pass
    out = []
    for i, part in enumerate(stage_params(cfg, t, p)):
        first, last = i == 0, i == p - 1
        head = cfg.vocab_size * cfg.d_model if last else 0  # the head multiplies, the embedding looks up
        matmul = part["layers"] * block_params(cfg) + part["final_norm"] + head
        compute = 6 * matmul * layout.micro_batch * seq_len * recompute_factor / (t * c) / cluster.rate_flops
        comm = microbatch_comm_bytes(cfg, layout, seq_len, pc.dtype, part["layers"], first, last)
        comm_s = {k: comm[k] / bw[k] for k in comm}
        dp = step_dp_bytes(cfg, layout, part["total"], pc.dtype, cfg.tie_embeddings and p > 1 and (first or last))
        dp_s = dp["shard"] / bw["dp"] + dp["replica"] / bw["dp_replicate"] + dp["tied_embedding"] / bw["pp"]
        # DP reduction hides under the last micro-batch's backward (2/3 of its compute, 3/4 with recomputation);
        # ZeRO-3 gathers are prefetched under every micro-batch
        window = compute * (layout.microbatches if layout.zero >= 3 else
                            3 / 4 if layout.recompute == "full" else 2 / 3)
        out.append({"matmul_params": matmul, "compute_s": compute, "comm_bytes": comm, "comm_s": comm_s,
                    "dp_bytes": sum(dp.values()), "dp_exposed_s": max(0.0, dp_s - window),
                    "microbatch_s": compute + sum(comm_s.values())})
    return out


def layout_plan(cfg: ModelConfig, pc: PlanConfig, layout: Layout, seq_len: int,
                cluster: Cluster | None = None) -> dict[str, Any]:
    """Memory per stage, communication per strategy, bubble, step time and MFU of one layout.

    Step = (m + (p - 1)/v) x the slowest stage's micro-batch time (compute + TP/CP/PP transfers) + exposed DP.
    MFU counts 6 FLOPs per multiplying parameter per token (no recomputation; Chowdhery et al. 2022, app. B,
    without the attention-score term, as 6ND).
    """
    cluster = cluster or cluster_from(pc)
    memory = stage_memory(cfg, pc, layout, seq_len)
    stages = stage_times(cfg, pc, layout, seq_len, cluster)
    p, v, m = layout.pp, layout.virtual_stages, layout.microbatches
    slow = max(range(p), key=lambda i: stages[i]["microbatch_s"])
    s = stages[slow]
    bubble = (p - 1) / v * s["microbatch_s"]
    dp_exposed = max(x["dp_exposed_s"] for x in stages)
    step = m * s["microbatch_s"] + bubble + dp_exposed
    tokens = layout.micro_batch * m * layout.dp * seq_len
    model_flops = 6 * sum(x["matmul_params"] for x in stages) * tokens
    hardware_flops = model_flops * (4 / 3 if layout.recompute == "full" else 1.0)
    worst = max(memory, key=lambda x: x["total"])
    volume = {k: m * max(x["comm_bytes"][k] for x in stages) / GB for k in ("tp", "cp", "pp")}
    volume["dp"] = max(x["dp_bytes"] for x in stages) / GB
    return {
        "layout": {**dataclasses.asdict(layout), "dp_shard": layout.dp_shard, "world": layout.world},
        "bubble_fraction": bubble_fraction(p, m, v),
        "memory_gb": {"stages": memory, "max_stage": worst["stage"], "max_total": worst["total"],
                      "usable": cluster.usable_gb, "fits": worst["total"] <= cluster.usable_gb},
        "communication_gb_per_gpu_per_step": volume,
        "interconnect": {k: {"degree": d, "in_node": cluster.in_node(stride, d),
                             "gb_per_s": cluster.bandwidth(stride, d) / 1e9}
                         for k, (stride, d) in groups(layout).items()},
        "time_s": {"step": step, "compute": m * s["compute_s"], "bubble": bubble,
                   **{f"{k}_exposed": m * s["comm_s"][k] for k in ("tp", "cp", "pp")}, "dp_exposed": dp_exposed,
                   "slowest_stage": slow},
        "tokens_per_step": tokens,
        "model_flops_per_step": model_flops,
        "mfu": model_flops / (step * layout.world * cluster.peak_flops),
        "achieved_tflops_per_gpu": hardware_flops / (step * layout.world) / 1e12,
        "kernel_tflops_per_gpu": cluster.rate_flops / 1e12,
    }


# ----------------------------------------------------------------------------- search


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: ModelConfig, pc: PlanConfig, global_batch: int) -> list[Layout]:
    """Every layout of `pc.gpus` GPUs at `global_batch` sequences per step: TP within a node dividing the
    heads, PP dividing the layers, DP the rest; micro-batch sizes (powers of two) and micro-batch counts that
    make the global batch; ZeRO stages 0-3 (0 alone without a shard group) and each recomputation mode that
    changes memory."""
    # with flash attention llmkit keeps no attention scores, so selective recomputation equals none
    distinct = pc.attention == "eager" or pc.activation_formula == "korthikanti"
    recompute_modes = RECOMPUTE if distinct else ("none", "full")
    out = []
    for tp in _divisors(min(pc.gpus_per_node, pc.gpus)):
        if cfg.n_head % tp or cfg.n_kv_head % tp:
            continue
        for pp in _divisors(cfg.n_layer):
            if pc.gpus % (tp * pp * pc.cp) or pp * pc.virtual_stages > cfg.n_layer:
                continue
            dp = pc.gpus // (tp * pp * pc.cp)
            if global_batch % dp or dp % pc.dp_replicate:
                continue
            b = 1
            while b <= global_batch // dp:
                m = global_batch // (dp * b)
                if (global_batch // dp) % b == 0 and (pp == 1 or pc.pp_schedule == "gpipe" or m >= pp):
                    for zero in (range(4) if (dp // pc.dp_replicate) * pc.cp > 1 else (0,)):
                        for recompute in recompute_modes:
                            out.append(Layout(tp, pp, dp, pc.cp, pc.dp_replicate, m, b, pc.pp_schedule,
                                              pc.virtual_stages, zero, recompute, pc.sequence_parallel))
                b *= 2
    return out


def search(cfg: ModelConfig, pc: PlanConfig, seq_len: int, global_batch: int) -> dict[str, Any]:
    """The layouts that fit GPU memory, fastest step first (equal global batch, so fastest per token)."""
    cluster = cluster_from(pc)
    candidates = candidate_layouts(cfg, pc, global_batch)
    fitting = []
    for layout in candidates:
        result = layout_plan(cfg, pc, layout, seq_len, cluster)
        if result["memory_gb"]["fits"]:
            fitting.append(result)
    fitting.sort(key=lambda r: (r["time_s"]["step"], r["memory_gb"]["max_total"]))
    return {"model": cfg.name, "gpus": pc.gpus, "gpu": pc.gpu, "gpus_per_node": pc.gpus_per_node,
            "global_batch": global_batch, "seq_len": seq_len, "evaluated": len(candidates),
            "fitting": len(fitting), "layouts": [_summary(r) for r in fitting[:pc.top]]}


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("tp", "pp", "dp", "cp", "dp_replicate", "micro_batch", "microbatches", "schedule", "virtual_stages",
            "zero", "recompute")
    return {**{k: r["layout"][k] for k in keys}, "step_s": r["time_s"]["step"], "mfu": r["mfu"],
            "bubble_fraction": r["bubble_fraction"], "memory_gb": r["memory_gb"]["max_total"],
            "communication_gb": r["communication_gb_per_gpu_per_step"]}


# ----------------------------------------------------------------------------- report


def format_layout(r: dict[str, Any]) -> str:
    lay, mem, t, comm = r["layout"], r["memory_gb"], r["time_s"], r["communication_gb_per_gpu_per_step"]
    p, m = lay["pp"], lay["microbatches"]
    lines = [f"layout: tp {lay['tp']} x pp {p} x cp {lay['cp']} x dp {lay['dp']}"
             + (f" ({lay['dp_replicate']} replicas x {lay['dp_shard']} shards)" if lay["dp_replicate"] > 1 else "")
             + f" = {lay['world']} GPUs; ZeRO-{lay['zero']}, recompute {lay['recompute']}"
             + (", sequence parallel" if lay["sequence_parallel"] and lay["tp"] > 1 else "")]
    if p > 1:
        v = lay["virtual_stages"]
        lines.append(f"pipeline: {lay['schedule']}" + (f" ({v} chunks per rank)" if v > 1 else "")
                     + f", {m} micro-batches of {lay['micro_batch']}; bubble (p-1)/({'v*' if v > 1 else ''}m+p-1)"
                     f" = {r['bubble_fraction']:.1%}")
    lines.append("memory per GPU (GB)      layers  in-flight  weights  grads  optimizer  activations    total")
    for row in _stage_rows(mem["stages"]):
        if row is None:
            lines.append("  ...")
            continue
        lines.append(f"  {'stage ' + str(row['stage']):<22} {row['layers']:>6} {row['in_flight_microbatches']:>10.3g} "
                     f"{row['weights']:>8.2f} {row['gradients']:>6.2f} {row['optimizer']:>10.2f} "
                     f"{row['activations']:>12.2f} {row['total']:>8.2f}")
    lines.append(f"  {'FITS' if mem['fits'] else 'DOES NOT FIT'}: largest stage {mem['max_total']:.2f} GB of "
                 f"{mem['usable']:.1f} usable")
    lines.append("communication per GPU per step: " + ", ".join(
        f"{k.upper()} {comm[k]:.3g} GB ({'intra' if r['interconnect'][k]['in_node'] else 'inter'}-node "
        f"{r['interconnect'][k]['gb_per_s']:g} GB/s)" for k in ("tp", "cp", "pp", "dp") if comm[k] > 0) or "none")
    lines.append(f"step: {t['step']:.3g} s = compute {t['compute']:.3g} + bubble {t['bubble']:.3g} + exposed TP "
                 f"{t['tp_exposed']:.3g} / CP {t['cp_exposed']:.3g} / PP {t['pp_exposed']:.3g} / DP "
                 f"{t['dp_exposed']:.3g} s (slowest stage {t['slowest_stage']}; kernels at "
                 f"{r['kernel_tflops_per_gpu']:.0f} TFLOP/s)")
    lines.append(f"  {r['tokens_per_step']} tokens per step, MFU {r['mfu']:.1%}, "
                 f"{r['achieved_tflops_per_gpu']:.0f} TFLOP/s per GPU achieved (recomputation counted)")
    if "train_days" in r:
        lines.append(f"  training time with bubble and communication: {r['train_days']:.1f} days "
                     f"({r['train_steps']} steps)")
    return "\n".join(lines)


def _stage_rows(stages: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """All stages, or the first two and last two of a deep pipeline (None marks the gap)."""
    return stages if len(stages) <= 6 else stages[:2] + [None] + stages[-2:]


def format_search(r: dict[str, Any]) -> str:
    lines = [f"{r['model']} on {r['gpus']} x {r['gpu']} ({r['gpus_per_node']} per node), global batch "
             f"{r['global_batch']} x {r['seq_len']} tokens: {r['fitting']} of {r['evaluated']} layouts fit"]
    if not r["layouts"]:
        return lines[0] + "\n  none fits: more GPUs, a larger GPU or a smaller global batch"
    lines.append("  #  tp  pp  dp  cp    b    m  zero  recompute   step s    MFU  bubble  GB/GPU")
    for i, x in enumerate(r["layouts"], 1):
        lines.append(f"{i:>3} {x['tp']:>3} {x['pp']:>3} {x['dp']:>3} {x['cp']:>3} {x['micro_batch']:>4} "
                     f"{x['microbatches']:>4} {x['zero']:>5}  {x['recompute']:<9} {x['step_s']:>8.3g} "
                     f"{x['mfu']:>6.1%} {x['bubble_fraction']:>7.1%} {x['memory_gb']:>7.2f}")
    return "\n".join(lines)


def plan_search(pc: PlanConfig) -> dict[str, Any]:
    """`llmkit plan --search`: the model from `pc.model`, the global batch from `pc.global_batch` or the
    layout the options give (micro-batch x micro-batches x dp)."""
    from llmkit.plan import load_model_config

    pc.validate()
    if pc.model is None:
        raise PlanError("--search needs --model (layouts come from the architecture)")
    cfg = load_model_config(pc.model)
    check_plannable(cfg)
    seq_len = pc.seq_len or cfg.max_seq_len
    dp = pc.dp or max(1, pc.gpus // (pc.tp * pc.pp * pc.cp))
    global_batch = pc.global_batch or pc.micro_batch * (pc.microbatches or pc.grad_accum) * dp
    return search(cfg, pc, seq_len, global_batch)
