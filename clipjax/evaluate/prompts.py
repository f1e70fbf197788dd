"""Class names and prompt templates: the built-in lists and the user's own files.

The lists are data, not code: `data/classnames/<name>.txt` (one class per line,
in label order) and `data/templates/<name>.txt` (one template per line, `{}`
where the class name goes). A user file replaces either list; it may be a text
file in the same format or a JSON list (or a JSON object holding the list under
"classnames" / "templates"). Lines starting with `#` and blank lines are skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clipjax import paths
from clipjax.errors import ClipjaxError

DATA_DIR = Path(__file__).resolve().parent / "data"
CLASSNAMES_DIR = DATA_DIR / "classnames"
TEMPLATES_DIR = DATA_DIR / "templates"
PLACEHOLDER = "{}"


def builtin_classnames() -> list[str]:
    """Names of the built-in class-name lists."""
    return sorted(p.stem for p in CLASSNAMES_DIR.glob("*.txt"))


def builtin_templates() -> list[str]:
    """Names of the built-in template sets (e.g. imagenet1k = OpenAI's 80)."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.txt"))


def read_list(path: str | os.PathLike, key: str) -> list[str]:
    """Reads a list of strings from a text file (one per line) or a JSON file (local or a
    URI)."""
    path = os.fspath(path)
    try:
        text = paths.read_text(path)
    except UnicodeDecodeError as e:
        raise ClipjaxError(f"{key} file {path}: not UTF-8 text: {e}") from None
    except OSError as e:
        raise ClipjaxError(f"cannot read {key} file {path}: {e.strerror or e}") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ClipjaxError(f"{path}: invalid JSON: {e}") from None
        if isinstance(data, dict):
            if key not in data:
                raise ClipjaxError(f"{path}: a JSON object needs the key {key!r}")
            data = data[key]
        if not (isinstance(data, list) and all(isinstance(x, str) for x in data)):
            raise ClipjaxError(f"{path}: expected a JSON list of strings for {key}")
        items = [x.strip() for x in data]
    else:
        items = [line.strip() for line in text.splitlines()]
        items = [x for x in items if x and not x.startswith("#")]
    if not items:
        raise ClipjaxError(f"{path}: no {key} in the file")
    return items


def _resolve(spec: str, directory: Path, key: str, known: list[str]) -> list[str]:
    """`spec` is a built-in list name or a path to a file."""
    builtin = directory / f"{spec}.txt"
    if "/" not in spec and os.sep not in spec and builtin.exists() and not paths.exists(spec):
        return read_list(builtin, key)
    if paths.exists(spec):
        return read_list(spec, key)
    raise ClipjaxError(
        f"{key} {spec!r} is neither a file nor a built-in list; built-in: {', '.join(known)}")


def load_classnames(spec: str) -> list[str]:
    # Duplicates are allowed: OpenAI's ImageNet list has two "sunglasses" and two "missile".
    return _resolve(spec, CLASSNAMES_DIR, "classnames", builtin_classnames())


def load_templates(spec: str) -> list[str]:
    templates = normalize_templates(_resolve(spec, TEMPLATES_DIR, "templates",
                                             builtin_templates()))
    check_templates(templates, spec)
    return templates


def normalize_templates(templates: list[str]) -> list[str]:
    """CLIP_benchmark writes `{c}` where the class name goes; clipjax writes `{}`."""
    return [t.replace("{c}", PLACEHOLDER) for t in templates]


def check_templates(templates: list[str], where: str = "templates") -> None:
    for i, t in enumerate(templates):
        if t.count(PLACEHOLDER) != 1:
            raise ClipjaxError(
                f"{where}: template {i + 1} {t!r} must contain exactly one {PLACEHOLDER}")


def fill(template: str, classname: str) -> str:
    """The prompt for one class; like str.format but safe for names holding braces."""
    return template.replace(PLACEHOLDER, classname)


def prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """All prompts, class-major: prompt c * len(templates) + t is template t of class c."""
    return [fill(t, c) for c in classnames for t in templates]
