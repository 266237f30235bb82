"""Parallelism beyond data parallel, on PyTorch's own engine: tensor + sequence (DTensor), pipeline
(torch.distributed.pipelining), context (ring attention) and FSDP2/HSDP, composed on one DeviceMesh.

layout.py   degrees, validation, the named mesh (pp, dp_replicate, dp_shard, cp, tp)
tensor.py   the Megatron-style tensor/sequence-parallel plan
pipeline.py stage split (full-model parameter names), schedules
context.py  ring attention (CUDA only)
engine.py   composition and the step functions
trainer.py  the pretraining loop on top (`llmkit pretrain --tp/--pp/...` under torchrun)
"""
