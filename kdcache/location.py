"""Where a cache lives: a local directory or an fsspec URL (`s3://bucket/cache.zarr`, `gs://...`, `memory://...`).

    if location.exists(out) and location.holds_zarr_group(out):
        location.remove(out)

The one place that tells "local" from "URL" for the cache side; zarr opens both (a URL through
`zarr.storage.FsspecStore`), so only existence, deletion and naming need this module. Credentials come from the
environment or fsspec's config (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL, ~/.aws, FSSPEC_S3_*),
never from the URL: a URL holding `user:password@` is refused, since caches record their inputs and runs record their
cache in config.json.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlsplit


class LocationError(ValueError):
    """A path or URL that kdcache will not use; the message names the option."""


def is_url(path: str) -> bool:
    """An fsspec URL (`protocol://...`), as opposed to a local path."""
    return "://" in str(path)


def check_location(path: str, what: str) -> str:
    """`path` unchanged, unless it is a URL carrying a password, which is refused naming `what` (the option)."""
    if is_url(path):
        userinfo, at, _ = urlsplit(str(path)).netloc.rpartition("@")
        if at and ":" in userinfo:
            raise LocationError(f"{what}: the URL holds credentials (user:password@); give them through the "
                                "environment or fsspec's config instead, so they are never recorded")
    return str(path)


def _fs(path: str):
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(str(path))
    except (ValueError, ImportError) as e:  # an unknown protocol, or its fsspec package (s3fs, gcsfs) not installed
        raise LocationError(f"{path}: {e}") from None
    fs.invalidate_cache(root)  # another process may have written or deleted objects since this one last listed
    return fs, root


def exists(path: str) -> bool:
    """Whether anything is at `path`: a file, a non-empty directory, or any object under the URL's prefix."""
    if not is_url(path):
        p = Path(path)
        return any(p.iterdir()) if p.is_dir() else p.exists()
    fs, root = _fs(path)
    try:
        return bool(fs.ls(root, detail=False))
    except FileNotFoundError:
        return False
    except Exception as e:  # an endpoint that cannot be reached, a permission refused: one line, not a traceback
        raise LocationError(f"{path}: cannot list the store ({type(e).__name__}: {e})") from None


def holds_zarr_group(path: str) -> bool:
    """Whether `path` is the root of a zarr group (has a top-level zarr.json)."""
    if not is_url(path):
        return (Path(path) / "zarr.json").is_file()
    fs, root = _fs(path)
    return fs.exists(f"{root.rstrip('/')}/zarr.json")


def remove(path: str) -> None:
    """Delete the directory tree or every object under the URL's prefix (through fsspec)."""
    if not is_url(path):
        shutil.rmtree(path)
        return
    fs, root = _fs(path)
    fs.rm(root, recursive=True)


def store_location(store) -> str:
    """How a zarr store names where it is: a local path, or the URL of an fsspec-backed store."""
    if hasattr(store, "root"):  # LocalStore
        return str(store.root)
    fs = getattr(store, "fs", None)
    if fs is not None and hasattr(store, "path"):
        return fs.unstrip_protocol(store.path)
    return str(store)
