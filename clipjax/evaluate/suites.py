"""Benchmark suites: `--tasks datacomp` and `--tasks clip_benchmark` as the community runs them.

A suite is a list of CLIP_benchmark webdatasets, each with the metric its
authors report. The datasets are looked up under `--data-dir` by the folder
names the two projects' downloaders use (DataComp's `download_evalsets.py`
writes `wds_<name>_test/`, CLIP_benchmark's Hugging Face repos are
`clip-benchmark/wds_<name>`, and its `--dataset_root DIR/{dataset_cleaned}`
convention gives `<name>/`); a dataset that is not there is reported and
skipped, never fatal.

DataComp's average is the mean of each task's main metric (its `tasklist.yml`
and `evaluate.py`): top-1, mean per-class recall, retrieval mean R@1 (the mean
of image→text and text→image R@1), worst-group top-5 over income groups
(Dollar Street), worst-group top-1 over regions (GeoDE) and macro F1
(iWildCam). WinoGAViL's Jaccard score and FMoW's worst-region accuracy need
data this evaluator does not read; those tasks are listed as not supported.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass

import numpy as np

from clipjax import paths
from clipjax.errors import ClipjaxError


@dataclass(frozen=True)
class Entry:
    key: str  # the suite's own dataset name, e.g. vtab/caltech101
    name: str  # the display name
    metric: str  # the record key of the main metric
    mode: str = "zeroshot"  # zeroshot | retrieval
    aliases: tuple[str, ...] = ()  # other folder names of the same data
    unsupported: str = ""  # why clipjax cannot compute the main metric


def _e(key, name, metric="top1", **kw) -> Entry:
    return Entry(key, name, metric, **kw)


MPCR = "mean_per_class_recall"
MEAN_R1 = "mean_R@1"
TOP5_WG = "top5_worst_group"
TOP1_WG = "top1_worst_group"
F1_MACRO = "f1_macro"

# DataComp's tasklist.yml, in its order: the 38 tasks with a main metric.
DATACOMP = (
    _e("vtab/caltech101", "Caltech-101", MPCR), _e("cifar10", "CIFAR-10"),
    _e("vtab/cifar100", "CIFAR-100"), _e("vtab/clevr_count_all", "CLEVR Counts"),
    _e("vtab/clevr_closest_object_distance", "CLEVR Distance"),
    _e("country211", "Country211"), _e("vtab/dtd", "Describable Textures"),
    _e("vtab/eurosat", "EuroSAT"), _e("fgvc_aircraft", "FGVC Aircraft", MPCR),
    _e("food101", "Food-101"), _e("gtsrb", "GTSRB"), _e("imagenet1k", "ImageNet 1k"),
    _e("imagenet_sketch", "ImageNet Sketch"), _e("imagenetv2", "ImageNet v2"),
    _e("imagenet-a", "ImageNet-A"), _e("imagenet-o", "ImageNet-O"),
    _e("imagenet-r", "ImageNet-R"),
    _e("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance"),
    _e("mnist", "MNIST"), _e("objectnet", "ObjectNet"),
    _e("vtab/flowers", "Oxford Flowers-102", MPCR), _e("vtab/pets", "Oxford-IIIT Pet", MPCR),
    _e("voc2007", "Pascal VOC 2007"), _e("vtab/pcam", "PatchCamelyon"),
    _e("renderedsst2", "Rendered SST2"), _e("vtab/resisc45", "RESISC45"),
    _e("cars", "Stanford Cars"), _e("stl10", "STL-10"), _e("sun397", "SUN397"),
    _e("vtab/svhn", "SVHN"),
    _e("retrieval/flickr30k", "Flickr", MEAN_R1, mode="retrieval", aliases=("flickr30k",)),
    _e("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", MEAN_R1,
       mode="retrieval", aliases=("mscoco_captions",)),
    _e("misc/winogavil", "WinoGAViL", "jaccard_score_10-12",
       unsupported="WinoGAViL's Jaccard score over candidate sets"),
    _e("wilds/iwildcam", "iWildCam", F1_MACRO), _e("wilds/camelyon17", "Camelyon17"),
    _e("wilds/fmow", "FMoW", "acc_worst_region",
       unsupported="FMoW's worst-region accuracy (WILDS region metadata)"),
    _e("fairness/dollar_street", "Dollar Street", TOP5_WG),
    _e("fairness/geode", "GeoDE", TOP1_WG),
)

# CLIP_benchmark's benchmark/webdatasets.txt (its published wds datasets).
CLIP_BENCHMARK = (
    _e("mscoco_captions", "MSCOCO captions", MEAN_R1, mode="retrieval"),
    _e("flickr8k", "Flickr8k", MEAN_R1, mode="retrieval"),
    _e("flickr30k", "Flickr30k", MEAN_R1, mode="retrieval"),
    *(_e(k, k) for k in (
        "imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r",
        "imagenet-o", "objectnet", "fer2013", "voc2007", "sun397", "cars", "fgvc_aircraft",
        "mnist", "stl10", "gtsrb", "country211", "renderedsst2", "vtab/caltech101",
        "vtab/cifar10", "vtab/cifar100", "vtab/clevr_count_all",
        "vtab/clevr_closest_object_distance", "vtab/diabetic_retinopathy", "vtab/dmlab",
        "vtab/dsprites_label_orientation", "vtab/dsprites_label_x_position",
        "vtab/dsprites_label_y_position", "vtab/dtd", "vtab/eurosat",
        "vtab/kitti_closest_vehicle_distance", "vtab/flowers", "vtab/pets", "vtab/pcam",
        "vtab/resisc45", "vtab/smallnorb_label_azimuth", "vtab/smallnorb_label_elevation",
        "vtab/svhn")),
)

SUITES = {"datacomp": DATACOMP, "clip_benchmark": CLIP_BENCHMARK}

# Where a metadata field names the groups of a worst-group metric (DataComp's
# fairness evaluators): the first column of each sample's `.npy` metadata
# (Dollar Street: income_ds, GeoDE: region).
GROUP_METRICS = {TOP5_WG: 5, TOP1_WG: 1}


def label(entry: Entry) -> str:
    """The results folder of an entry: its key with '/' as '-' (CLIP_benchmark's slug)."""
    return entry.key.replace("/", "-")


def _slug(key: str) -> str:
    return key.split("/", 1)[1] if key.split("/", 1)[0] in ("fairness", "retrieval", "misc",
                                                            "wilds") else key


def candidates(entry: Entry) -> list[str]:
    """Folder names that may hold an entry's webdataset, in the order they are tried."""
    names = []
    for key in (entry.key, _slug(entry.key), *entry.aliases):
        s = key.replace("/", "-")
        names += [f"wds_{s}_test", f"wds_{s}", s, key]
    return list(dict.fromkeys(names))


def find(entry: Entry, data_dir: str) -> str | None:
    """The folder under `data_dir` holding `entry` as test/*.tar, else None."""
    for name in candidates(entry):
        root = paths.join(data_dir, name)
        if paths.is_dir(paths.join(root, "test")) and paths.glob(paths.join(root, "test",
                                                                            "*.tar")):
            return paths.to_str(root)
    return None


@dataclass
class Plan:
    suite: str
    found: list[tuple[Entry, str]]  # (entry, directory)
    missing: list[Entry]
    unsupported: list[Entry]


def plan(suite: str, data_dir: str) -> Plan:
    if not data_dir:
        raise ClipjaxError(f"--tasks {suite}: give --data-dir DIR, the folder holding the "
                           "suite's webdatasets (e.g. DataComp's download_evalsets.py output)")
    if not paths.is_dir(data_dir):
        raise ClipjaxError(f"--data-dir {data_dir}: not a directory")
    found, missing, unsupported = [], [], []
    for entry in SUITES[suite]:
        if entry.unsupported:
            unsupported.append(entry)
            continue
        where = find(entry, data_dir)
        if where is None:
            missing.append(entry)
        else:
            found.append((entry, where))
    return Plan(suite, found, missing, unsupported)


def task_specs(p: Plan) -> list[str]:
    """`LABEL=wds:DIR@MODE` task strings of the datasets found."""
    return [f"{label(e)}=wds:{d}@{e.mode}" for e, d in p.found]


# --------------------------------------------------------------------------- metrics


def main_metric(entry: Entry, record: dict) -> float | None:
    if entry.metric == MEAN_R1:
        a, b = record.get("image_to_text_R@1"), record.get("text_to_image_R@1")
        return None if a is None or b is None else (a + b) / 2
    return record.get(entry.metric)


def worst_group(hits: np.ndarray, groups: np.ndarray) -> float:
    """The lowest per-group mean of `hits` over the groups present (WILDS' worst group)."""
    hits, groups = np.asarray(hits, np.float64), np.asarray(groups)
    return float(min(hits[groups == g].mean() for g in np.unique(groups)))


def f1_macro(cm: np.ndarray) -> float:
    """Macro F1 over the classes present in the labels (sklearn's f1_score(average='macro',
    labels=present)), from a confusion matrix with true classes by row."""
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    present = support > 0
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean()) if present.any() else 0.0


