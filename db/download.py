"""Fetch public datasets from their official addresses into ``$CFB_HOME/data`` (never into the repo).

A download goes to ``NAME.zip.part``, is checked (size, checksum), unpacked into a hidden temporary
folder next to the destination, and only then renamed to ``$CFB_HOME/data/NAME``: an interrupted or
corrupt download never leaves a folder that looks complete (leftovers are cleared by the next try).
One process downloads a dataset at a time (on POSIX, a lock file beside it): a second waits, then
finds the copy; a copy already there is used without writing anything.

Checksums: GroupLens publishes an MD5 beside each zip (``ml-25m.zip.md5``). The MD5s of the releases
that never change (100k, 1M, 10M, 25M) are pinned here; for 32M and latest-small the ``.md5`` file is
fetched from beside the archive before it (latest-small is regenerated from time to time). goodbooks-10k has no
published checksum: pass ``sha256`` to check it, else its SHA-256 is only recorded. Each copy's
address, MD5, SHA-256 and how it was verified are written to ``.cfb-download.json`` in its folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from ..cf_core.errors import CfbError
from .engine import cfb_home

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
SOURCES = {
    # name: (official address, folder inside the zip, file that marks a complete copy)
    "movielens-100k": (f"{GROUPLENS}/ml-100k.zip", "ml-100k", "u.data"),
    "movielens-1m": (f"{GROUPLENS}/ml-1m.zip", "ml-1m", "ratings.dat"),
    "movielens-10m": (f"{GROUPLENS}/ml-10m.zip", "ml-10M100K", "ratings.dat"),
    "movielens-25m": (f"{GROUPLENS}/ml-25m.zip", "ml-25m", "ratings.csv"),
    "movielens-32m": (f"{GROUPLENS}/ml-32m.zip", "ml-32m", "ratings.csv"),
    "movielens-latest-small": (f"{GROUPLENS}/ml-latest-small.zip", "ml-latest-small", "ratings.csv"),
    "goodbooks-10k": ("https://github.com/zygmuntz/goodbooks-10k/releases/download/v1.0/goodbooks-10k.zip",
                      "", "ratings.csv"),
}
# "md5:<hex>" / "sha256:<hex>": pinned; "url:<address>": an MD5 file published beside the archive; None: none
CHECKSUMS: dict[str, str | None] = {
    # GroupLens's published ml-*.zip.md5 values for the frozen releases
    "movielens-100k": "md5:0e33842e24a9c977be4e0107933c0723",
    "movielens-1m": "md5:c4d9eecfca2ab87c1945afe126590906",
    "movielens-10m": "md5:ce571fd55effeba0271552578f2648bd",
    "movielens-25m": "md5:6b51fb2759a8657d3bfcbfc42b592ada",
    "movielens-32m": f"url:{GROUPLENS}/ml-32m.zip.md5",
    "movielens-latest-small": f"url:{GROUPLENS}/ml-latest-small.zip.md5",
    "goodbooks-10k": None,
}
INGEST = {name: "goodbooks" if name.startswith("goodbooks") else "movielens" for name in SOURCES}
STAMP = ".cfb-download.json"
CHUNK = 1 << 20


def _find_marker(root: Path, inner: str, marker: str) -> Path | None:
    """The folder holding ``marker``: ``root/inner``, else ``root`` or one level below."""
    for folder in ([root / inner] if inner else []) + [root] + sorted(p for p in root.glob("*") if p.is_dir()):
        if (folder / marker).is_file():
            return folder
    return None


def _clear_leftovers(base: Path, name: str) -> None:
    """Remove what an interrupted earlier try left: the ``.part`` file and temporary folders."""
    (base / f"{name}.zip.part").unlink(missing_ok=True)
    for tmp in base.glob(f".{name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _one_download_at_a_time(base: Path, name: str, progress=None):  # noqa: ANN001, ANN202
    """Hold an exclusive lock on ``base/.NAME.lock``, waiting (and saying so when ``progress``) for
    another process that holds it: two downloads of one dataset at once cleared each other's temporary
    files and could rename an incomplete folder into place. POSIX only; a filesystem that cannot lock
    (NFS without a lock daemon) downloads without it."""
    try:
        import fcntl
    except ImportError:  # (Windows: no lock)
        yield
        return
    try:
        fd = os.open(base / f".{name}.lock", os.O_RDONLY | os.O_CREAT, 0o666)  # (flock needs no write access)
    except OSError as e:
        raise _cannot(f"download {name}", base, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another download of {name} to finish", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # (no locks on this filesystem)
            pass
        yield
    finally:
        os.close(fd)  # (releases the lock)


class _WriteError(Exception):
    """Writing the downloaded bytes here failed (a full disk), as opposed to fetching them."""


def _one_line(reason) -> str:  # noqa: ANN001
    return " ".join(str(reason).split())


def _cannot(doing: str, base: Path, error: OSError | str) -> CfbError:
    """The one-line error for a local write that failed, with the advice its cause calls for: a full
    disk (free some space), a folder that cannot be written (another CFB_HOME), or, unpacking, an
    archive whose entries cannot be laid out (a file where its folder should be: a malformed archive)."""
    import errno

    code = error.errno if isinstance(error, OSError) else None
    reason = _one_line(error.strerror or error) if isinstance(error, OSError) else _one_line(error)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        advice = "free some space, or set CFB_HOME to another folder"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM) or not doing.startswith("unpack"):
        advice = "set CFB_HOME to a folder you can write"
    else:
        advice = "the archive's entries cannot be laid out as files (a malformed archive)"
    return CfbError(f"cannot {doing} into {base} ({reason}): {advice}")


def _fetch(url: str, out, timeout: float, progress, hashes) -> tuple[int, int | None]:  # noqa: ANN001
    """Stream ``url`` into ``out``; returns (bytes read, Content-Length or None)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = progress(total) if progress else contextlib.nullcontext(None)
        got = 0
        with bar as b:
            while chunk := resp.read(CHUNK):
                try:
                    out.write(chunk)
                except OSError as e:
                    raise _WriteError(e) from None
                for h in hashes:
                    h.update(chunk)
                got += len(chunk)
                if b is not None:
                    b.update(len(chunk))
    return got, total


