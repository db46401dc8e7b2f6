"""One writer per cache and per run directory: an exclusive lock file next to what is written.

    with WriterLock("cache.zarr", what="cache"):      # the lock is cache.zarr.lock
        ...                                           # delete, create, write: nobody else can

`kdcache build` holds the lock of its `--out` cache (under torchrun, rank 0 only) from before anything is deleted or
written until it exits, errors and Ctrl-C included; `kdcache train` (and online training, the same loop) holds the lock
of its run directory. The lock is a small JSON file, `OUT.lock`, next to `OUT` (not inside it: `--overwrite` deletes
`OUT`, and a run directory's "is it empty?" check must not see it). It records the holder: host, pid, the process's
start time and the machine's boot id (from /proc, where there is one), the command, when it was taken, and a random
token that tells two holders apart.

A second writer is refused with one line naming the holder. A lock left by a crash (kill -9, power cut of the process)
is *stale* when it was taken on this host and its process is gone: the pid is not alive, or it is alive but started at
another time (the pid was reused) or the machine rebooted since. A stale lock is taken over with a log line, so
`--resume` after a kill -9 just works. A lock taken on another host cannot be checked from here: it is treated as held,
and the message says which file to delete once you know that process is gone.

What is guaranteed:

- Local disk (and any POSIX file system with atomic hard links or O_EXCL, NFSv3+ included): creation is atomic; the
  lock's content appears whole (written to a temporary file, then hard-linked to the lock's name, which fails if the
  name exists). Taking over a stale lock is serialised between processes of one host by `flock` on the parent folder,
  and re-checks the lock is the same stale one before deleting it. Exactly one writer holds the lock at a time.
- fsspec URLs (object stores: s3://, gs://, ...): an object cannot be created "only if absent" through fsspec, so the
  lock is best-effort: check that no lock exists, write ours, wait `SETTLE_S` seconds, read it back and go on only if it
  is still ours (a writer that finds another's token refuses and leaves it). This excludes a second writer provided
  the store reads back what was last written (read-after-write consistency, as S3 and GCS give today) and each
  contender's time from its existence check to its write is shorter than SETTLE_S; two writers starting within the
  same few milliseconds on a slow store could both proceed. Stale detection works as on local disk.
- Nothing here survives a power loss (no fsync), and a holder frozen (SIGSTOP) is alive: it keeps its lock.

A shared module: it imports no stage, so the build and the training loop both use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".lock"
SETTLE_S = 1.0                  # object stores: wait before reading a written lock back (see the module docstring)
UNREADABLE_GRACE_S = 10.0       # a lock file that cannot be parsed is taken as being written for this long
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class LockError(ValueError):
    """The lock is held by another writer, or cannot be taken; the message names the holder or the path."""


# ------------------------------------------------------------------------------------------------------ the holder

@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file records it."""

    host: str
    pid: int
    command: str
    started: float                 # time.time() when the lock was taken
    token: str                     # random, tells two acquisitions apart (also two by one process)
    pid_start: str | None = None   # /proc/PID/stat start time (clock ticks since boot): catches pid reuse
    boot_id: str | None = None     # /proc boot id: a lock from before a reboot is stale

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"`{self.command}` (pid {self.pid} on {self.host}, since {since})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Holder:
        d = json.loads(text)
        return cls(host=str(d["host"]), pid=int(d["pid"]), command=str(d["command"]), started=float(d["started"]),
                   token=str(d["token"]), pid_start=d.get("pid_start"), boot_id=d.get("boot_id"))


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _pid_start(pid: int) -> str | None:
    """The process's start time since boot (field 22 of /proc/PID/stat), or None where there is no /proc."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name (field 2) may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def _boot_id() -> str | None:
    text = _read_text(_BOOT_ID)
    return text.strip() if text else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return False
    return True


def current_command() -> str:
    """This process's command line, as a person would type it (shortened to 300 characters)."""
    argv = [os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    if argv[0] in ("main.py", "__main__.py"):
        argv[0] = "kdcache"
    text = " ".join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def new_holder(command: str | None = None) -> Holder:
    pid = os.getpid()
    return Holder(host=socket.gethostname(), pid=pid, command=command or current_command(), started=time.time(),
                  token=uuid.uuid4().hex, pid_start=_pid_start(pid), boot_id=_boot_id())


def is_stale(h: Holder) -> bool | None:
    """True when the holder is gone (same host: rebooted since, pid dead, or pid reused), False when it is alive,
    None when it cannot be told from here (another host)."""
    if h.host != socket.gethostname():
        return None
    boot = _boot_id()
    if h.boot_id and boot and h.boot_id != boot:
        return True
    if not _pid_alive(h.pid):
        return True
    now = _pid_start(h.pid)
    return bool(h.pid_start and now and now != h.pid_start)


def lock_path(target: str | os.PathLike) -> str:
    """Where the lock of `target` (a cache or a run directory, a local path or an fsspec URL) lives: `TARGET.lock`."""
    t = str(target)
    if "://" in t:
        body = t.split("://", 1)[1].strip("/")
        if "/" not in body:
            raise LockError(f"{t}: name a folder inside the bucket, not the bucket itself (its lock goes next to it)")
        return t.rstrip("/") + SUFFIX
    p = Path(t).absolute()
    if p.parent == p:
        raise LockError(f"{t}: a file-system root cannot be locked; choose a folder inside it")
    return str(p) + SUFFIX


# ------------------------------------------------------------------------------------------------- the lock files

class _Local:
    """A lock file on a POSIX file system: atomic creation (hard link, or O_EXCL where links are not supported)."""

    def __init__(self, path: str):
        self.path = path

    def create(self, holder: Holder) -> bool:
        """Create the lock with `holder`'s content; False if it exists."""
        parent = Path(self.path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LockError(f"cannot create the lock {self.path}: {e.strerror or e}") from None
        tmp = f"{self.path}.{holder.pid}.{holder.token[:8]}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(holder.to_json())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some FUSE/SMB mounts): O_EXCL, whose content appears in two steps
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(holder.to_json())
                return True
        except OSError as e:
            raise LockError(f"cannot create the lock {self.path}: {e.strerror or e}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def read(self) -> tuple[str | None, float]:
        """(text, age in seconds) of the lock file; (None, 0) when there is none."""
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None, 0.0
        return _read_text(self.path), age

    def remove_if(self, token: str | None) -> bool:
        """Delete the lock if it still has `token` (None: if it is still unreadable), under an flock of the parent
        folder so that two processes taking over one stale lock cannot delete each other's new lock."""
        with _flocked(Path(self.path).parent):
            ok = _holds_token(self.read()[0], token)
            if ok:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            return ok

    def sweep(self) -> None:
        """Remove temporary files a process killed while creating the lock left next to it."""
        p = Path(self.path)
        for tmp in p.parent.glob(p.name + ".*.tmp"):
            try:
                pid = int(tmp.name[len(p.name) + 1:].split(".", 1)[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                with contextlib.suppress(OSError):
                    tmp.unlink()


@contextlib.contextmanager
def _flocked(folder: Path):
    try:
        import fcntl
    except ImportError:  # no flock on this platform: the token re-check alone
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


class _Remote:
    """A lock object on an fsspec store: best effort (see the module docstring)."""

    def __init__(self, url: str):
        import fsspec

        self.path = url
        self.fs, self.key = fsspec.core.url_to_fs(url)

    def create(self, holder: Holder) -> bool:
        if self.fs.exists(self.key):
            return False
        self.fs.pipe_file(self.key, holder.to_json().encode())
        time.sleep(SETTLE_S)
        text, _ = self.read()
        if text is None:
            return False
        try:
            return Holder.from_json(text).token == holder.token
        except (ValueError, KeyError, TypeError):
            return False

    def read(self) -> tuple[str | None, float]:
        try:
            return self.fs.cat_file(self.key).decode(), 0.0
        except FileNotFoundError:
            return None, 0.0

    def remove_if(self, token: str | None) -> bool:
        ok = _holds_token(self.read()[0], token)
        if ok:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.key)
        return ok

    def sweep(self) -> None:
        pass


def _files(target: str | os.PathLike) -> _Local | _Remote:
    path = lock_path(target)
    return _Remote(path) if "://" in path else _Local(path)


def _parse(text: str) -> Holder | None:
    try:
        return Holder.from_json(text)
    except (ValueError, KeyError, TypeError):
        return None


def holder_of(target: str | os.PathLike) -> Holder | None:
    """The recorded holder of `target`'s lock (alive or not), or None when there is no readable lock."""
    text, _ = _files(target).read()
    return _parse(text) if text is not None else None


def live_holder(target: str | os.PathLike) -> Holder | None:
    """The holder of `target`'s lock unless there is none or it is provably gone (stale)."""
    h = holder_of(target)
    return h if h is not None and is_stale(h) is not True else None


# ------------------------------------------------------------------------------------------------------- the lock

class WriterLock:
    """The exclusive writer lock of a cache or run directory; a context manager. `what` names the target in messages
    ("cache", "run directory"); `command` is recorded (default: this process's command line)."""

    def __init__(self, target: str | os.PathLike, *, what: str, command: str | None = None):
        self.target, self.what, self.command = str(target), what, command
        self.files = _files(target)
        self.holder: Holder | None = None
        self._owner_pid: int | None = None

    @property
    def path(self) -> str:
        return self.files.path

    def acquire(self) -> WriterLock:
        """Take the lock, taking over a stale one (logged); LockError naming a live holder."""
        me = new_holder(self.command)
        for _ in range(20):
            if self.files.create(me):
                self.holder, self._owner_pid = me, os.getpid()
                self.files.sweep()
                return self
            text, age = self.files.read()
            if text is None:  # released between our attempt and the read: try again
                continue
            h = _parse(text)
            if h is None:
                if age < UNREADABLE_GRACE_S:  # being written by an O_EXCL creator, or a store still settling
                    time.sleep(0.2)
                    continue
                log.warning("%s: removing an unreadable lock file %s (%.0f s old)", self.target, self.path, age)
                self.files.remove_if(None)
                continue
            stale = is_stale(h)
            if stale is True:
                if self.files.remove_if(h.token):
                    log.warning("%s: took over the stale lock of %s, which is no longer running", self.target,
                                h.describe())
                continue
            if h.token == me.token:  # an object store that kept our write after all
                self.holder, self._owner_pid = me, os.getpid()
                return self
            other = "" if stale is False else (f"; it was taken on another host, so kdcache cannot tell whether it is "
                                               f"still running: if it is not, delete {self.path}")
            raise LockError(f"{self.what} {self.target} is in use by {h.describe()}: wait for it to finish, or choose "
                            f"another --out{other}")
        raise LockError(f"could not take the lock {self.path}: it kept changing; try again")

    def release(self) -> None:
        """Delete the lock if this process still holds it (a forked child never releases its parent's lock)."""
        if self.holder is None or self._owner_pid != os.getpid():
            return
        try:
            if not self.files.remove_if(self.holder.token):
                log.warning("%s: the lock %s was no longer ours when releasing it (deleted or taken over)",
                            self.target, self.path)
        except OSError as e:
            log.warning("%s: could not remove the lock %s: %s", self.target, self.path, e)
        finally:
            self.holder = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holds_token(text: str | None, token: str | None) -> bool:
    """Whether a lock's text is the holder with `token` (None: a lock whose text is unreadable); False when absent."""
    if text is None:
        return False
    try:
        return Holder.from_json(text).token == token
    except (ValueError, KeyError, TypeError):
        return token is None
