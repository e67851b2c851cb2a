"""Training throughput: multitune against the Trainer + PEFT LoRA loop a user would otherwise write.

On the bundled SmolLM2-135M-Instruct and a fixed mixture of real tasks from the full data sets
(`--data DIR`: short classification rows next to long QA and summarisation rows), every arm trains on the same rows
(the first `steps x batch` draws of the uniform task mixture) with the same LoRA (rank, alpha,
targets, dropout), batch size, max length, AdamW learning rate and schedule:

- `hf-trainer`: `transformers.Trainer` + `peft.get_peft_model` + `DataCollatorForSeq2Seq`
  (pads every batch to its longest row, full logits, the model's own loss);
- `multitune`: `multitune.training.loop.train` as `multitune train` runs it (rows packed into
  sequences of up to `train.pack_length`, by default 2048 tokens on a CPU, LM head only at target
  positions, `WordDropout`);
- `multitune-padded`: the same with `train.packing=false` (left padding, LM head at targets), to
  show what packing contributes; `multitune-ckpt`: packing + gradient checkpointing;
  `multitune-compile`: packing + `train.compile` (each round's time includes its compilation:
  dynamo traces every new model; inductor's kernels come from its cache after the warm-up).

Arms alternate round by round in one process after a warm-up round; the table shows medians.
The process runs with multitune's thread and allocator settings (`multitune.runtime.use_cores`)
from the start, so every arm, the baseline included, gets them.
Measured per arm: examples/s, target tokens/s, real (non-pad) tokens/s, padding fraction, peak
RSS of one round of the arm in a fresh process, and achieved GFLOP/s of useful work as a share of
this machine's fp32 matmul peak measured just before each run (the median over rounds). Useful
work per row of n tokens with t target tokens: 4 N n (frozen base: forward 2N, input gradients
2N; N = decoder weights) + 6 M n (the LoRA matrices, M weights: forward, input and weight
gradients) + 6 L d n^2 (causal attention, forward and backward) + 4 d V t (LM head where a loss
exists); the same rows cost the same useful FLOPs in every arm, so the GFLOP/s ratio is the
speed ratio.

    python bench/throughput.py --data DIR --quick     # hf-trainer and multitune only (8 minutes on a 2-core CPU)
    python bench/throughput.py --data DIR             # the README's table
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from multitune.files import write_atomic


def tasks(data: str, limit: int) -> list[dict]:
    def spec(name, kind, prompt, target, **extra):
        return {
            "name": name,
            "kind": kind,
            "data": {"train": str(Path(data) / name / "train.jsonl")},
            "prompt": prompt,
            "target": target,
            "max_train_examples": limit,
            **extra,
        }

    return [
        spec(
            "sst2",
            "classification",
            "Review: {{ text }}\nIs the sentiment of this review positive or negative?",
            "{{ label }}",
            labels=["negative", "positive"],
        ),
        spec(
            "rte",
            "classification",
            "Premise: {{ premise }}\nHypothesis: {{ hypothesis }}\nDoes the premise entail the hypothesis?",
            "{{ label }}",
            labels=["entailment", "not_entailment"],
        ),
        spec("squad", "extractive_qa", "{{ context }}\nQuestion: {{ question }}", "{{ answer }}"),
        spec("scitldr", "generation", "{{ document }}\nSummarize in one sentence.", "{{ summary }}"),
    ]


def run_config(args, name: str, **train) -> dict:
    return {
        "model": args.model,
        "method": {"name": "lora", "rank": args.rank, "alpha": 2 * args.rank, "dropout": 0.05},
        "tasks": tasks(args.data, args.rows_per_task),
        "mixing": {"strategy": "uniform"},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "lr": 2e-4,
            "max_length": args.max_length,
            "warmup_ratio": 0.0,
            "log_every": 1000,
            "seed": 0,
            "mixed_precision": "bf16" if torch.cuda.is_available() else "no",
            **train,
        },
        "eval": {"zero_shot": False},
        "output": str(Path(args.tmp) / name),
    }


def drawn_rows(args):
    """The rows `multitune train` draws for this config, encoded: the baseline trains on the same."""
    from multitune import rundir
    from multitune.config import validate_config
    from multitune.data.mixing import TaskMixture
    from multitune.models.base import load_tokenizer

    cfg = validate_config(run_config(args, "rows"))
    examples = rundir.load_examples(cfg, "train")
    tokenizer = load_tokenizer(cfg.model)
    encoder = rundir.make_encoder(cfg, tokenizer)
    mixture = TaskMixture({t: len(r) for t, r in examples.items()}, "uniform", seed=cfg.train.seed)
    pairs = [p for _ in range(args.steps) for p in mixture.next_batch(args.batch)]
    return [encoder.encode(examples[t][i]) for t, i in pairs], tokenizer


def _peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def matmul_peak_gflops() -> float:
    """Best of a few 2048^3 fp32 matmuls (bf16 on a GPU): this machine's matmul peak, measured now."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    a, b = torch.randn(2048, 2048, device=dev, dtype=dtype), torch.randn(2048, 2048, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(8):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4 if dev == "cpu" else 50):
            a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / (4 if dev == "cpu" else 50))
    return 2 * 2048**3 / best / 1e9


