"""`clipjax <command>`: a thin dispatcher over `clipjax/commands/<name>.py`.

Each command module defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Only the chosen command's module is imported, so
`clipjax --help` stays fast and a command's heavy imports cost nothing to others.
Commands that take a config (`TAKES_CONFIG = True`) receive the `--config` /
`--config.k=v` arguments untouched in `args.config_args` (parsed by
`clipjax.config.load`); the others refuse them rather than ignore them.
An exception that is not a `ClipjaxError` is a bug: one line names it and the file
that holds its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import tempfile
import traceback

# name -> module; the order is the order of `clipjax --help`.
COMMANDS = {
    "train": "clipjax.commands.train",
    "eval": "clipjax.commands.eval",
    "import": "clipjax.commands.import_",
    "export": "clipjax.commands.export",
    "compile": "clipjax.commands.compile",
    "data": "clipjax.commands.data",
    "tokenizer": "clipjax.commands.tokenizer",
    "embed": "clipjax.commands.embed",
    "search": "clipjax.commands.search",
    "serve": "clipjax.commands.serve",
    "classify": "clipjax.commands.classify",
    "calibrate": "clipjax.commands.calibrate",
    "score": "clipjax.commands.score",
    "demo": "clipjax.commands.demo",
}


def _available() -> dict[str, str]:
    return {n: m for n, m in COMMANDS.items() if importlib.util.find_spec(m) is not None}


def _split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config X`, `--config=X` and `--config.k=v` from the other arguments."""
    rest, config_args = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            config_args.append(f"--config={argv[i + 1]}")
            i += 2
            continue
        if a.startswith("--config=") or a.startswith("--config."):
            if "=" not in a and i + 1 < len(argv):  # `--config.k v`
                a = f"{a}={argv[i + 1]}"
                i += 1
            config_args.append(a)
        else:
            rest.append(a)
        i += 1
    return rest, config_args


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="clipjax",
        description="Pretrain, evaluate and use CLIP-style image-text models in JAX.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, mod in _available().items():
        modules[name] = mod
        sub.add_parser(name, help=_help_line(mod), add_help=False)
    return parser, modules


def _constant(mod: str, name: str) -> str:
    """A module's `NAME = value` line, read without importing it (imports may be heavy)."""
    spec = importlib.util.find_spec(mod)
    try:
        with open(spec.origin, encoding="utf-8") as f:
            for line in f:
                if line.startswith(f"{name} = "):
                    return line.split("=", 1)[1].split("  #")[0].strip().strip("\"'")
    except OSError:
        pass
    return ""


def _help_line(mod: str) -> str:
    return _constant(mod, "HELP")


def _takes_config(mod: str) -> bool:
    return _constant(mod, "TAKES_CONFIG") == "True"


def command_parser(name: str, module) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"clipjax {name}", description=getattr(module, "HELP", None), allow_abbrev=False)
    module.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """The console script. Called with `argv` (tests), it never re-executes the process."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, modules = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        from clipjax import __version__

        print(f"clipjax {__version__}")
        return 0
    name = argv[0]
    if name not in modules:
        parser.print_usage(sys.stderr)
        print(f"clipjax: error: unknown command {name!r}; choose from {', '.join(modules)}",
              file=sys.stderr)
        return 2
    if from_shell:
        from clipjax import runtime

        runtime.configure_process()
    module = importlib.import_module(modules[name])
    rest, config_args = _split_config_args(argv[1:])
    if config_args and not getattr(module, "TAKES_CONFIG", False):
        flag = config_args[0].split("=", 1)[0]
        print(f"clipjax {name}: error: {flag}: this command takes no config "
              "(the commands that do: "
              f"{', '.join(n for n, m in modules.items() if _takes_config(m))})",
              file=sys.stderr)
        return 2
    args = command_parser(name, module).parse_args(rest)
    args.config_args = config_args
    from clipjax.errors import ClipjaxError

    try:
        return int(module.run(args) or 0)
    except ClipjaxError as e:
        print(f"clipjax {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"clipjax {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path the user gave that cannot be read or written: one line
        if not e.filename or e.strerror is None:
            return _unexpected(name, e)
        target = f" -> {e.filename2}" if e.filename2 else ""
        print(f"clipjax {name}: error: {e.filename}{target}: {e.strerror}", file=sys.stderr)
        return 1
    except Exception as e:
        return _unexpected(name, e)


def _unexpected(name: str, e: BaseException) -> int:
    """A bug: one line here, the traceback in a file."""
    path = _write_traceback(name)
    print(f"clipjax {name}: unexpected error: {type(e).__name__}: {e} "
          f"(full traceback in {path})", file=sys.stderr)
    return 1


def _write_traceback(name: str) -> str:
    with tempfile.NamedTemporaryFile("w", prefix=f"clipjax-{name}-", suffix=".traceback",
                                     delete=False) as f:
        f.write(f"clipjax {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exc(file=f)
        return f.name


if __name__ == "__main__":
    sys.exit(main())
