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
