"""Every `modformer bench NAME --help` explains itself (issue 26): help text for every option, its defaults, and an
example command. Only ``--help`` runs: nothing is trained or timed."""

from __future__ import annotations

import importlib
import re

import pytest

from modformer.bench.registry import ENTRIES

OPTION = re.compile(r"^  -")             # an option's invocation line (help continuation lines sit further in)


def options_without_help(page: str) -> list[str]:
    """Invocation lines of ``page`` (argparse help) with no help text on the same or the next line."""
    lines = page.splitlines()
    missing = []
    for i, line in enumerate(lines):
        if not OPTION.match(line):
            continue
        if len(re.split(r"\s{2,}", line.strip(), maxsplit=1)) == 2:     # "-x, --xx X   help"
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not nxt.strip() or OPTION.match(nxt) or len(nxt) - len(nxt.lstrip()) <= 2:
            missing.append(line.strip())
    return missing


def test_options_without_help_reads_argparse_pages():
    page = ("options:\n  -h, --help            show this help message and exit\n  --seed SEED\n"
            "  --a-very-long-option-name A_VERY_LONG_OPTION_NAME\n                        its help\n  --last\n")
    assert options_without_help(page) == ["--seed SEED", "--last"]


def help_page(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_bench_entry_help_explains_every_option(name, capsys):
    main = importlib.import_module(ENTRIES[name].module_path).main
    pages = {name: help_page(main, ["--help"], capsys)}
    if name == "stability":                                  # its two sub-commands have their own options
        pages.update({f"{name} {sub}": help_page(main, [sub, "--help"], capsys) for sub in ("speed", "depth")})
    for label, page in pages.items():
        assert page.startswith(f"usage: modformer bench {label}"), page[:80]
        assert not options_without_help(page), f"{label}: options without help: {options_without_help(page)}"
        assert "example" in page.lower(), f"{label}: no example in its help"
        assert f"modformer bench {label}" in page.split("xample", 1)[1], f"{label}: the example is not a command"
        if any(OPTION.match(line) and not line.strip().startswith("-h") for line in page.splitlines()):
            assert "(default: " in page, f"{label}: help shows no defaults"
