"""`clipjax embed | search | classify | calibrate | score` end to end on a saved tiny model."""

import json
import os

import jax
import numpy as np
import pytest
from apps_data import tiny_config, write_corrupt, write_photos
from PIL import Image

from clipjax import checkpoint, models
from clipjax.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model"))
    config = tiny_config()
    checkpoint.save_params(path, models.init_params(config.model, jax.random.key(0)), config)
    return path


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_embed_then_search(workdir, tmp_path, capsys):
    photos = write_photos(str(tmp_path / "photos"))
    bad = write_corrupt(str(tmp_path / "photos" / "broken"))
    index = str(tmp_path / "index")
    code, out, err = _run(capsys, "embed", "--model", workdir, "--images",
                          str(tmp_path / "photos"), "--out", index, "--no-progress", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["embedded"] == summary["count"] == len(photos)
    assert sorted(s["path"] for s in summary["skipped"]) == bad
    assert all(f"skipped: {p}" in err for p in bad)

    # Re-run without --model (the cache remembers it) on a glob: nothing to embed.
    code, out, err = _run(capsys, "embed", "--images", str(tmp_path / "photos" / "**" / "*.png"),
                          "--out", index, "--no-progress", "--json")
    assert code == 0, err
    again = json.loads(out)
    pngs = [p for p in photos if p.endswith(".png")]
    assert again["embedded"] == 0 and again["unchanged"] == len(pngs)
    assert again["count"] == len(photos)  # files outside the glob stay (no --prune)

    sheet = str(tmp_path / "sheet.png")
    code, out, err = _run(capsys, "search", "--index", index, "--query", "a cat", "--k", "4",
                          "--json", "--contact-sheet", sheet)
    assert code == 0, err
    hits = json.loads(out)
    assert len(hits) == 4 and all(set(h) == {"path", "score"} for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert Image.open(sheet).format == "PNG" and Image.open(sheet).width > 4 * 150

    # Image query: the photo itself comes first, exactly and approximately.
    for extra in ([], ["--approximate"], ["--approximate", "--index-kind", "hnsw"]):
        code, out, err = _run(capsys, "search", "--index", index, "--image", photos[2],
                              "--k", "3", *extra)
        assert code == 0, err
        first = out.splitlines()[0].split()
        assert first[0] == "1" and first[2] == photos[2] and float(first[1]) > 0.99
    assert os.path.exists(os.path.join(index, "hnsw.faiss"))

    code, _, err = _run(capsys, "search", "--index", str(tmp_path / "nope"), "--query", "x")
    assert code == 1 and "clipjax search: error:" in err and "no embedding cache" in err
    code, _, err = _run(capsys, "search", "--index", index, "--image", bad[0])
    assert code == 1 and "cannot read the query image" in err


def test_classify_calibrate_score(workdir, tmp_path, capsys):
    photos = write_photos(str(tmp_path / "photos"), ["chelsea", "rocket", "coffee", "moon"],
                          nested=False)
    write_corrupt(str(tmp_path / "photos"))
    code, out, err = _run(capsys, "classify", "--model", workdir, "--labels",
                          "cat,rocket,coffee", "--top-k", "2", "--json", "--no-progress",
                          str(tmp_path / "photos"))
    assert code == 0, err
    preds = json.loads(out)
    assert [p["path"] for p in preds] == photos and err.count("skipped:") == 2
    for p in preds:
        assert len(p["top"]) == 2 and p["label"] == p["top"][0]["label"]
    scores = sorted(p["score"] for p in preds)
    threshold = (scores[1] + scores[2]) / 2
    (tmp_path / "labels.txt").write_text("cat\nrocket\ncoffee\n")
    code, out, err = _run(capsys, "classify", "--model", workdir, "--labels-file",
                          str(tmp_path / "labels.txt"), "--threshold", str(threshold),
                          "--none-label", "unknown", "--json", "--no-progress", *photos)
    assert code == 0, err
    assert sum(p["label"] == "unknown" for p in json.loads(out)) == 2

    code, _, err = _run(capsys, "classify", "--model", workdir, "--labels", "a,b",
                        "--none-label", "x", photos[0])
    assert code == 1 and "--none-label needs --threshold" in err

    for sub, names in {"cat": ["chelsea"], "rocket": ["rocket"], "other": ["camera"]}.items():
        write_photos(str(tmp_path / "labelled" / sub), names, nested=False)
    code, out, err = _run(capsys, "calibrate", "--model", workdir, "--labels", "cat,rocket",
                          "--folder", str(tmp_path / "labelled"), "--precision", "0.01",
                          "--json", "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    assert result["negative_folders"] == ["other"] and result["positives"] == 2
    assert result["negatives"] == 1 and result["precision"] >= 0.01

    (tmp_path / "pairs.tsv").write_text(
        "image\tprompt\nphotos/chelsea.jpg\ta cat\nphotos/rocket.png\ta rocket\n"
        "photos/notes.png\tbroken\n")
    code, out, err = _run(capsys, "score", "--model", workdir, "--pairs",
                          str(tmp_path / "pairs.tsv"), "--json", "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    assert [p["text"] for p in result["pairs"]] == ["a cat", "a rocket"]
    assert result["skipped"] == 1 and "notes.png" in err
    for p in result["pairs"]:
        assert p["score"] == pytest.approx(2.5 * max(p["cosine"], 0), abs=1e-5)
    assert result["mean"] == pytest.approx(np.mean([p["score"] for p in result["pairs"]]),
                                           abs=1e-5)
    code, out, err = _run(capsys, "score", "--model", workdir, "--images", *photos[:2],
                          "--texts", "a photo")
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("mean CLIPScore") and last.endswith("over 2 pairs")
    code, _, err = _run(capsys, "score", "--model", workdir, "--images", *photos[:3],
                        "--texts", "a", "b")
    assert code == 1 and "3 images but 2 texts" in err