def useful_flops(rows, config, rank: int) -> float:
    d, n_layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter = config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    body = n_layers * (2 * d * d + 2 * d * kv + 3 * d * inter)
    # LoRA on all seven linears: A (rank x d_in) and B (d_out x rank) each; q, o: d -> d; k, v:
    # d -> kv; gate, up: d -> inter; down: inter -> d (SmolLM2-135M: the 4,884,480 trainable weights)
    lora = n_layers * rank * (2 * (d + d) + 2 * (d + kv) + 3 * (d + inter))
    total = 0.0
    for r in rows:
        n, t = len(r.input_ids), sum(x != -100 for x in r.labels)
        total += (4 * body + 6 * lora) * n + 6 * n_layers * d * n * n + 4 * d * vocab * t
    return total


def hf_trainer_arm(args, rows, tokenizer) -> dict:
    """What a user writes: Trainer + PEFT LoRA + the padding collator."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from multitune.models.base import resolve_model_dir

    # from_pretrained as a user calls it (multitune's loader would switch the attention function)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.model), dtype=torch.float32)
    peft_cfg = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, peft_cfg)
    data = [{"input_ids": r.input_ids, "attention_mask": [1] * len(r.input_ids), "labels": r.labels} for r in rows]
    seen = {"cells": 0}
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collator(features):
        batch = pad(features)
        seen["cells"] += batch["input_ids"].numel()
        return batch

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    training_args = TrainingArguments(
        output_dir=str(Path(args.tmp) / "hf"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=data, data_collator=collator, callbacks=[clock])
    trainer.train()
    tokens = sum(len(r.input_ids) for r in rows)
    return {"seconds": clock.seconds, "cells": seen["cells"], "tokens": tokens}


def multitune_arm(args, name: str, **train_options) -> dict:
    from multitune.config import validate_config
    from multitune.training.loop import train

    cfg = validate_config(run_config(args, name, **train_options))
    results = train(cfg, overwrite=True, final_eval=False)["train"]
    seconds = results["seconds"]
    tokens = results["tokens_per_s"] * seconds
    return {"seconds": seconds, "cells": tokens / (1 - results["padding_fraction"]), "tokens": tokens}


def peak_rss(args) -> dict[str, float]:
    """GiB: one round of each arm in a fresh process (a process's RSS never shrinks back)."""
    rss = {}
    for arm in args.arms:
        forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in FORWARDED]
        out = subprocess.run(
            [sys.executable, __file__, "--child", arm, *forwarded], capture_output=True, text=True, check=True
        )
        rss[arm] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] / 2**20
    return rss


def run_arm(args, arm: str, rows, tokenizer) -> dict:
    if ARMS[arm] is None:
        return hf_trainer_arm(args, rows, tokenizer)
    return multitune_arm(args, arm, **ARMS[arm])


FORWARDED = ("data", "model", "steps", "batch", "rank", "max_length", "rows_per_task")

