"""kvpfs(1), kvpfs-xenstored(8), kvpfs-hostsim(8): generated from the --help texts,
current, complete, rendered without warnings, readable with man."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvpfs
from kvpfs.manpages import PAGES, Page, option_names, read_help

#: The pages as the package ships them (a checkout's or an installed copy).
MAN = Path(kvpfs.__file__).resolve().parent / "man"

pytestmark = pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")


def page_file(page: Page) -> Path:
    return MAN / f"man{page.section}" / page.filename


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.filename)
def test_the_shipped_page_is_what_the_help_makes(page: Page) -> None:
    assert page_file(page).read_text() == page.render(), (
        "regenerate the pages: python -m kvpfs.manpages kvpfs/man"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.filename)
def test_every_option_is_in_both(page: Page) -> None:
    help_text = read_help(page.parser())
    flags = option_names(help_text)
    assert {"-h", "--help"} <= flags
    text = page_file(page).read_text().replace("\\-", "-")
    missing = sorted(f for f in flags if f not in text)
    assert missing == []
    # and the command's own --help, run as a user runs it, lists them too
    command = [sys.executable, "-m", "kvpfs", *page.name.split("-")[1:], "--help"]
    shown = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert sorted(f for f in flags if f not in shown) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.filename)
def test_groff_renders_without_warnings(page: Page) -> None:
    done = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(page_file(page))], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.filename)
def test_man_reads_it(page: Page) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    done = subprocess.run(
        ["man", "-l", str(page_file(page))], capture_output=True, text=True, check=True,
        env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"},
    )
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "SEE ALSO"):
        assert f"\n{heading}\n" in done.stdout
    assert page.summary.split()[0] in done.stdout


def test_man_finds_the_pages_in_the_environment_kvpfs_is_installed_in() -> None:
    """pip puts the pages in <prefix>/share/man, where man(1) looks for a bin/ on PATH."""
    installed = Path(sys.prefix) / "share" / "man" / "man1" / "kvpfs.1"
    if not installed.exists():
        pytest.skip("kvpfs is an editable checkout here; scripts/test checks an installed wheel")
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    found = subprocess.run(["man", "-w", "kvpfs"], env=env, capture_output=True, text=True, check=True)
    assert Path(found.stdout.strip()).resolve() == installed.resolve()
    page = subprocess.run(
        ["man", "kvpfs-xenstored"], env={**env, "MANPAGER": "cat", "MANWIDTH": "200"},
        capture_output=True, text=True, check=True,
    )
    assert "KVPFS-XENSTORED(8)" in page.stdout and "embedded xenstored" in page.stdout
