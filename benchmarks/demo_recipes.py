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
recipe trains from scratch in its own workdir under `--out` (a name already there is
skipped, so a killed sweep picks up where it stopped), then is scored zero-shot on the
10k Fashion-MNIST test images with the demo's held-out templates, exactly as `clipjax
demo` scores. The table gives top-1, the wall time of the train command (process start,
compile and the last checkpoint included) and the median step time from metrics.jsonl,
which varies less between runs than the wall time; results are appended to
OUT/results.tsv as each recipe ends. Names already in it are skipped; a recipe whose
run was interrupted resumes from its checkpoint (its train time then counts only the
rest, and the table says so). Run nothing else beside it: the times are the point.
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


def run_recipe(name: str, overrides: list[str], args, eval_files: tuple[str, str]) -> dict:
    workdir = os.path.join(args.out, name)
    resumed = os.path.exists(os.path.join(workdir, "checkpoints"))
    urls = os.path.join(args.shards, f"{{00000..{_num_shards(args.shards) - 1:05d}}}.tar")
    classnames, templates = eval_files
    train = [sys.executable, "-m", "clipjax", "train", "--config",
             f"{args.config}:{urls}", "--workdir", workdir, "--progress=off",
             *[f"--config.{o}" for o in overrides]]
    evaluate = [sys.executable, "-m", "clipjax", "eval", "--workdir", workdir, "--tasks",
                "fashion_mnist", "--data-dir", args.data_dir, "--classnames", classnames,
                "--templates", templates, "--force", "--no-progress"]
    log_path = os.path.join(args.out, f"{name}.log")
    with open(log_path, "w") as log:
        start = time.perf_counter()
        for what, cmd in (("train", train), ("eval", evaluate)):
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
            if code:
                return {"name": name, "error": f"{what} exited {code} (see {log_path})"}
            if what == "train":
                train_s = time.perf_counter() - start
    result_dir = os.path.join(workdir, "eval", "fashion_mnist")
    last = max((f for f in os.listdir(result_dir) if f.split(".")[0].isdigit()),
               key=lambda f: int(f.split(".")[0]))
    with open(os.path.join(result_dir, last)) as f:
        record = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step_time"] for line in f]
    return {"name": name, "top1": 100 * record["top1"], "train_s": train_s,
            "step_s": statistics.median(steps[1:] or steps),
            "overrides": " ".join(overrides) + (" (resumed)" if resumed else "")}


def convert_shards(data_dir: str, shards: str) -> None:
    """The demo's training shards, written as `clipjax demo` writes them."""
    from clipjax import cli
    from clipjax.commands.demo import TRAIN_TEMPLATES

    argv = ["data", "convert", "--from", "idx", data_dir, "--split", "train", "--out", shards,
            "--shard-size", "10000", "--image-format", "png"]
    for t in TRAIN_TEMPLATES:
        argv += ["--template", t]
    if cli.main(argv):
        raise SystemExit(f"converting {data_dir} into {shards} failed")


def _num_shards(shards: str) -> int:
    return len(json.load(open(os.path.join(shards, "sizes.json"))))


def main(argv=None) -> int:
    from clipjax.commands.demo import DEBIAN_DIR, EVAL_TEMPLATES
    from clipjax.data.idx import FASHION_MNIST_CLASSES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipes", nargs="?", default="",
                   help="file of `NAME [KEY=VALUE ...]` lines, or - for stdin "
                        "(default: DEFAULT_RECIPES)")
    p.add_argument("--shards", default="runs/demo/shards/train",
                   help="the demo's training shards (converted there when absent)")
    p.add_argument("--data-dir", default=DEBIAN_DIR, help="Fashion-MNIST IDX files")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "demo.py"))
    p.add_argument("--out", default="runs/demo_recipes", help="workdirs, logs, results.tsv")
    args = p.parse_args(argv)
    args.out, args.shards = os.path.abspath(args.out), os.path.abspath(args.shards)
    args.data_dir, args.config = os.path.abspath(args.data_dir), os.path.abspath(args.config)
    os.makedirs(args.out, exist_ok=True)
    if not os.path.isfile(os.path.join(args.shards, "sizes.json")):
        convert_shards(args.data_dir, args.shards)
    if args.recipes == "-":
        recipes = read_recipes(sys.stdin)
    elif args.recipes:
        with open(args.recipes) as f:
            recipes = read_recipes(f)
    else:
        recipes = read_recipes(DEFAULT_RECIPES)
    eval_files = (os.path.join(args.out, "classnames.txt"),
                  os.path.join(args.out, "heldout_templates.txt"))
    for path, lines in zip(eval_files, (FASHION_MNIST_CLASSES, EVAL_TEMPLATES)):
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    print(f"{'recipe':<24} {'top-1 %':>8} {'train s':>8} {'s/step':>7}  overrides", flush=True)
    results = os.path.join(args.out, "results.tsv")
    done = {name for name, _ in read_recipes(open(results))} if os.path.exists(results) else set()
    with open(results, "a") as table:
        for name, overrides in recipes:
            if name in done:
                print(f"{name:<24} (already in {results}; skipped)", flush=True)
                continue
            r = run_recipe(name, overrides, args, eval_files)
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
