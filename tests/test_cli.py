"""The CLI: `clipjax --help` and every subcommand's `--help` work."""

import subprocess
import sys

import pytest

from clipjax import cli


def test_top_level_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli._available():
        assert name in out


@pytest.mark.parametrize("name", sorted(cli._available()))
def test_each_command_has_help(name):
    r = subprocess.run([sys.executable, "-m", "clipjax", name, "--help"], capture_output=True,
                       text=True, env={"CLIPJAX_ALLOCATOR": "system", "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr
    assert f"clipjax {name}" in r.stdout


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_config_arguments_are_split_off():
    rest, cfg = cli._split_config_args(
        ["--workdir", "w", "--config", "c.py:x", "--config.a.b=1", "--config.c", "2"])
    assert rest == ["--workdir", "w"]
    assert cfg == ["--config=c.py:x", "--config.a.b=1", "--config.c=2"]


@pytest.mark.parametrize("argv, flag", [
    (["embed", "--images", "x", "--workdir", "w", "--out", "o", "--config.k=1"], "--config.k"),
    (["demo", "--config", "configs/tiny.py"], "--config"),
])
def test_a_command_without_a_config_refuses_config_flags(capsys, argv, flag):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"clipjax {argv[0]}: error: {flag}: this command takes no config" in err
    assert "train" in err and "eval" in err  # the commands that take one


def test_takes_config_is_read_without_importing():
    takes = {n for n, m in cli._available().items() if cli._takes_config(m)}
    assert {"train", "eval", "compile", "import"} <= takes
    assert not takes & {"embed", "search", "classify", "score", "export", "demo"}


def test_an_unexpected_exception_is_one_line_and_a_traceback_file(capsys, monkeypatch):
    from clipjax.commands import export

    def broken(args):
        raise ValueError("a bug in the command")

    monkeypatch.setattr(export, "run", broken)
    assert cli.main(["export", "open_clip", "--workdir", "w", "--out", "o"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("clipjax export: unexpected error: ValueError: a bug in the command")
    path = err.split("full traceback in ")[1].rstrip(")")
    with open(path) as f:
        text = f.read()
    assert "Traceback" in text and "a bug in the command" in text


MODEL_COMMANDS = ["train", "eval", "export", "demo", "embed", "search", "classify",
                  "calibrate", "score"]


def _parser(name):
    import importlib

    return cli.command_parser(name, importlib.import_module(cli.COMMANDS[name]))


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_every_command_names_its_model_or_run_with_workdir(name):
    options = {s for a in _parser(name)._actions for s in a.option_strings}
    assert "--workdir" in options
    if name not in ("train", "demo"):  # these two create the workdir; the rest load a model
        assert "--step" in options


def test_progress_is_spelled_one_way_everywhere():
    from clipjax.commands import flags

    required = {"embed": ["--images", "x", "--out", "o"], "classify": ["--labels", "a,b", "x"],
                "calibrate": ["--labels", "a,b", "--folder", "d"]}
    for name in ("train", "eval", "embed", "classify", "calibrate", "score"):
        p = _parser(name)
        base = ["--workdir", "w", *required.get(name, [])]
        for extra, want in (([], "auto"), (["--progress"], "on"), (["--progress", "off"], "off"),
                            (["--no-progress"], "off")):
            args, _ = p.parse_known_args(base + extra)
            assert args.progress == want, (name, extra)
        args, _ = p.parse_known_args(base + ["--progress=on"])
        assert flags.progress(args) is True


def test_eval_takes_step_and_its_checkpoint_alias():
    p = _parser("eval")
    assert p.parse_args(["--workdir", "w", "--step", "all"]).checkpoint == "all"
    assert p.parse_args(["--model", "w", "--checkpoint", "8"]).checkpoint == "8"
