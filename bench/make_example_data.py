"""Write examples/data/: the small subsets of the full data sets that ship with the repository, so
that the demo, the examples and the tests run from a clone alone.

Each split keeps the first N rows of the full file (the full files are themselves seeded random
samples of their sources, so a prefix is a random sample too); SOURCE.md records N, the label
distribution and the full data set's own SOURCE.md (origin, citation, licence).

    python bench/make_example_data.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from multitune.files import write_atomic

OUT = Path(__file__).resolve().parents[1] / "examples" / "data"
# rows per split: enough for what the demo, the examples and the tests draw (the demo sees about
# 213 training rows of each task and scores the first 150 dev rows)
SIZES = {
    "sst2": {"train": 400, "dev": 200, "test": 100},
    "ag_news": {"train": 400, "dev": 200, "test": 100},
    "rte": {"train": 400, "dev": 200},
    "medical_abstracts": {"train": 400, "dev": 150, "test": 100},
    "pubmed_abstracts": {"train": 300, "dev": 100},
    "squad": {"train": 100, "dev": 50},
    "scitldr": {"train": 50, "dev": 20},
    "multi30k_en_de": {"train": 50, "dev": 20},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder of the full data sets")
    args = parser.parse_args()
    for task, sizes in SIZES.items():
        src, dst = Path(args.data) / task, OUT / task
        dst.mkdir(parents=True, exist_ok=True)
        lines = [
            f"# {task}: the subset shipped with multitune",
            "",
            f"The first rows of each split of the full `{task}` data set (written by "
            "`python bench/make_example_data.py --data DIR`); the full files are seeded random samples of "
            "their sources, so these prefixes are random samples too. Origin, citation and licence: below.",
            "",
            "| split | rows | of | labels |",
            "|---|---|---|---|",
        ]
        for split, n in sizes.items():
            rows = (src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            kept = rows[:n]
            write_atomic(dst / f"{split}.jsonl", "\n".join(kept) + "\n")
            labels = collections.Counter(json.loads(r).get("label") for r in kept)
            shown = ", ".join(f"{k} {v}" for k, v in sorted(labels.items())) if None not in labels else "-"
            lines.append(f"| {split} | {len(kept)} | {len(rows)} | {shown} |")
        original = (src / "SOURCE.md").read_text(encoding="utf-8")
        lines += [
            "",
            "## The full data set's SOURCE.md",
            "",
            ("\n" + original).replace("\n# ", "\n### ").replace("\n## ", "\n### ").strip(),
        ]
        write_atomic(dst / "SOURCE.md", "\n".join(lines).rstrip() + "\n")
        print(f"{task}: " + ", ".join(f"{s} {n}" for s, n in sizes.items()))


if __name__ == "__main__":
    main()