class _NoChecksum(Exception):
    """The published checksum could not be had (not fetched, or no MD5 in what came)."""


def _published_md5(url: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read(4096).decode("ascii", "replace")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise _NoChecksum(f"could not fetch the checksum {url} ({_one_line(getattr(e, 'reason', e))})") from None
    m = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if not m:
        raise _NoChecksum(f"no MD5 in the checksum file {url}")
    return m.group(0).lower()


def _published_checksum(name: str, expected_sha256: str | None, timeout: float) -> str | None:
    """The MD5 published beside the archive, where the dataset has one (``url:`` in ``CHECKSUMS``):
    fetched before the archive, so that a checksum that cannot be had costs no download. Without it
    (and without ``expected_sha256``, which verifies the archive alone) the download is refused."""
    pin = CHECKSUMS.get(name)
    if not (pin and pin.startswith("url:")):
        return None
    try:
        return _published_md5(pin[4:], timeout)
    except _NoChecksum as e:
        if expected_sha256:
            return None
        raise CfbError(f"{e}; pass the archive's SHA-256 (--sha256) to verify it instead") from None


def _verify(name: str, md5: str, sha256: str, expected_sha256: str | None, published_md5: str | None) -> str:
    """Check the archive's digests; returns how it was verified."""
    checks = []
    if expected_sha256:
        checks.append(("sha256", expected_sha256.lower(), sha256, "the given SHA-256"))
    pin = CHECKSUMS.get(name)
    if pin and pin.startswith("url:"):
        if published_md5 is not None:
            checks.append(("md5", published_md5, md5, pin[4:]))
    elif pin:
        kind, value = pin.split(":", 1)
        checks.append((kind, value, md5 if kind == "md5" else sha256, f"the pinned {kind.upper()}"))
    for kind, want, got, what in checks:
        if want != got:
            raise CfbError(f"{name}: checksum mismatch ({kind} {got}, expected {want} from {what}); "
                           "the download is corrupt or the file has changed")
    return ", ".join(f"{kind} = {what}" for kind, _, _, what in checks) or "none (no published checksum)"


def download(name: str, cache: Path | None = None, timeout: float = 30, progress=None,  # noqa: ANN001
             sha256: str | None = None) -> Path:
    """The dataset's folder, downloading, verifying and unpacking it first if it is not cached.

    ``progress(total_bytes_or_None)`` returns a context manager whose ``update(n)`` is called per chunk
    (e.g. a click progress bar)."""
    if name not in SOURCES:
        raise CfbError(f"unknown dataset {name!r} (known: {', '.join(SOURCES)})")
    if sha256 is not None and (len(sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha256)):
        raise CfbError(f"--sha256 {sha256!r} is not a SHA-256 (64 hexadecimal digits)")
    base = Path(cache or cfb_home() / "data")
    root = base / name
    found = _cached_copy(root, name, sha256)  # (a copy there is used without writing: a read-only folder serves)
    if found is not None:
        return found
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CfbError(f"cannot create the data folder {base} ({e.strerror or e}): set CFB_HOME to a writable "
                       "folder") from None
    with _one_download_at_a_time(base, name, progress):
        found = _cached_copy(root, name, sha256)  # (another process's download, finished while this one waited)
        return found if found is not None else _download_unlocked(name, base, root, timeout, progress, sha256)


def _cached_copy(root: Path, name: str, sha256: str | None) -> Path | None:
    """The complete copy already at ``root``, if any (an empty folder there is removed); one that holds
    something else is refused, never deleted, as are a copy that cfb did not record as its download
    and a copy whose recorded SHA-256 is not ``sha256``."""
    _, inner, marker = SOURCES[name]
    if (root.is_symlink() and not root.exists()) or (root.exists() and not root.is_dir()):
        raise CfbError(f"{root} exists and is not a folder: move it away to download {name}")
    if not root.is_dir():
        return None
    found = _find_marker(root, inner, marker)
    if found is None:
        if any(root.iterdir()):  # not a copy cfb completed: the user's files, never deleted here
            raise CfbError(f"{root} exists and does not hold {name}: move it away, or ingest it with "
                           f"`cfb ingest {INGEST[name]} {root}`")
        if root.is_symlink():  # (a dataset put on another disk: the copy is renamed into place, not into it)
            raise CfbError(f"{root} is a link to an empty folder ({root.resolve()}): remove the link to download "
                           f"{name} here, or download it with CFB_HOME on that disk")
        root.rmdir()
        return None
    if not (found / STAMP).is_file():  # (an unzip by hand, maybe cut short: never vouched for as a download)
        raise CfbError(f"{root} holds {name}'s files but no record of a download by cfb ({STAMP}): ingest them "
                       f"with `cfb ingest {INGEST[name]} {found}`, or move the folder away to download {name}")
    if sha256 is not None:
        try:
            recorded = json.loads((found / STAMP).read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != sha256.lower():
            said = f"its recorded SHA-256 is {recorded}, not" if recorded else "it has no recorded SHA-256 to compare with"
            raise CfbError(f"{root} holds a copy of {name}, but {said} the given {sha256.lower()}: "
                           "move it away to download it again")
    return found


def _download_unlocked(name: str, base: Path, root: Path, timeout: float, progress,  # noqa: ANN001
                       sha256: str | None) -> Path:
    """Fetch, verify, unpack and rename into place (the caller holds the dataset's lock)."""
    url, inner, marker = SOURCES[name]
    _clear_leftovers(base, name)
    published_md5 = _published_checksum(name, sha256, timeout)
    part = base / f"{name}.zip.part"
    tmp = base / f".{name}.{os.getpid()}.tmp"  # (unique while the lock is held; made as the umask allows)
    try:
        md5, sha = hashlib.md5(), hashlib.sha256()
        try:
            out = open(part, "wb")
        except OSError as e:
            raise _cannot(f"write the download of {name}", base, e) from None
        try:
            with out:
                try:
                    got, total = _fetch(url, out, timeout, progress, (md5, sha))
                # the network's: urllib wraps only what fails before the answer; a timeout or a reset while
                # reading it is a bare OSError (writing the file fails as a _WriteError)
                except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                    raise CfbError(f"could not download {name} from {url} ({_one_line(getattr(e, 'reason', e))}); "
                                   f"if you have the files, use `cfb ingest {INGEST[name]} PATH`") from None
        except _WriteError as e:
            raise _cannot(f"write the download of {name}", base, e.args[0]) from None
        except OSError as e:  # (closing the file: its last bytes could not be written)
            raise _cannot(f"write the download of {name}", base, e) from None
        if total is not None and got != total:
            raise CfbError(f"download of {name} from {url} stopped after {got} of {total} bytes; try again")
        verified = _verify(name, md5.hexdigest(), sha.hexdigest(), sha256, published_md5)
        try:
            tmp.mkdir()
            with zipfile.ZipFile(part) as z:
                z.extractall(tmp)
            found = _find_marker(tmp, inner, marker)
            if found is None:
                raise CfbError(f"{url} did not contain {inner + '/' if inner else ''}{marker}")
            (found / STAMP).write_text(json.dumps({"dataset": name, "url": url, "bytes": got, "md5": md5.hexdigest(),
                                                   "sha256": sha.hexdigest(), "verified_by": verified}, indent=1))
            os.replace(tmp, root)  # atomic: the folder appears complete or not at all
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
            # (RuntimeError: zipfile's word for an encrypted member, which needs a password)
            raise CfbError(f"{url} is not a valid zip archive ({_one_line(e)})") from None
        except OSError as e:
            raise _cannot(f"unpack {name}", base, e) from None
        return root / found.relative_to(tmp)
    finally:
        part.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # (nothing there once renamed into place)
