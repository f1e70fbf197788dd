"""The zero-shot metrics a suite task reports beyond top-k and mean per-class recall.

DataComp scores Dollar Street by the worst income group's top-5 accuracy and GeoDE
by the worst region's top-1 (groups from each sample's `.npy` metadata), and
iWildCam by macro F1. The evaluator streams scores through `update` and adds
`metrics(confusion)` to the task's record; every other task gets None here.
"""

from __future__ import annotations

import numpy as np

from clipjax.errors import ClipjaxError
from clipjax.evaluate import suites, zeroshot


class Extra:
    def __init__(self, entry: suites.Entry, groups: np.ndarray | None):
        self.entry = entry
        self.groups = groups
        self.k = suites.GROUP_METRICS.get(entry.metric, 0)
        self.hits: list[np.ndarray] = []

    def update(self, scores: np.ndarray, labels) -> None:
        if self.k:
            self.hits.append(zeroshot.topk_correct(np.asarray(scores), np.asarray(labels),
                                                   self.k))

    def metrics(self, confusion: np.ndarray) -> dict[str, float]:
        if self.entry.metric == suites.F1_MACRO:
            return {suites.F1_MACRO: suites.f1_macro(confusion)}
        hits = np.concatenate(self.hits) if self.hits else np.zeros((0,), bool)
        groups = self.groups[:len(hits)]
        if len(groups) != len(hits):
            raise ClipjaxError(f"{self.entry.key}: {len(self.groups)} metadata rows for "
                               f"{len(hits)} images")
        return {self.entry.metric: suites.worst_group(hits, groups),
                "num_groups": int(len(np.unique(groups)))}


def for_task(task, source) -> Extra | None:
    entry = suites.entry_for(task.label)
    if entry is None or (entry.metric not in suites.GROUP_METRICS
                         and entry.metric != suites.F1_MACRO):
        return None
    groups = None
    if entry.metric in suites.GROUP_METRICS:
        from clipjax.evaluate.clip_benchmark_wds import group_ids, resolve

        kind, _, arg = task.dataset.partition(":")
        groups = group_ids(resolve(arg), task.split or "test") if kind == "wds" else None
        if groups is None:
            return None  # no per-sample metadata: top-1 and top-5 only
    return Extra(entry, groups)