def entry_for(task_label: str) -> Entry | None:
    for suite in SUITES.values():
        for e in suite:
            if label(e) == task_label:
                return e
    return None


# --------------------------------------------------------------------------- report


def table(p: Plan, records: dict[str, dict]) -> tuple[list[list[str]], float | None]:
    """Rows (dataset, metric, value %) of the datasets evaluated, and the suite average."""
    rows, values = [], []
    for entry, _ in p.found:
        rec = records.get(label(entry))
        value = main_metric(entry, rec) if rec else None
        if value is not None:
            values.append(value)
        rows.append([entry.name, entry.key, entry.metric,
                     "" if value is None else f"{100 * value:.2f}"])
    average = float(np.mean(values)) if values else None
    return rows, average


def write_report(workdir: str, p: Plan, step: int, records: dict[str, dict]) -> str:
    """eval/<suite>/<step>.md, .csv and .png; returns the Markdown (also printed)."""
    from clipjax.evaluate import results

    rows, average = table(p, records)
    total = len(SUITES[p.suite])
    header = ["dataset", "key", "metric", "value (%)"]
    avg = "n/a" if average is None else f"{100 * average:.2f}"
    md = [f"# {p.suite} @ step {step}", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", f"**average over the {len(rows)} of {total} datasets evaluated: {avg}%**"]
    if p.missing:
        md += ["", f"skipped ({len(p.missing)}, not found under --data-dir): "
               + ", ".join(e.key for e in p.missing)]
    if p.unsupported:
        md += ["", f"not supported ({len(p.unsupported)}): "
               + "; ".join(f"{e.key} ({e.unsupported})" for e in p.unsupported)]
    text = "\n".join(md) + "\n"
    d = results.task_dir(workdir, p.suite)
    paths.write_text(os.fspath(paths.join(d, f"{step}.md")), text)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    w.writerow(["average", "", "", "" if average is None else f"{100 * average:.2f}"])
    paths.write_text(os.fspath(paths.join(d, f"{step}.csv")), buf.getvalue())
    _bar_chart(os.fspath(paths.join(d, f"{step}.png")), p.suite, step, rows, average)
    return text


def _bar_chart(path: str, suite: str, step: int, rows, average) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipjax.evaluate import results

    names = [r[0] for r in rows]
    values = [float(r[3]) if r[3] else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.3 * max(len(rows), 1)), dpi=100)
    ax.barh(range(len(rows)), values, color="tab:blue")
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("main metric (%)")
    if average is not None:
        ax.axvline(100 * average, color="tab:red", linestyle="--",
                   label=f"average {100 * average:.2f}%")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{suite} @ step {step}")
    fig.tight_layout()
    results._save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- the CLI's hook


