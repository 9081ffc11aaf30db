"""Fetch public datasets from their official addresses into ``$CFB_HOME/data`` (never into the repo)."""
from __future__ import annotations

import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from ..cf_core.errors import CfbError
from .engine import cfb_home

SOURCES = {
    # name: (official address, folder inside the zip, file that marks a complete copy)
    "movielens-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "ml-100k", "u.data"),
    "goodbooks-10k": ("https://github.com/zygmuntz/goodbooks-10k/releases/download/v1.0/goodbooks-10k.zip",
                      "", "ratings.csv"),
}
INGEST = {"movielens-100k": "movielens", "goodbooks-10k": "goodbooks"}


def download(name: str, cache: Path | None = None, timeout: float = 30) -> Path:
    """The dataset's folder, downloading and unpacking it first if it is not cached."""
    url, inner, marker = SOURCES[name]
    root = (cache or cfb_home() / "data") / name
    folder = root / inner if inner else root
    if (folder / marker).exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "download.zip.part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(archive, "wb") as out:
            shutil.copyfileobj(resp, out)
    except (urllib.error.URLError, OSError) as e:
        archive.unlink(missing_ok=True)
        raise CfbError(f"could not download {name} from {url} ({getattr(e, 'reason', e)}); if you have the files, "
                       f"use `cfb ingest {INGEST[name]} PATH`") from None
    with zipfile.ZipFile(archive) as z:
        z.extractall(root)
    archive.unlink()
    if not (folder / marker).exists():
        raise CfbError(f"{url} did not contain {inner}/{marker}")
    return folder
