"""Cost per training step of each loss balancing / gradient surgery method and of the interference
measurements, relative to plain training (`rows`: the mean row loss), in one process.

Loss weightings need only the per-task losses (no extra backward); surgery needs one backward per
task present in the batch; `interference_every=1` adds the per-task gradients for measuring, and
`affinity_every=1` adds TAG's lookahead (K forwards and backwards + K x K forwards on sub-batches).

    python bench/balance.py --data DIR                 # bundled model, 4 tasks, 4 steps per variant (~10 minutes)
    python bench/balance.py --data DIR --steps 2       # a quick look
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

PROMPTS = {
    "sst2": ("Review: {{ text }}\nIs the sentiment of this review positive or negative?", ["negative", "positive"]),
    "ag_news": ("Article: {{ text }}\nTopic?", ["Business", "Sci/Tech", "Sports", "World"]),
    "rte": ("Premise: {{ premise }}\nHypothesis: {{ hypothesis }}\nEntailed?", ["entailment", "not_entailment"]),
    "medical_abstracts": (
        "Abstract: {{ text }}\nWhich kind of disease is this abstract about?",
        [
            "cardiovascular diseases",
            "digestive system diseases",
            "general pathological conditions",
            "neoplasms",
            "nervous system diseases",
        ],
    ),
}

VARIANTS = {
    "rows": {},
    "equal": {"balance": "equal"},
    "uncertainty": {"balance": "uncertainty"},
    "dwa": {"balance": "dwa"},
    "famo": {"balance": "famo"},
    "pcgrad": {"balance": "pcgrad"},
    "cagrad": {"balance": "cagrad"},
    "aligned_mtl": {"balance": "aligned_mtl"},
    "mgda": {"balance": "mgda"},
    "imtl_g": {"balance": "imtl_g"},
    "interference_every=1": {"interference_every": 1},
    "affinity_every=1": {"affinity_every": 1},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of the full data sets (one sub-folder per task)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()

    from multitune.config import validate_config
    from multitune.training.loop import train

    tasks = [
        {
            "name": n,
            "kind": "classification",
            "data": {"train": str(Path(args.data) / n / "train.jsonl")},
            "prompt": prompt,
            "target": "{{ label }}",
            "labels": labels,
            "max_train_examples": 400,
        }
        for n, (prompt, labels) in PROMPTS.items()
    ]
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["rows"] + [v for v in args.variants if v != "rows"]:  # warm-up: the first "rows" run
            for repeat in range(2 if name == "rows" else 1):
                raw = {
                    "model": args.model,
                    "method": {"name": "lora", "rank": 16, "alpha": 32, "dropout": 0.05},
                    "tasks": tasks,
                    "mixing": {"strategy": "uniform"},
                    "train": {
                        "max_steps": args.steps,
                        "batch_size": args.batch,
                        "max_length": 256,
                        "log_every": 1000,
                        **VARIANTS[name],
                    },
                    "eval": {"zero_shot": False},
                    "output": str(Path(tmp) / f"{name}-{repeat}"),
                }
                result = train(validate_config(raw), final_eval=False)["train"]
                seconds[name] = result["seconds"] / result["steps"]
    base = seconds["rows"]
    print(f"\n{args.model}, LoRA r16, 4 classification tasks, batch {args.batch}, {args.steps} steps per variant")
    print("| variant | s/step | vs rows |\n|---|---|---|")
    for name in ["rows"] + [v for v in args.variants if v != "rows"]:
        print(f"| {name} | {seconds[name]:.2f} | {seconds[name] / base:.2f}x |")


if __name__ == "__main__":
    main()