def expand(task_text: str, data_dir: str, log=print) -> tuple[str, list[Plan]]:
    """Replaces each suite name in a --tasks list with the suite's datasets found under
    `data_dir`; logs what it skipped. Other task strings pass through unchanged."""
    parts, plans = [], []
    for spec in (s.strip() for s in task_text.split(",")):
        if spec not in SUITES:
            if spec:
                parts.append(spec)
            continue
        p = plan(spec, data_dir)
        plans.append(p)
        log(f"{spec}: {len(p.found)} of {len(SUITES[spec])} datasets found under {data_dir}")
        if p.missing:
            log(f"{spec}: skipped {len(p.missing)} not found: "
                + ", ".join(e.key for e in p.missing))
        if p.unsupported:
            log(f"{spec}: skipped {len(p.unsupported)} not supported: "
                + "; ".join(f"{e.key} ({e.unsupported})" for e in p.unsupported))
        parts += task_specs(p)
    if plans and not parts:
        names = ", ".join(p.suite for p in plans)
        raise ClipjaxError(f"--tasks {names}: none of the datasets is under {data_dir} "
                           f"(looked for e.g. {', '.join(candidates(SUITES[plans[0].suite][1]))})")
    return ",".join(parts), plans


def report(workdir: str, plans: list[Plan], out: dict[int, dict[str, dict]],
           checkpoint: str = "latest", log=print) -> None:
    """Writes and prints each suite's table for every step evaluated (records from
    eval/<task>/<step>.json, so results computed earlier count too: when every result
    existed already, the steps `checkpoint` names are reported)."""
    import json

    from clipjax import checkpoint as checkpoint_lib
    from clipjax.evaluate import results

    steps = sorted(out)
    if not steps:
        have = checkpoint_lib.finalized_steps(workdir)
        steps = (have if checkpoint == "all" else have[-1:] if checkpoint == "latest"
                 else [s for s in have if str(s) == checkpoint])
    for step in steps:
        for p in plans:
            records = {}
            for entry, _ in p.found:
                path = results.result_path(workdir, label(entry), step)
                if paths.exists(path):
                    records[label(entry)] = json.loads(paths.read_text(path))
            log(write_report(workdir, p, step, records).rstrip())
