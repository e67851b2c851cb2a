"""Training-step time of task-gated LoRA experts against plain LoRA of the same rank, in one process.

Compares: plain PEFT LoRA rank r; our stacked moe_lora, cgc_lora and lora_experts (share A or B)
at the same rank budget r with E experts; mtl_lora with E up-projections of rank r / E (so they
hold the parameters of the LoRA's B, as lora_experts' do); and a reference "loop over experts"
layer (one small LoRA module per expert, each applied in turn, as MOELoRA's public code does).
A step is forward + backward + AdamW on a fixed batch of random token ids with a mixed-task batch.
Prints the median ms/step and the ratio to plain LoRA.

    python bench/experts.py --quick                               # tiny random Llama (hidden 512, 4 layers)
    python bench/experts.py --model smollm2-135m-instruct --quick --experts 1 16 --batch 4   # the real model
    python bench/experts.py --methods lora_experts_A lora_experts_B mtl_lora --experts 2 4 8  # some of them

Every variant holds its own copy of the model and the allocator keeps each one's peak: on a 24 GiB
machine the real model runs 9 variants at batch 4 (`--experts 1 16 --batch 4`), not all 19.

cgc_lora runs with 4 tasks in one cluster, E common experts and 1 specific expert per task
(E + 4 experts in all), so its default rank budget is 32: every expert needs rank >= 1.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from multitune.methods.experts import apply_experts, split_rank
from multitune.methods.shared_factor import apply_shared_factor
from multitune.methods.task_context import require_task_context, rows_for, task_context

# PEFT's get_peft_model reads transformers' deprecated `is_gradient_checkpointing`
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

N_TASKS = 4
EXPERTS = (1, 2, 4, 8, 16)
EXPERT_METHODS = ("moe_lora", "cgc_lora", "lora_experts_A", "lora_experts_B", "mtl_lora", "loop")


def tiny_llama() -> nn.Module:
    """A random Llama big enough for the adapter matmuls to show (about 25M parameters)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    return AutoModelForCausalLM.from_config(config)


class LoopExpertsLinear(nn.Module):
    """The reference: E separate LoRA pairs, a per-layer gate on a shared task embedding, and a
    Python loop over the experts (E matmul pairs per layer)."""

    def __init__(self, base: nn.Linear, n_experts: int, rank: int, alpha: float, embedding: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        ranks = split_rank(rank, n_experts)
        self.lora_A = nn.ModuleList(nn.Linear(base.in_features, r, bias=False) for r in ranks)
        self.lora_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for r in ranks)
        for a, b in zip(self.lora_A, self.lora_B, strict=True):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        self.gate = nn.Linear(embedding.embedding_dim, n_experts, bias=False)
        self._embedding = [embedding]  # a list: registered once, on the model
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = rows_for(require_task_context().ids_on(x.device), x.shape[0])
        gates = F.softmax(self.gate(self._embedding[0](ids)), dim=-1)  # (B, E)
        out = self.base(x)
        for e, (a, b) in enumerate(zip(self.lora_A, self.lora_B, strict=True)):
            out = out + b(a(x)) * (gates[:, e] * self.scaling).view(-1, *([1] * (x.dim() - 1)))
        return out


