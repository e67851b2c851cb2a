"""Evaluation time per task: the naive loop against multitune's evaluator, same model, same rows.

Naive is what one writes first: one example at a time; a classification row costs one full
forward of prompt + label per label (log-likelihood of the label tokens); generation and QA call
`model.generate` on one prompt at a time (greedy, KV cache). multitune's evaluator runs the
prompt prefix every row shares (chat template, task lead-in) once per task, prompts grouped by
token length, each prompt once and then all its labels' tokens in one forward on its KV cache,
and generates for a batch of prompts at once. Both produce predictions that go through the same `score`
function; the table shows both metrics and whether every prediction is the same, and the
ratio of the matmul work the two do (`work`): the speed-up each would show at equal efficiency.

    python bench/eval.py --data DIR --quick      # about 3 minutes
    python bench/eval.py --data DIR              # the README's table
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from multitune.models.load import load_base


def tasks(data_dir: str, n_cls: int, n_gen: int) -> list[dict]:
    def spec(name, kind, prompt, target, n, **extra):
        data = {"dev": str(Path(data_dir) / name / "dev.jsonl")}
        return {
            "name": name,
            "kind": kind,
            "data": data,
            "prompt": prompt,
            "target": target,
            "max_eval_examples": n,
            **extra,
        }

    return [
        spec(
            "sst2",
            "classification",
            "Review: {{ text }}\nIs the sentiment of this review positive or negative?",
            "{{ label }}",
            n_cls,
            labels=["negative", "positive"],
        ),
        spec(
            "ag_news",
            "classification",
            "Article: {{ text }}\nIs this article about World, Sports, Business or Sci/Tech?",
            "{{ label }}",
            n_cls,
            labels=["Business", "Sci/Tech", "Sports", "World"],
        ),
        spec(
            "rte",
            "classification",
            "Premise: {{ premise }}\nHypothesis: {{ hypothesis }}\nDoes the premise entail the hypothesis?",
            "{{ label }}",
            n_cls,
            labels=["entailment", "not_entailment"],
        ),
        spec(
            "squad",
            "extractive_qa",
            "{{ context }}\nQuestion: {{ question }}\nAnswer with a span of the text.",
            "{{ answer }}",
            n_gen,
        ),
    ]


@torch.no_grad()
def naive_predict(model, encoder, task, examples, max_new_tokens: int) -> list[dict]:
    out = []
    for ex in examples:
        prompt, _ = encoder.prompt_ids(ex.prompt, reserve=max_new_tokens)
        if task.kind == "classification":
            scores = {}
            for label in task.labels:
                ids = encoder.target_ids(label)
                seq = torch.tensor([prompt + ids])
                logp = torch.log_softmax(model(input_ids=seq).logits[0, len(prompt) - 1 : -1].float(), -1)
                scores[label] = float(logp.gather(1, torch.tensor(ids)[:, None]).sum())
            out.append({"prediction": max(task.labels, key=scores.__getitem__), "scores": scores})
        else:
            seq = torch.tensor([prompt])
            gen = model.generate(
                input_ids=seq,
                attention_mask=torch.ones_like(seq),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=encoder.tok.pad_token_id,
                eos_token_id=encoder.eos,
            )
            out.append({"prediction": encoder.tok.decode(gen[0, len(prompt) :], skip_special_tokens=True).strip()})
    return out


def work(model, encoder, task, examples, preds, batch: int, max_new_tokens: int) -> tuple[float, float, float]:
    """Matmul FLOPs of the naive loop and of multitune's evaluator on these rows (weights and LM
    head; attention left out): their ratio is the speed-up both would show at the same matmul
    efficiency, so what exceeds it is batching, and what falls short of 5x is bounded here.

    Per token: 2 N (N = decoder weights) + 2 d V where logits are computed. Naive: every label
    is a full forward of prompt + label with logits at every position; generation is one prompt
    plus one step per generated token. Ours: the shared prefix once, each prompt's own tokens
    once (logits at its last position), n - 1 tokens with logits per label of n tokens;
    generation runs each batch for as many steps as its longest answer. Padding is not counted;
    the third value is the share of padding in our prompt pass (the evaluator's batches).
    """
    from multitune.evaluation.evaluator import _SharedPrefix, length_batches

    def padding(own: list[int], batches: list[list[int]]) -> float:
        return 1 - sum(own) / sum(len(b) * max(own[i] for i in b) for b in batches)

    c = model.config
    d, inter, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    body = 2 * c.num_hidden_layers * (2 * d * d + 2 * d * kv + 3 * d * inter)
    head = 2 * d * c.vocab_size
    if task.kind == "classification":
        labels = [len(encoder.target_ids(label)) for label in task.labels]
        prompts = [encoder.prompt_ids(ex.prompt, reserve=max(labels))[0] for ex in examples]
        with torch.no_grad():
            prefix = len(_SharedPrefix(model, prompts).tokens)
        naive = sum((len(p) + n) * (body + head) for p in prompts for n in labels)
        ours = prefix * body + sum((len(p) - prefix) * body + head for p in prompts)
        ours += len(prompts) * sum(n - 1 for n in labels) * (body + head)
        own = [len(p) - prefix for p in prompts]
        return naive, ours, padding(own, length_batches(own, batch))
    prompts = [encoder.prompt_ids(ex.prompt, reserve=max_new_tokens)[0] for ex in examples]
    with torch.no_grad():
        prefix = len(_SharedPrefix(model, prompts).tokens)
    steps = [min(len(encoder.tok(x["prediction"]).input_ids) + 1, max_new_tokens) for x in preds]
    naive = sum(len(p) * body + head + g * (body + head) for p, g in zip(prompts, steps, strict=True))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # the decoding batches
    ours = prefix * body + sum((len(p) - prefix) * body + head for p in prompts)
    own, groups = [len(p) - prefix for p in prompts], []
    for start in range(0, len(order), batch):
        members = order[start : start + batch]
        ours += len(members) * max(steps[i] for i in members) * (body + head)
        groups += [[members[i] for i in g] for g in length_batches([own[i] for i in members], len(members))]
    return naive, ours, padding(own, groups)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of the full data sets (one sub-folder per task)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quick", action="store_true", help="24 classification rows and 8 QA rows per task")
    p.add_argument("--rows", type=int, default=100, help="classification rows per task")
    p.add_argument("--gen-rows", type=int, default=32, help="QA rows")
    p.add_argument("--batch", type=int, default=32, help="eval.batch_size (its default)")
    args = p.parse_args()
    if args.quick:
        args.rows, args.gen_rows = 24, 8

    from multitune import rundir
    from multitune.config import validate_config
    from multitune.evaluation.evaluator import predict, score
    from multitune.runtime import use_cores

    use_cores()  # threads and allocator as `multitune eval` sets them, for both loops

    raw = {"model": args.model, "tasks": tasks(args.data, args.rows, args.gen_rows), "eval": {"max_new_tokens": 24}}
    cfg = validate_config(raw)
    rows = rundir.load_examples(cfg, "dev")
    model, tokenizer = load_base(cfg)
    model.eval()
    encoder = rundir.make_encoder(cfg, tokenizer)
    from throughput import matmul_peak_gflops

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    peak = matmul_peak_gflops()
    print(f"[bench] {args.model} on {device} (matmul peak {peak:.1f} GFLOP/s now), eval batch {args.batch}")
    lines = [
        "| task | rows | naive s | multitune s | speed-up | FLOP ratio | prompt padding | naive metric "
        "| multitune metric | same predictions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    total_naive = total_ours = flops_naive = flops_ours = 0.0
    for task in cfg.tasks:
        examples = rows[task.name]
        predict(model, encoder, task, examples[:2], args.batch, cfg.eval.max_new_tokens)  # warm-up
        t0 = time.perf_counter()
        naive = naive_predict(model, encoder, task, examples, cfg.eval.max_new_tokens)
        t1 = time.perf_counter()
        ours = predict(model, encoder, task, examples, args.batch, cfg.eval.max_new_tokens)
        t2 = time.perf_counter()
        metric = "accuracy" if task.kind == "classification" else "f1"
        m_naive, m_ours = score(task, examples, naive)[metric], score(task, examples, ours)[metric]
        same = sum(a["prediction"] == b["prediction"] for a, b in zip(naive, ours, strict=True))
        total_naive, total_ours = total_naive + t1 - t0, total_ours + t2 - t1
        f_naive, f_ours, pad = work(model, encoder, task, examples, naive, args.batch, cfg.eval.max_new_tokens)
        flops_naive, flops_ours = flops_naive + f_naive, flops_ours + f_ours
        lines.append(
            f"| {task.name} | {len(examples)} | {t1 - t0:.1f} | {t2 - t1:.1f} | {(t1 - t0) / (t2 - t1):.1f}x | "
            f"{f_naive / f_ours:.1f}x | {pad:.0%} | {metric} {m_naive:.1f} | {metric} {m_ours:.1f} | "
            f"{same}/{len(examples)} |"
        )
    lines.append(
        f"| all | | {total_naive:.1f} | {total_ours:.1f} | {total_naive / total_ours:.1f}x | "
        f"{flops_naive / flops_ours:.1f}x | | | | |"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
