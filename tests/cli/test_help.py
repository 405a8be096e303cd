"""Every subcommand's --help shows at least one example, and every option and argument says what it does."""

from __future__ import annotations

import typer

from ragloop.cli import app, main


def _commands(cmd, path=()):
    subs = getattr(cmd, "commands", None)
    if subs:
        for name, sub in subs.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, cmd


def test_every_command_has_an_example_and_every_option_a_help_text():
    root = typer.main.get_command(app)
    found = list(_commands(root))
    assert len(found) >= 18  # the tree was walked (generate ... rlaif label)
    no_example, no_help = [], []
    for path, cmd in found:
        if "Example" not in (cmd.help or "") + (cmd.epilog or ""):
            no_example.append(" ".join(path))
        for p in cmd.params:
            if p.param_type_name in ("option", "argument") and not (getattr(p, "help", None) or "").strip():
                if p.name != "help":
                    no_help.append(f"{' '.join(path)} {p.opts[0]}")
    assert no_example == [], f"commands without an example in --help: {no_example}"
    assert no_help == [], f"options/arguments without a help text: {no_help}"


def test_help_output_shows_the_examples(capsys):
    assert main(["ask", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out and "ragloop ask" in out and "--no-log" in out
    assert main(["index", "--help"]) == 0
    out = capsys.readouterr().out
    assert "ragloop index --list" in out and "--delete" in out
