"""Demo recipes, one at a time: `clipjax train` then the demo's `clipjax eval` for each.

    python benchmarks/demo_recipes.py                # the three recipes of DEFAULT_RECIPES
    python benchmarks/demo_recipes.py RECIPES.txt --shards runs/demo/shards/train
    python benchmarks/demo_recipes.py - <<'EOF'
    default
    s1200 train.steps=1200
    EOF

Each line of RECIPES is `NAME [KEY=VALUE ...]`: overrides of configs/demo.py (`#` starts
a comment). The shards are the ones `clipjax demo` writes (WORKDIR/shards/train); where
`--shards` holds none, they are converted there first, as the demo converts them. Every
recipe trains from scratch in its own workdir under `--out`, then is scored zero-shot on
the 10k Fashion-MNIST test images with the demo's held-out templates (the convert and
eval command lines are `clipjax.commands.demo`'s own). The table gives top-1, the
wall time of the train command (process start, compile and the last checkpoint
included) and the median step time from metrics.jsonl, which varies less between runs
than the wall time; results are appended to OUT/results.tsv as each recipe ends. Names
already in it are skipped; a recipe whose run was interrupted resumes from its
checkpoint (its train time then counts only the rest, and the table says so). Run
nothing else beside it: the times are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from clipjax import cli  # noqa: E402
from clipjax.commands import demo  # noqa: E402

# The demo's default against the one before it and the recipe of issue 14's day (the
# README's comparison); each line relative to configs/demo.py.
DEFAULT_RECIPES = """
default
previous_default model.image.pool=avg model.image.mlp_ratio=4.0 optim.frozen= train.steps=700
issue_day model.image.heads=4 model.image.mlp_ratio=4.0 model.text.width=128 model.text.heads=4 \
  model.text.layers=2 data.augment.crop_scale=(0.85,1.0) optim.lr=2e-3 optim.weight_decay=0.05 \
  optim.frozen= train.steps=700
"""


def read_recipes(lines) -> list[tuple[str, list[str]]]:
    out = []
    for line in "".join(lines).replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, *overrides = line.split()
            out.append((name, overrides))
    return out


def run_recipe(name: str, overrides: list[str], args, urls: str, eval_files) -> dict:
    workdir = os.path.join(args.out, name)
    resumed = os.path.exists(os.path.join(workdir, "checkpoints"))
    train = ["train", "--config", f"{args.config}:{urls}", "--workdir", workdir,
             "--progress=off", *[f"--config.{o}" for o in overrides]]
    log_path = os.path.join(args.out, f"{name}.log")
    with open(log_path, "w") as log:
        start = time.perf_counter()
        code = _clipjax(train, log)
        train_s = time.perf_counter() - start
        if not code:
            code = _clipjax(demo.eval_argv(workdir, args.data_dir, *eval_files), log)
    if code:
        return {"name": name, "error": f"exit status {code} (see {log_path})"}
    record = demo.latest_result(workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step_time"] for line in f]
    return {"name": name, "top1": 100 * record["top1"], "train_s": train_s,
            "step_s": statistics.median(steps[1:] or steps),
            "overrides": " ".join(overrides) + (" (resumed)" if resumed else "")}


def _clipjax(argv: list[str], log) -> int:
    """A `clipjax` command in its own process (each run compiles and times afresh)."""
    cmd = [sys.executable, "-m", "clipjax", *argv]
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipes", nargs="?", default="",
                   help="file of `NAME [KEY=VALUE ...]` lines, or - for stdin "
                        "(default: DEFAULT_RECIPES)")
    p.add_argument("--shards", default="runs/demo/shards/train",
                   help="the demo's training shards (converted there when absent)")
    p.add_argument("--data-dir", default=demo.DEBIAN_DIR, help="Fashion-MNIST IDX files")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "demo.py"))
    p.add_argument("--out", default="runs/demo_recipes", help="workdirs, logs, results.tsv")
    args = p.parse_args(argv)
    args.out, args.shards = os.path.abspath(args.out), os.path.abspath(args.shards)
    args.data_dir, args.config = os.path.abspath(args.data_dir), os.path.abspath(args.config)
    os.makedirs(args.out, exist_ok=True)
    if not os.path.isfile(os.path.join(args.shards, "sizes.json")):
        if cli.main(demo.convert_argv(args.data_dir, args.shards)):
            raise SystemExit(f"converting {args.data_dir} into {args.shards} failed")
    urls = demo.shard_urls(args.shards)
    if args.recipes == "-":
        recipes = read_recipes(sys.stdin)
    elif args.recipes:
        with open(args.recipes) as f:
            recipes = read_recipes(f)
    else:
        recipes = read_recipes(DEFAULT_RECIPES)
    eval_files = demo.write_eval_files(args.out)

    print(f"{'recipe':<24} {'top-1 %':>8} {'train s':>8} {'s/step':>7}  overrides", flush=True)
    results = os.path.join(args.out, "results.tsv")
    done = {name for name, _ in read_recipes(open(results))} if os.path.exists(results) else set()
    with open(results, "a") as table:
        for name, overrides in recipes:
            if name in done:
                print(f"{name:<24} (already in {results}; skipped)", flush=True)
                continue
            r = run_recipe(name, overrides, args, urls, eval_files)
            if "error" in r:
                print(f"{name:<24} {r['error']}", flush=True)
                continue
            print(f"{name:<24} {r['top1']:8.2f} {r['train_s']:8.1f} {r['step_s']:7.3f}  "
                  f"{r['overrides']}", flush=True)
            table.write(f"{name}\t{r['top1']:.2f}\t{r['train_s']:.1f}\t{r['step_s']:.4f}\t"
                        f"{r['overrides']}\n")
            table.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
