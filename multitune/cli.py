"""Command line: parse, call the API, print. No logic lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from multitune.files import atomic_path


def main(argv: list[str] | None = None) -> int:
    from multitune import __version__

    parser = argparse.ArgumentParser(prog="multitune", description="Multi-task fine-tuning of causal LMs.")
    parser.add_argument("--version", action="version", version=f"multitune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a base model on a mixture of tasks")
    p.add_argument("config", help="run YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.lr=1e-4 method.rank=8")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    p = sub.add_parser("eval", help="per-task metrics of a run (or of the base model: --model base)")
    p.add_argument("target", help="run dir, or a run YAML (then the base model is evaluated)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. eval.max_examples=100")
    p.add_argument("--model", choices=["trained", "base"], default="trained", help="which model (default: trained)")
    p.add_argument("--split", choices=["dev", "test"], help="default: the config's eval.split")
    p.add_argument("--tasks", dest="tasks_from", help="evaluate on the tasks of this run YAML instead")
    p.add_argument("--task-fallback", choices=["common"], help="gate for tasks a task-gated model was not trained on")

    p = sub.add_parser("predict", help="JSONL rows in, the same rows with a 'prediction' out")
    p.add_argument("run", help="run dir")
    p.add_argument("--task", required=True, help="the task whose prompt template the rows fill")
    p.add_argument("--input", help="JSONL file (default: standard input)")
    p.add_argument("--output", help="JSONL file (default: standard output)")
    p.add_argument("--model", choices=["trained", "base"], default="trained", help="which model (default: trained)")
    p.add_argument("--tasks", dest="tasks_from", help="take the task definition from this run YAML")
    p.add_argument("--task-fallback", choices=["common"], help="gate for a task a task-gated model was not trained on")

    p = sub.add_parser("export", help="write a run's model for serving without multitune")
    p.add_argument("run", help="run dir")
    p.add_argument("--task", help="the task whose update to export (task-gated methods)")
    p.add_argument(
        "--format",
        choices=["peft-lora", "merged"],
        default="peft-lora",
        help="peft-lora: a plain LoRA adapter (vLLM, SGLang, LoRAX); merged: full weights (default: peft-lora)",
    )
    p.add_argument("--out", help="target dir (default: RUN/export/<task>-<format>)")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], help="merged: the weights' type (default: the run's, fp32 on CPU)"
    )
    p.add_argument("--max-rank", type=int, help="peft-lora: re-factorise a larger update to this rank (truncated SVD)")

    p = sub.add_parser("chat", help="type to the fine-tuned model: a task's input, or free text; tokens stream")
    p.add_argument("run", help="run dir")
    p.add_argument("--task", help="answer as this task (its template, its labels); default: free text")
    p.add_argument("--model", choices=["trained", "base"], default="trained", help="which model (default: trained)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply in tokens (default: 128)")

    p = sub.add_parser("serve", help="an OpenAI-compatible completions endpoint on localhost; each task a model")
    p.add_argument("run", help="run dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--model", choices=["trained", "base"], default="trained", help="which model (default: trained)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default max_tokens (default: 128)")

    p = sub.add_parser(
        "gates", help="weights per task over the experts of a moe_lora, cgc_lora, lora_experts or mtl_lora run"
    )
    p.add_argument("run", help="run dir")

    # the merge methods are named here, not imported: the parser stays free of torch (checked in merging.py)
    merge_methods = "cat (the exact sum), svd, linear, ties, dare_ties, dare_linear, magnitude_prune"
    p = sub.add_parser("merge", help="combine LoRA runs (e.g. one per task) into one adapter, then evaluate every task")
    p.add_argument("runs", nargs="+", help="finished LoRA run dirs, two or more")
    p.add_argument("--output", required=True, help="run dir of the merged model")
    p.add_argument("--method", default="cat", help=f"how to combine: {merge_methods}; default: cat")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per run (default: 1 each)")
    p.add_argument("--density", type=float, help="ties / dare_* / magnitude_prune: share of values kept (default 0.5)")
    p.add_argument("--rank", type=int, help="svd: rank of the merged adapter (default: the largest run's)")
    p.add_argument("--seed", type=int, default=0, help="dare_*: seed of the random drop (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")

    p = sub.add_parser("report", help="one self-contained HTML page of a run: results, curves per task, heatmaps")
    p.add_argument("run", nargs="+", help="run dir (finished or still training); several: side by side (needs --out)")
    p.add_argument("--out", help="HTML file (default: RUN/report.html)")

    p = sub.add_parser("affinity", help="lookahead task affinity (TAG) over a short run; proposes task clusters")
    p.add_argument("config", help="run YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--steps", type=int, default=40, help="training steps to average over (default 40)")
    p.add_argument("--every", type=int, default=1, help="measure every N steps (default 1)")
    p.add_argument("--clusters", type=int, default=2, help="number of task clusters to propose (default 2)")
    p.add_argument("--lookahead-lr", type=float, help="SGD step of the lookahead (default: train.affinity_lr or lr)")
    p.add_argument("--output", help="run dir of the measuring run (default: <output>-affinity)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")

    p = sub.add_parser("compare", help="single-task baselines vs the multi-task run: per-task deltas and Δm")
    p.add_argument("config", help="run YAML of the multi-task run")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.balance=pcgrad output=runs/x-pcgrad")
    p.add_argument("--singles", help="dir of the single-task runs (default: <output>-single); share it across variants")
    p.add_argument("--reuse", action="store_true", help="read finished runs instead of training them again")
    p.add_argument(
        "--seeds", type=int, nargs="+", help="train every run once per seed: mean ± std, intervals of seed means"
    )
    p.add_argument(
        "--merge", metavar="METHOD", help=f"also merge the single-task LoRAs ({merge_methods}) and compare that model"
    )
    p.add_argument("--merge-weight", type=float, help="--merge: every run's weight (default 1; 1/tasks: their mean)")
    p.add_argument("--merge-density", type=float, help="--merge ties / dare_* / magnitude_prune: density (default 0.5)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace non-empty output dirs of runs it trains")
    g.add_argument(
        "--resume", action="store_true", help="reuse finished runs, continue interrupted ones from their checkpoint"
    )

    args = parser.parse_args(argv)
    from multitune.errors import MultituneError

    try:
        _quiet_libraries()
        from multitune.runtime import use_cores

        use_cores()  # every core and the allocator setting (a config's train.threads is applied per call)
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "export":
            return _export(args)
        if args.command in ("chat", "serve"):
            return _talk(args)
        if args.command == "gates":
            return _gates(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "report":
            return _report(args)
        if args.command == "affinity":
            return _affinity(args)
        if args.command == "compare":
            return _compare(args)
        return _predict(args)
    except MultituneError as e:
        print(f"multitune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("multitune: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path the system refuses (too long, no permission, disk full): one line too
        where = f"{e.filename}: " if e.filename else ""
        print(f"multitune: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    import warnings

    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _train(args) -> int:
    from multitune.api import train
    from multitune.config import load_config
    from multitune.reporting.tables import results_table

    cfg = load_config(args.config, args.overrides)
    results = train(cfg, overwrite=args.overwrite, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one of several processes (accelerate launch / torchrun): the main one reports
    if "fine_tuned" in results:
        print(results_table(results, cfg))
    print(f"run saved in {cfg.output}")
    return 0


def _eval(args) -> int:
    from multitune.api import evaluate

    done = evaluate(
        args.target,
        args.overrides,
        base=args.model == "base",
        split=args.split,
        tasks_from=args.tasks_from,
        task_fallback=args.task_fallback,
    )
    print(done["table"])
    if done["saved"] is not None:
        print(f"saved in {done['saved']}")
    return 0


def _predict(args) -> int:

    from multitune.api import predict_parsed
    from multitune.data.sources import parse_jsonl
    from multitune.errors import MultituneError

    if args.input and not Path(args.input).is_file():
        raise MultituneError(f"--input {args.input}: no such file")
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise MultituneError(f"--output {out} is a directory: name a file")
        if args.input and out.exists() and out.samefile(args.input):
            raise MultituneError(f"--output {out} is the --input file: write the predictions to another file")
        if not out.parent.is_dir():
            raise MultituneError(f"--output {out}: folder {out.parent} does not exist")
    source = open(args.input, "rb") if args.input else sys.stdin.buffer
    name = args.input or "<stdin>"
    try:
        parsed = [(f"{name}:{lineno}", row) for lineno, row in parse_jsonl(source, name)]
        rows = predict_parsed(
            Path(args.run),
            args.task,
            parsed,
            name,
            base=args.model == "base",
            tasks_from=args.tasks_from,
            task_fallback=args.task_fallback,
        )
        if not args.output:
            for row in rows:
                sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            return 0
        # written whole or not at all: an existing file is replaced only once every row is done
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as sink:
            for row in rows:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if args.input:
            source.close()
    return 0


def _talk(args) -> int:
    from multitune.serving import Session, chat, serve

    session = Session(args.run, base=args.model == "base", max_new_tokens=args.max_new_tokens)
    if args.command == "serve":
        server = serve(session, args.host, args.port)
        host, port = server.server_address[:2]
        names = ", ".join(
            [*([] if session.needs_task else [session.name]), *(f"{session.name}:{t}" for t in session.cfg.task_names)]
        )
        print(f"serving {names} at http://{host}:{port}/v1 (OpenAI completions); Ctrl-C stops", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0
    if args.task is not None:
        session.cfg.task(args.task)  # an unknown task: one line before the first prompt
    interactive = sys.stdin.isatty()
    if interactive:
        what = f"task {args.task}" if args.task else "free text"
        print(f"{session.name} ({what}); /exit or Ctrl-D ends", flush=True)

    def lines():
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    chat(session, args.task, lines(), lambda piece: print(piece, end="", flush=True))
    return 0


def _export(args) -> int:
    from multitune.api import export

    out = export(
        Path(args.run), args.task, args.format, Path(args.out) if args.out else None, args.max_rank, args.dtype
    )
    print(f"exported {args.format} to {out}")
    record = out / "multitune_export.json"
    if record.is_file():
        info = json.loads(record.read_text())
        print(f"rank {info['rank']}; relative error of the re-factorisation: {info['relative_error']:.4g}")
    return 0


def _gates(args) -> int:
    from multitune.api import gates_run

    table, png = gates_run(Path(args.run))
    print(table)
    print(f"heatmap: {png}")
    return 0


def _merge(args) -> int:
    from multitune.api import merge

    results = merge(
        args.runs,
        args.output,
        method=args.method,
        weights=args.weights,
        density=args.density,
        rank=args.rank,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(results["text"])
    return 0


def _report(args) -> int:
    from multitune.api import report

    print(f"report: {report(args.run if len(args.run) > 1 else args.run[0], args.out)}")
    return 0


def _affinity(args) -> int:
    from multitune.api import affinity

    print(
        affinity(
            args.config,
            args.overrides,
            steps=args.steps,
            every=args.every,
            clusters=args.clusters,
            lookahead_lr=args.lookahead_lr,
            output=args.output,
            overwrite=args.overwrite,
        )["text"]
    )
    return 0


def _compare(args) -> int:
    from multitune.api import compare

    print(
        compare(
            args.config,
            args.overrides,
            singles=args.singles,
            reuse=args.reuse,
            overwrite=args.overwrite,
            resume=args.resume,
            seeds=args.seeds,
            merge=args.merge,
            merge_weight=args.merge_weight,
            merge_density=args.merge_density,
        )["text"]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
