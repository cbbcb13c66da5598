"""Real programs edit KVP keys through the kernel; the pool file bytes are checked whole.

Whole-file comparisons prove what the issue demands: a set rewrites one record in
place (an existing key keeps its position, so nothing was deleted and re-added),
a new key is appended, a delete shifts later records up verbatim, and nothing
else in the file changes.
"""

from __future__ import annotations

import os
import shutil

import pytest
import trio

from tests.mount.kvp_fixtures import Pools, mount_kvp, rec
from tests.mounting import in_thread, nano_append, read_bytes, sh, write_bytes

pytestmark = pytest.mark.mount

VIM = "vim -N -u NONE -i NONE --noplugin -n --cmd 'set backupskip='"

ALPHA = rec(b"Alpha", b"one")
# Bytes after a NUL are leftovers the daemon never clears; they must survive
# untouched in records that kvpfs does not change.
BETA = rec(b"Beta", b"two\0stale-bytes")
GAMMA = rec(b"Gamma", b"three")


@pytest.fixture
def seeded(pools: Pools) -> Pools:
    pools.set_bytes("guest", ALPHA + BETA + GAMMA)
    return pools


async def test_cat_and_ls(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    assert (await sh(f"ls {kvp}")).stdout.split() == sorted(
        [b"auto", b"auto_external", b"auto_internal", b"external", b"guest"]
    )
    assert (await sh(f"ls {kvp}/guest")).stdout == b"Alpha\nBeta\nGamma\n"
    assert (await sh(f"cat {kvp}/guest/Beta")).stdout == b"two\n"
    listing = (await sh(f"ls -l {kvp}/guest/Alpha")).stdout
    assert listing.startswith(b"-rw-r--r-- 1 ") and b" 4 " in listing


async def test_echo_overwrites_in_place(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await sh(f"echo x > {kvp}/guest/Beta")
    assert seeded.bytes("guest") == ALPHA + rec(b"Beta", b"x") + GAMMA


async def test_new_key_is_appended(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await sh(f"echo new > {kvp}/guest/Delta")
    await sh(f"printf 'raw' > {kvp}/guest/Eps")
    assert seeded.bytes("guest") == ALPHA + BETA + GAMMA + rec(b"Delta", b"new") + rec(
        b"Eps", b"raw"
    )


async def test_append_redirect(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await sh(f"echo more >> {kvp}/guest/Alpha")
    assert seeded.bytes("guest") == rec(b"Alpha", b"one\nmore") + BETA + GAMMA


async def test_cp_and_cp_a(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await sh(f"cp {kvp}/guest/Gamma {kvp}/guest/G2 && cp -a {kvp}/guest/Alpha {kvp}/guest/A2")
    await sh(f"cat {kvp}/guest/Beta > {kvp}/guest/B2")
    assert seeded.bytes("guest") == ALPHA + BETA + GAMMA + rec(b"G2", b"three") + rec(
        b"A2", b"one"
    ) + rec(b"B2", b"two")


async def test_mv_renames_in_place_and_over(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await sh(f"mv {kvp}/guest/Alpha {kvp}/guest/Omega")
    assert seeded.bytes("guest") == rec(b"Omega", b"one") + BETA + GAMMA
    await sh(f"mv {kvp}/guest/Omega {kvp}/guest/Gamma")
    assert seeded.bytes("guest") == BETA + rec(b"Gamma", b"one")


async def test_rm_shifts_later_records_verbatim(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await sh(f"rm {kvp}/guest/Alpha")
    assert seeded.bytes("guest") == BETA + GAMMA


async def test_truncate(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await sh(f"truncate -s 2 {kvp}/guest/Alpha")
    assert seeded.bytes("guest") == rec(b"Alpha", b"on") + BETA + GAMMA


async def test_sed_in_place(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await sh(f"sed -i 's/three/3/' {kvp}/guest/Gamma")
    assert seeded.bytes("guest") == ALPHA + BETA + rec(b"Gamma", b"3")


@pytest.mark.parametrize("backupcopy", ["auto", "yes", "no"])
async def test_vim_save(mount, seeded: Pools, backupcopy: str) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await sh(f"{VIM} --cmd 'set backupcopy={backupcopy}' -c 's/one/uno/' -c wq {kvp}/guest/Alpha")
    # Still record 0: vim's rename-away never reached the pool.
    assert seeded.bytes("guest") == rec(b"Alpha", b"uno") + BETA + GAMMA
    assert (await sh(f"ls -A {kvp}/guest")).stdout == b"Alpha\nBeta\nGamma\n"


async def test_vim_new_key(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await sh(f"{VIM} -c 'normal ihello' -c wq {kvp}/guest/Fresh")
    assert seeded.bytes("guest") == ALPHA + BETA + GAMMA + rec(b"Fresh", b"hello")


async def test_vim_write_is_never_a_transient_delete(mount, seeded: Pools) -> None:
    """Sample the pool file while vim saves: the key is present in every sample."""
    _, kvp = await mount_kvp(mount, seeded)
    samples: list[bytes] = []
    done = trio.Event()

    async def sampler() -> None:
        while not done.is_set():
            samples.append(seeded.bytes("guest"))
            await trio.sleep(0.0005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        await sh(f"{VIM} -c 's/one/uno/' -c wq {kvp}/guest/Alpha")
        done.set()
    assert samples
    assert all(s[:5] == b"Alpha" and len(s) == 3 * 2560 for s in samples)


async def test_nano_save(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)
    await nano_append(f"{kvp}/guest/Gamma", "-3")
    assert seeded.bytes("guest") == ALPHA + BETA + rec(b"Gamma", b"three-3")


async def test_python_file_io(mount, seeded: Pools) -> None:
    _, kvp = await mount_kvp(mount, seeded)

    def edit() -> bytes:
        with open(f"{kvp}/guest/Beta", "w") as f:
            f.write("py\n")
        write_bytes(f"{kvp}/guest/Beta.tmp", b"replaced\n")
        os.replace(f"{kvp}/guest/Beta.tmp", f"{kvp}/guest/Gamma")
        return read_bytes(f"{kvp}/guest/Gamma")

    assert await in_thread(edit) == b"replaced\n"
    assert seeded.bytes("guest") == ALPHA + rec(b"Beta", b"py") + rec(b"Gamma", b"replaced")


async def test_other_pools_untouched(mount, seeded: Pools) -> None:
    before = seeded.snapshot()
    _, kvp = await mount_kvp(mount, seeded)
    await sh(f"echo x > {kvp}/guest/Beta && echo y > {kvp}/auto_internal/k")
    after = seeded.snapshot()
    for pool in ("external", "auto", "auto_external"):
        assert after[pool] == before[pool] == b""
    assert after["auto_internal"] == rec(b"k", b"y")


# Emacs decides at visit time to skip backups under temporary-file-directory,
# where pytest mounts: the predicate must be set before the file is visited.
EMACS_SETUP = (
    "(setq backup-enable-predicate (lambda (_) t) make-backup-files t "
    "backup-by-copying nil create-lockfiles t)"
)
EMACS_EDIT = '(progn (goto-char (point-min)) (end-of-line) (insert "-emacs") (save-buffer))'


async def test_emacs_batch_save(mount, seeded: Pools) -> None:
    if shutil.which("emacs") is None:
        pytest.skip("emacs is not installed (scripts/setup.sh --test installs emacs-nox)")
    _, kvp = await mount_kvp(mount, seeded)
    # Emacs's first save renames the file to k~ (its backup) and writes k anew,
    # with a .#k lock file meanwhile: only the one in-place update may reach the pool.
    await sh(
        ["emacs", "-Q", "--batch", "--eval", EMACS_SETUP, f"{kvp}/guest/Beta", "--eval", EMACS_EDIT],
        timeout=60,
    )
    assert seeded.bytes("guest") == ALPHA + rec(b"Beta", b"two-emacs") + GAMMA
    assert (await sh(f"ls -A {kvp}/guest")).stdout == b"Alpha\nBeta\nBeta~\nGamma\n"
