"""Speed options ("variants") of the model benchmark: the '+'-joined token grammar, the default sets per
device, and why a device cannot run one.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass

import torch

TOKENS = ("fp32", "math", "channels_last", "bf16", "fused", "compile", "cuda_graph", "cudnn_benchmark")
ALIASES = {"cl": "channels_last", "sdpa": "fp32", "fused_adamw": "fused", "graph": "cuda_graph"}

GPU_TRAIN = (
    "fp32,math,channels_last,bf16,fused,cudnn_benchmark,compile,"
    "bf16+channels_last+fused+cudnn_benchmark,bf16+channels_last+fused+cudnn_benchmark+compile"
)
GPU_SAMPLE = (
    "fp32,math,channels_last,bf16,cudnn_benchmark,cuda_graph,compile,"
    "bf16+channels_last+cudnn_benchmark+cuda_graph,bf16+channels_last+cudnn_benchmark+compile"
)
CPU_TRAIN = "fp32,math,channels_last,bf16,fused,compile,channels_last+compile"
CPU_SAMPLE = "fp32,math,channels_last,bf16,cuda_graph,compile"


@dataclass(frozen=True)
class Variant:
    name: str
    flags: frozenset[str]

    def __getattr__(self, token: str) -> bool:  # v.bf16, v.channels_last, ...
        if token in TOKENS:
            return token in self.flags
        raise AttributeError(token)


def parse_variant(spec: str) -> Variant:
    flags = set()
    for raw in spec.strip().split("+"):
        tok = ALIASES.get(raw.strip(), raw.strip())
        if tok not in TOKENS:
            raise argparse.ArgumentTypeError(f"unknown variant token {raw!r} in {spec!r}; known: {', '.join(TOKENS)}")
        if tok != "fp32":
            flags.add(tok)
    return Variant(spec.strip(), frozenset(flags))


def parse_variants(specs: str) -> list[Variant]:
    vs = [parse_variant(s) for s in specs.split(",") if s.strip()]
    if not any(not v.flags for v in vs):
        vs.insert(0, parse_variant("fp32"))  # the baseline is always measured
    base = next(v for v in vs if not v.flags)
    return [base] + [v for v in vs if v is not base]


def why_skipped(v: Variant, section: str, device: torch.device, args: argparse.Namespace) -> str | None:
    cuda = device.type == "cuda"
    if v.bf16 and not cuda:
        return "bf16 autocast runs ~300x slower on a CPU without native bf16 matmul (0.2 GFLOP/s here): GPU only"
    if v.fused and not cuda:
        return "TrainState uses fused AdamW only on CUDA" if section == "train" else "fused AdamW is a training option"
    if v.fused and section == "sample":
        return "fused AdamW is a training option"
    if v.cuda_graph and section == "train":
        return "training takes CUDA graphs through compile mode 'reduce-overhead' (--compile-mode)"
    if v.cuda_graph and not cuda:
        return "CUDA graphs need a CUDA device"
    if v.cuda_graph and v.compile:
        return "cuda_graph and compile do not combine (compile mode 'reduce-overhead' is the compiled CUDA-graph path)"
    if v.cudnn_benchmark and not cuda:
        return "cudnn.benchmark is a CUDA setting"
    if v.compile and args.no_compile:
        return "--no-compile"
    if v.compile and not cuda and not args.compile:
        return "torch.compile on CPU takes 1-4 min to compile and is not faster here (docs); --compile forces it"
    mode = args.compile_mode if section == "train" else args.sample_compile_mode
    if v.compile and not cuda and mode in ("reduce-overhead", "max-autotune"):
        return f"compile mode {mode!r} adds CUDA graphs: GPU only"
    return None


@contextmanager
def cudnn_benchmark(on: bool):
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old