ARMS = {
    "hf-trainer": None,
    "multitune": {},
    "multitune-padded": {"packing": False},
    "multitune-ckpt": {"gradient_checkpointing": True},
    "multitune-compile": {"compile": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of the full data sets (one sub-folder per task)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument(
        "--quick", action="store_true", help="hf-trainer and multitune only, 1 round of 3 steps after the warm-up"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per arm and round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rows-per-task", type=int, default=2000)
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all (--quick: the first two)")
    p.add_argument("--json", help="also write the medians here")
    p.add_argument("--child", choices=list(ARMS), help=argparse.SUPPRESS)  # one round of one arm, prints peak RSS
    p.add_argument("--memory-only", action="store_true", help="only the peak RSS of each arm (fresh processes)")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 3
    args.arms = args.arms or list(ARMS)[: 2 if args.quick else None]
    from transformers import AutoConfig

    from multitune.models.base import resolve_model_dir
    from multitune.runtime import use_cores

    use_cores()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            args.tmp = tmp
            rows, tokenizer = drawn_rows(args)
            run_arm(args, args.child, rows, tokenizer)
            print(json.dumps({"peak_kib": _peak_rss_kib()}))
        return
    if args.memory_only:
        print("| arm | peak RSS |\n|---|---|")
        for arm, gib in peak_rss(args).items():
            print(f"| {arm} | {gib:.2f} GiB |")
        return
    rss = peak_rss(args)  # first: this process keeps the memory it frees (use_cores), children need room
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        rows, tokenizer = drawn_rows(args)
        config = AutoConfig.from_pretrained(resolve_model_dir(args.model))
        flops = useful_flops(rows, config, args.rank)
        targets = sum(sum(x != -100 for x in r.labels) for r in rows)
        device = (
            torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
        )
        print(
            f"[bench] {args.model} on {device}; {len(rows)} rows/round "
            f"({sum(len(r.input_ids) for r in rows)} tokens, {targets} target tokens), "
            f"{args.rounds} rounds after a warm-up",
            flush=True,
        )
        measured: dict[str, list[dict]] = {a: [] for a in args.arms}
        for round_ in range(args.rounds + 1):
            for arm in args.arms:
                gc.collect()
                # measured before every run: this shared machine's speed drifts within a run (the
                # peak moved 112 -> 170 GFLOP/s between rounds of one run), so each run is set
                # against the peak of its own minutes
                peak = matmul_peak_gflops()
                out = run_arm(args, arm, rows, tokenizer) | {"peak": peak}
                if round_ > 0:
                    measured[arm].append(out)
                label = "warm-up" if round_ == 0 else f"round {round_}"
                print(f"[bench] {label} {arm}: {out['seconds']:.1f} s", file=sys.stderr, flush=True)

    peaks = [m["peak"] for runs in measured.values() for m in runs]
    peak = statistics.median(peaks)
    print(
        f"[bench] matmul peak {peak:.1f} GFLOP/s (median of {len(peaks)} measurements, one before each measured "
        f"run: {min(peaks):.1f} to {max(peaks):.1f}); % of peak: the median over rounds of each run's GFLOP/s "
        "against the peak measured before it"
    )
    base = statistics.median(m["seconds"] for m in measured[args.arms[0]])
    header = (
        "| arm | examples/s | target tok/s | tokens/s | padding | peak RSS | GFLOP/s | % of peak | "
        f"speed vs {args.arms[0]} |"
    )
    lines = [header, "|" + "---|" * 9]
    summary = {}
    for arm in args.arms:
        runs = measured[arm]
        sec = statistics.median(m["seconds"] for m in runs)
        cells = statistics.median(m["cells"] for m in runs)
        tokens = runs[0]["tokens"]
        gflops = flops / sec / 1e9
        summary[arm] = {
            "seconds": sec,
            "examples_per_s": len(rows) / sec,
            "target_tokens_per_s": targets / sec,
            "tokens_per_s": tokens / sec,
            "padding_fraction": max(0.0, 1 - tokens / cells),  # cells come back from a rounded fraction
            "peak_rss_gib": rss[arm],
            "gflops": gflops,
            "peak_fraction": statistics.median(flops / m["seconds"] / 1e9 / m["peak"] for m in runs),
            "speedup": base / sec,
        }
        s = summary[arm]
        lines.append(
            f"| {arm} | {s['examples_per_s']:.3f} | {s['target_tokens_per_s']:.1f} | {s['tokens_per_s']:.0f} | "
            f"{100 * s['padding_fraction']:.0f}% | {rss[arm]:.2f} GiB | {gflops:.1f} | "
            f"{100 * s['peak_fraction']:.0f}% | {s['speedup']:.2f}x |"
        )
    print("\n".join(lines))
    if args.json:
        write_atomic(
            Path(args.json),
            json.dumps({"device": device, "matmul_peak_gflops": peak, "peaks": peaks, "arms": summary}, indent=1),
        )


if __name__ == "__main__":
    main()
