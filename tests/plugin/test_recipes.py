"""The README's CI recipes: the GitHub Actions job and the docker command run the
same commands as the rootless recipe, and the rootless recipe's test line runs a
downstream project's kvpfs tests in a user namespace (as an unprivileged user
where this machine's interpreter allows it, else as root)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.plugin.support import can_mount, kvpfs_processes, mounts_under, temp_entries

README = Path(__file__).resolve().parents[2] / "README.md"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
GITHUB_ONLY = ["sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"]


def recipe_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text.split("\n## CI recipes\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, re.S | re.M)


def commands() -> list[str]:
    [(_, block)] = [b for b in recipe_blocks() if b[0] == "sh" and "docker" not in b[1]]
    return block.splitlines()


def test_the_recipe_is_valid_shell() -> None:
    for kind, block in recipe_blocks():
        if kind == "sh":
            done = subprocess.run(["sh", "-n", "-c", block], capture_output=True, text=True, check=False)
            assert done.returncode == 0, (block, done.stderr)
    assert commands()[-1] == "unshare -U -r -m .venv/bin/python -m pytest"


def test_the_github_actions_job_runs_the_same_commands() -> None:
    yaml = pytest.importorskip("yaml")
    [(_, block)] = [b for b in recipe_blocks() if b[0] == "yaml"]
    workflow = yaml.safe_load(block)
    assert workflow[True] == ["push", "pull_request"]  # YAML 1.1 reads the key `on` as true
    steps = workflow["jobs"]["test"]["steps"]
    assert steps[0] == {"uses": "actions/checkout@v4"}
    runs = [line for step in steps[1:] for line in step["run"].splitlines() if line.strip()]
    assert runs == GITHUB_ONLY + commands()
    assert all(set(step) <= {"name", "run"} for step in steps[1:])


def test_the_docker_command_runs_the_same_commands_as_root() -> None:
    [(_, block)] = [b for b in recipe_blocks() if "docker run" in b[1]]
    argv = shlex.split(block)
    assert argv[:3] == ["docker", "run", "--rm"]
    options = " ".join(argv[: argv.index("sh")])
    for needed in ("--device /dev/fuse", "--cap-add SYS_ADMIN", "--security-opt apparmor:unconfined"):
        assert needed in options
    assert argv[argv.index("sh") : argv.index("sh") + 2] == ["sh", "-exc"]
    script = argv[argv.index("-exc") + 1]
    as_root = [c.removeprefix("sudo ").removeprefix("unshare -U -r -m ") for c in commands()]
    assert [line for line in script.splitlines() if line] == as_root


DOWNSTREAM = '''
import os
import subprocess

import pytest


def test_a_guest_tool_against_the_mount(kvpfs_mount):
    assert os.getuid() == 0  # root of the user namespace only
    (kvpfs_mount.root / "kvp/guest/Agent").write_text("ready\\n")
    assert subprocess.run(["cat", kvpfs_mount.root / "kvp/guest/Agent"], capture_output=True,
                          check=True).stdout == b"ready\\n"
    disk = kvpfs_mount.attach()
    assert (disk / "backend-state-name").read_text() == "Connected\\n"


def test_a_toolstack_script(kvpfs_xenstored, monkeypatch):
    kvpfs_xenstored.setenv(monkeypatch)
    subprocess.run(["xenstore-write", "/local/domain/1/data/x", "1"], check=True)
    assert kvpfs_xenstored.read("/local/domain/1/data/x") == b"1"


@pytest.mark.trio
async def test_trio(kvpfs_mount):
    assert "guest" in os.listdir(kvpfs_mount.root / "kvp")
    async with kvpfs_mount.xenstored.client() as client:
        assert await client.read("/local/domain/1/name") == b"guest1"
'''

PYPROJECT = '''
[project]
name = "guest-agent"
version = "1.0"

[project.optional-dependencies]
test = ["kvpfs", "pytest", "pytest-trio"]
'''


@pytest.mark.mount
@pytest.mark.skipif(can_mount() is not None, reason=str(can_mount()))
@pytest.mark.skipif(shutil.which("xenstore-write") is None, reason="xenstore-utils is not installed")
def test_the_rootless_line_runs_a_downstream_project() -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtual environment: no .venv to give the recipe")
    work = Path(tempfile.mkdtemp(prefix="kvpfs-recipe-", dir="/tmp"))
    try:
        project, tmp = work / "project", work / "tmp"
        project.mkdir()
        tmp.mkdir()
        (project / "pyproject.toml").write_text(PYPROJECT)
        (project / "test_agent.py").write_text(DOWNSTREAM)
        (project / ".venv").symlink_to(sys.prefix)
        os.chmod(work, 0o755)
        probe = subprocess.run(
            [*NOBODY, "unshare", "-U", "-r", "-m", str(project / ".venv/bin/python"), "-c",
             "import kvpfs.pytest_plugin, pytest_trio"],
            capture_output=True, check=False,
        )
        prefix: list[str] = []
        if probe.returncode == 0:
            prefix = NOBODY
            for path in (work, project, tmp, project / "pyproject.toml", project / "test_agent.py"):
                os.lchown(path, 65534, 65534)
        print("running the recipe as", "nobody" if prefix else "root (the interpreter is private)")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS", "XENSTORED_PATH")}
        env["TMPDIR"] = str(tmp)
        before = temp_entries(Path("/tmp"))
        done = subprocess.run(
            [*prefix, *shlex.split(commands()[-1]), "-p", "no:cacheprovider"],
            cwd=project, env=env, capture_output=True, text=True, timeout=150, check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.search(r"\b3 passed\b", done.stdout), done.stdout
        assert mounts_under(work) == []
        assert kvpfs_processes(work) == []
        assert temp_entries(tmp) == set()
        assert temp_entries(Path("/tmp")) - before == set()
    finally:
        shutil.rmtree(work, ignore_errors=True)