def apply_loop(model: nn.Module, n_experts: int, rank: int, alpha: float) -> nn.Module:
    model.requires_grad_(False)
    embedding = nn.Embedding(N_TASKS, 64)
    model.loop_task_embedding = embedding
    decoder = model.get_decoder()
    targets = [(n, m) for n, m in decoder.named_modules() if isinstance(m, nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = decoder.get_submodule(parent_name) if parent_name else decoder
        setattr(parent, child, LoopExpertsLinear(module, n_experts, rank, alpha, embedding))
    return model


def build(base: nn.Module, method: str, experts: int, rank: int, alpha: float) -> nn.Module:
    model = copy.deepcopy(base)
    tasks = [f"task{i}" for i in range(N_TASKS)]
    common = dict(rank=rank, alpha=alpha, dropout=0.0, targets="all-linear")
    if method == "lora":
        lora = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        return get_peft_model(model, lora)
    if method == "moe_lora":
        return apply_experts(model, "moe_lora", tasks, None, say=None, experts=experts, **common)
    if method == "cgc_lora":
        return apply_experts(model, "cgc_lora", tasks, None, say=None, common_experts=experts, task_experts=1, **common)
    if method in ("lora_experts_A", "lora_experts_B"):  # the experts split the rank budget
        share = method[-1]
        return apply_shared_factor(model, "lora_experts", tasks, say=None, share=share, experts=experts, **common)
    if method == "mtl_lora":  # r = rank / n: the n stacked B_i hold the parameters of LoRA r=rank's B
        common["rank"] = rank // experts
        return apply_shared_factor(model, "mtl_lora", tasks, say=None, up_projections=experts, **common)
    if method == "loop":
        return apply_loop(model, experts, rank, alpha)
    if method.startswith("adapter_"):  # bottleneck adapters (reduction factor 16), for comparison
        from multitune.methods.adapter import apply_adapter

        return apply_adapter(model, say=None, style=method.removeprefix("adapter_"))
    raise ValueError(method)


class Runner:
    """One variant's model, optimizer and fixed batch; `step()` times one training step in ms."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, tasks: torch.Tensor) -> None:
        self.model = model.to(ids.device).train()
        self.ids, self.tasks = ids, tasks
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.times: list[float] = []

    def _sync(self) -> None:
        if self.ids.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, record: bool = True) -> None:
        self._sync()
        start = time.perf_counter()
        with task_context(self.tasks):  # open around forward and backward
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        if record:
            self.times.append((time.perf_counter() - start) * 1000)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random Llama) or a model name for load_base_model")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=64.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--experts", type=int, nargs="+", default=list(EXPERTS))
    parser.add_argument(
        "--methods", nargs="+", default=list(EXPERT_METHODS), choices=EXPERT_METHODS, help="expert methods to time"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup, repeats = (1, 3) if args.quick else (2, 10)

    if args.model == "tiny":
        base = tiny_llama()
    else:
        from multitune.models.base import load_base_model

        base = load_base_model(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.length), generator=gen).to(device)
    tasks = (torch.arange(args.batch) % N_TASKS).to(device)  # a mixed-task batch

    n_params = sum(p.numel() for p in base.parameters()) / 1e6
    print(f"model {args.model} ({n_params:.1f}M), {device}, {torch.get_num_threads()} threads")
    print(f"batch {args.batch} x {args.length} tokens, rank {args.rank}, median of {repeats} steps after {warmup}")
    print("the variants take turns step by step, so a change in machine load hits them all alike")
    variants = [("lora", 0), ("adapter_pfeiffer", 0), ("adapter_houlsby", 0)]
    variants += [(m, e) for m in args.methods for e in args.experts]
    runners = [Runner(build(base, method, experts, args.rank, args.alpha), ids, tasks) for method, experts in variants]
    for _ in range(warmup):
        for runner in runners:
            runner.step(record=False)
    for i in range(repeats):
        for runner in runners[i % len(runners) :] + runners[: i % len(runners)]:  # rotate the order
            runner.step()

    lora_ms = statistics.median(runners[0].times)
    print()
    print(f"| method | experts | ms/step | vs LoRA r={args.rank} |")
    print("|---|---:|---:|---:|")
    for (method, experts), runner in zip(variants, runners, strict=True):
        ms = statistics.median(runner.times)
        total = experts + N_TASKS if method == "cgc_lora" else experts
        label = {
            "lora": "plain LoRA",
            "loop": "loop over experts (reference)",
            "adapter_pfeiffer": "bottleneck adapter, pfeiffer (r=16 reduction)",
            "adapter_houlsby": "bottleneck adapter, houlsby (r=16 reduction)",
            "lora_experts_A": "lora_experts, share A (HydraLoRA)",
            "lora_experts_B": "lora_experts, share B",
            "mtl_lora": f"mtl_lora, r = {args.rank} / n",
        }.get(method, method)
        print(f"| {label} | {total if total else '-'} | {ms:.1f} | {ms / lora_ms:.2f} |")


if __name__ == "__main__":
    main()
