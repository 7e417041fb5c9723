"""An inter-process exclusive lock on a path, so that work two processes both need is done once.

Every cache that trains or computes something expensive follows one pattern::

    with exclusive(final, "training uce 1a2b3c4d"):
        if finished(final):
            reuse it                  # another process made it while this one waited
        else:
            build it in a per-process staging folder, then rename that to final

A process that asks for a path another process holds waits, and says so on the ``duobench.locks`` logger,
as a warning so that it shows before logging is configured: "waiting for another process training uce
1a2b3c4d (lock held by pid 4242 on node7; lock file …)". The message repeats every five minutes, so a long
wait does not look like a hang. The per-process staging folder stays even with the lock. Where the lock
cannot exclude (see below), it keeps the result whole and only the work is duplicated.

**Mechanism: ``fcntl.flock`` on ``<path>.lock``.** The kernel drops a flock when its holder dies, ``kill -9``
included. A crashed run never blocks the next one, and no stale-lock guessing is needed (tested by
SIGKILLing a holder). The holder writes its pid and host into the file for the waiting message, and removes
the file when it releases the lock. A waiter may lock a file that was removed in the meantime; it then sees
that the file's inode differs from the path's and tries again, so two processes never hold locks on two
files of one name. Attempts are non-blocking and polled at most 1 s apart. That keeps the waiting messages
and a ``timeout`` possible, and avoids blocking NFS lock call-backs.

**Fallback: an ``O_CREAT | O_EXCL`` lock file.** It is used where ``fcntl`` is missing (Windows), where the
file system refuses flock (``ENOLCK``, ``ENOSYS``, ``EOPNOTSUPP``: a Lustre client mounted without
``-o flock``, for example; probed once per folder on a file of its own), or when ``DUOBENCH_LOCKS=lockfile`` asks
for it. The file's existence is the lock. It holds the holder's host, pid and a heartbeat counter, which a
daemon thread rewrites every 20 s. Nothing releases the file when its holder dies, so a waiter removes it
once the holder is certainly gone: either the holder is on the same host and its pid no longer exists (POSIX
only: Windows' ``os.kill`` terminates), or the file has not changed for 3 minutes of the waiter's own clock.
The second test compares the file with itself, never mtimes with clocks, so clock skew between nodes does
not matter. To remove a stale file, the waiter renames it aside and checks that it moved the file it judged
stale; if another waiter got there first and already holds a fresh lock, the fresh file is put back. That is
a best effort against two waiters breaking one lock at the same moment.

**NFS and cluster file systems.** A Linux NFS client emulates flock with whole-file POSIX locks that the
server keeps (NFSv4 in the protocol, NFSv3 through lockd/statd), so the lock excludes processes on
different nodes, but only as far as the mount allows:

- With ``nolock`` (NFSv3) or ``local_lock=flock``/``all``, flock only excludes processes on the same node,
  so two nodes may both do the work. Each one builds in its own staging folder and the first rename wins, so
  the result stays whole. ``DUOBENCH_LOCKS=lockfile`` excludes across nodes there, because an ``O_EXCL``
  create is atomic on the server (NFSv3 and later).
- When a node dies while holding a lock, an NFSv4 server frees the lock after the lease expires (about
  90 s). An NFSv3 server frees it only when that node's statd reports back. Until then the waiter waits, and
  its message names the host and the lock file, which can be removed by hand.
- Every process that shares a cache folder must use the same mode, because a flock holder and a lock-file
  holder do not see each other.

**Process groups (torchrun).** The ranks of one job often compute together: they train data-parallel, meet
at barriers and merge metrics. Suppose a rank waits for a lock that rank 0 holds, while rank 0 waits for
that rank in a collective: both wait forever. So a lock belongs either to one process or, through
`exclusive_for_job`, to a whole job:

- `exclusive` locks for this process only. It is safe for work that contains no collective. An example is
  a DUO pair set: ``main_process_first`` builds it on rank 0 while the other ranks wait, and they then find
  it built.
- `exclusive_for_job` is a collective call that every rank makes together, like ``barrier()``. Rank 0 holds
  the lock for the job and tells the other ranks with a short broadcast after each attempt. No rank sits in
  one collective for the whole wait; a barrier would time out after the process group's 10-30 minutes while
  another job trains for hours.
  Stage results and attack runs use it, as method artifacts do.

Never hold a lock while waiting on something that may need the same lock. The only nesting in duobench is a
method artifact's lock, then a DUO pair set's lock inside that method's training. Stage and attack locks
are never held while another lock is taken.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from duobench.errors import DuobenchError

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
"""The longest pause between two attempts (the first ones come sooner: 50 ms, growing by half each time)."""
FIRST_MESSAGE_SECONDS = 0.5
"""Say nothing about a shorter wait (and give a holder that just took the lock time to write its pid)."""
REMIND_SECONDS = 300.0
HEARTBEAT_SECONDS = 20.0
"""Lock-file mode: how often a holder rewrites its file to show that it is alive."""
STALE_SECONDS = 180.0
"""Lock-file mode: a file that has not changed for this long belongs to a holder that is gone."""
RECORD_WIDTH = 256
"""Lock-file records are padded to one width, so that a rewrite replaces the record in place."""
_FLOCK_REFUSED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


@contextlib.contextmanager
def exclusive(
    path: Path | str, doing: str = "", *, timeout: float | None = None, poll: float = POLL_SECONDS
) -> Iterator[None]:
    """Hold the inter-process lock on ``path`` (through ``<path>.lock``) for the ``with`` block.

    ``doing`` completes the waiting message ("waiting for another process <doing> …"). A thread of the
    same process that holds the lock may take it again; another thread of the same process waits like
    another process does. ``timeout`` (seconds, default: wait as long as it takes) raises `TimeoutError`.
    """
    lock = _Lock(Path(path))
    _wait(lock.try_acquire, lock, doing or f"working on {lock.path.name}", timeout, poll, speak=True)
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def exclusive_for_job(path: Path | str, doing: str = "", *, poll: float = POLL_SECONDS) -> Iterator[None]:
    """`exclusive` for a whole torchrun job. Inside a process group this is a collective call: every rank
    calls it together, rank 0 holds the lock, and every rank enters the block once rank 0 has the lock.
    Outside a process group it is `exclusive`."""
    if group_size() <= 1:
        with exclusive(path, doing, poll=poll):
            yield
        return
    import torch.distributed as dist

    main = dist.get_rank() == 0
    lock = _Lock(Path(path)) if main else None
    doing = doing or f"working on {Path(path).name}"
    _wait(lambda: from_main_rank(lock.try_acquire() if lock else False), lock, doing, None, poll, speak=main)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def group_size() -> int:
    """The size of the initialised torch process group, 1 without one. A group needs ``torch.distributed``
    imported, so this never imports torch itself."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def from_main_rank(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a broadcast), so that all ranks take the same branch; ``value``
    itself without a process group."""
    if group_size() <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def owner_tag() -> str:
    """``<host>-<pid>``: names this process's staging folders, so that processes on different nodes of
    a shared file system never share one."""
    return f"{socket.gethostname()}-{os.getpid()}"


def owner_gone(tag: str) -> bool:
    """Whether the process an `owner_tag` names has certainly ended. Only a process on this host can be
    checked; for any other, and on Windows, the answer is False."""
    host, _, pid = tag.rpartition("-")
    return pid.isdigit() and _process_gone(host, int(pid))


# ----------------------------------------------------------------------------------------------- waiting


def _wait(
    attempt: Callable[[], bool],
    lock: _Lock | None,
    doing: str,
    timeout: float | None,
    poll: float,
    speak: bool,
) -> None:
    started = time.monotonic()
    pause, remind_at, waited = 0.05, started + FIRST_MESSAGE_SECONDS, False
    while not attempt():
        now = time.monotonic()
        if timeout is not None and now - started >= timeout:
            raise TimeoutError(f"gave up after {timeout:g} s waiting for another process {doing} ({lock.describe()})")
        if speak and now >= remind_at:
            if waited:
                minutes = (now - started) / 60
                logger.warning(
                    "still waiting for another process %s (%.0f min so far; %s)", doing, minutes, lock.describe()
                )
            else:
                logger.warning("waiting for another process %s (%s)", doing, lock.describe())
            waited, remind_at = True, now + REMIND_SECONDS
        time.sleep(pause)
        pause = min(pause * 1.5, poll)
    if waited:
        logger.info("stopped waiting after %.0f s: the lock for %s is ours", time.monotonic() - started, doing)


# ----------------------------------------------------------------------------------------------- the lock


class _Local:
    """One lock file's state in this process: threads take ``rlock`` first; the outermost holder holds
    the file lock."""

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.depth = 0
        self.held: _Flock | _LockFile | None = None


_locals: dict[str, _Local] = {}
_locals_guard = threading.Lock()
_flock_support: dict[str, bool] = {}


def _forget_locks_in_child() -> None:
    """A forked child (a DataLoader worker, say) holds none of its parent's locks: asking for one of them
    it waits like any other process, instead of finding the parent's thread state and entering."""
    global _locals_guard
    _locals_guard = threading.Lock()
    _locals.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


class _Lock:
    """The lock on one path for this process: a thread lock, then the file lock (flock or a lock file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_file = path.with_name(path.name + ".lock")
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        with _locals_guard:
            self.local = _locals.setdefault(str(self.lock_file.absolute()), _Local())
        self.file_lock = _new_file_lock(self.lock_file)

    def try_acquire(self) -> bool:
        local = self.local
        if not local.rlock.acquire(blocking=False):
            return False
        if local.depth == 0:
            try:
                acquired = self.file_lock.try_acquire()
            except BaseException:
                local.rlock.release()
                raise
            if not acquired:
                local.rlock.release()
                return False
            local.held = self.file_lock
        local.depth += 1
        return True

    def release(self) -> None:
        local = self.local
        local.depth -= 1
        if local.depth == 0:
            held, local.held = local.held, None
            held.release()
        local.rlock.release()

    def describe(self) -> str:
        record = _read_record(self.lock_file)
        holder = "another process"
        if record and "pid" in record:
            holder = f"pid {record['pid']} on {record.get('host', 'an unknown host')}"
        return f"lock held by {holder}; lock file {self.lock_file}"


def _new_file_lock(lock_file: Path) -> _Flock | _LockFile:
    wanted = os.environ.get("DUOBENCH_LOCKS", "flock")
    if wanted not in {"flock", "lockfile"}:
        raise DuobenchError(f"DUOBENCH_LOCKS must be flock or lockfile, got {wanted!r}.")
    if wanted == "lockfile" or fcntl is None or not _flock_works(lock_file.parent):
        return _LockFile(lock_file)
    return _Flock(lock_file)


def _flock_works(folder: Path) -> bool:
    """Whether flock works in ``folder``, probed once per folder and process on a file of the probe's own:
    a failed attempt on the lock file itself would leave an empty lock file, which lock-file mode would
    take for a holder's."""
    key = str(folder.absolute())
    if key not in _flock_support:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".flock-probe-")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _flock_support[key] = True
        except OSError as error:
            if error.errno not in _FLOCK_REFUSED:
                raise
            logger.warning("flock is not available in %s (%s); using lock files there", folder, error.strerror)
            _flock_support[key] = False
        finally:
            os.close(fd)
            os.unlink(probe)
    return _flock_support[key]


class _Flock:
    """``fcntl.flock`` on the lock file, which is removed on release."""

    def __init__(self, lock_file: Path) -> None:
        self.lock_file = lock_file
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        for _ in range(3):  # the file was removed by a holder releasing just now: lock the new one
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BaseException as error:
                os.close(fd)
                if isinstance(error, BlockingIOError):
                    return False
                raise
            if _same_file(fd, self.lock_file):
                os.ftruncate(fd, 0)
                os.pwrite(fd, _record().encode(), 0)
                self.fd = fd
                return True
            os.close(fd)
        return False

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_file)  # before unlocking: a waiter that locks the old file sees it is gone
        # Unlock explicitly: a child forked meanwhile shares this open file, and closing our descriptor
        # alone would leave the lock held until the child exits.
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


class _LockFile:
    """An ``O_CREAT | O_EXCL`` lock file with a heartbeat (see the module docstring)."""

    def __init__(self, lock_file: Path) -> None:
        self.lock_file = lock_file
        self.token = ""
        self.seen: tuple[str | None, float] = (None, 0.0)
        self.stop = threading.Event()
        self.heart: threading.Thread | None = None

    def try_acquire(self) -> bool:
        for _ in range(2):  # once more right after removing a stale file
            try:
                fd = os.open(self.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                if self._remove_if_stale():
                    continue
                return False
            self.token, self.stop = uuid.uuid4().hex, threading.Event()
            with os.fdopen(fd, "w") as handle:
                handle.write(_record(token=self.token, beat=0))
            self.heart = threading.Thread(target=self._heartbeat, name=f"lock heartbeat {self.lock_file}", daemon=True)
            self.heart.start()
            return True
        return False

    def release(self) -> None:
        self.stop.set()
        self.heart.join()
        record = _read_record(self.lock_file)
        if record is not None and record.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_file)
        else:
            logger.warning("the lock file %s was removed by another process while this one held it", self.lock_file)

    def _heartbeat(self) -> None:
        beat = 0
        while not self.stop.wait(HEARTBEAT_SECONDS):
            beat += 1
            try:
                with open(self.lock_file, "r+") as handle:
                    if (_parse(handle.read()) or {}).get("token") != self.token:
                        raise FileNotFoundError(self.lock_file)
                    handle.seek(0)
                    handle.write(_record(token=self.token, beat=beat))
            except OSError:
                logger.warning("lost the lock file %s to another process: the work may be done twice", self.lock_file)
                return

    def _remove_if_stale(self) -> bool:
        """Remove the lock file if its holder is gone; whether the file is gone (removed, or released)."""
        raw = _read(self.lock_file)
        if raw is None:
            return True  # released meanwhile
        now = time.monotonic()
        if raw != self.seen[0]:
            self.seen = (raw, now)
        record = _parse(raw) or {}
        pid = record.get("pid")
        gone = isinstance(pid, int) and _process_gone(str(record.get("host", "")), pid)
        silent = now - self.seen[1] >= STALE_SECONDS
        if not (gone or silent):
            return False
        aside = self.lock_file.with_name(f"{self.lock_file.name}.stale-{owner_tag()}")
        try:
            os.replace(self.lock_file, aside)
        except FileNotFoundError:
            return True
        removed = _read(aside) == raw
        if not removed:  # another waiter removed it first and now holds a fresh lock: put that back
            with contextlib.suppress(OSError):
                os.link(aside, self.lock_file)
        else:
            why = "its process is gone" if gone else f"unchanged for {STALE_SECONDS:g} s"
            logger.warning(
                "removed the stale lock file %s of pid %s on %s (%s)",
                self.lock_file,
                record.get("pid", "?"),
                record.get("host", "?"),
                why,
            )
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return removed


def _record(**extra: Any) -> str:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time()), **extra}
    return json.dumps(record).ljust(RECORD_WIDTH)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _parse(raw: str | None) -> dict[str, Any] | None:
    try:
        record = json.loads(raw or "")
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _read_record(lock_file: Path) -> dict[str, Any] | None:
    return _parse(_read(lock_file))


def _same_file(fd: int, path: Path) -> bool:
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)


def _process_gone(host: str, pid: int) -> bool:
    if os.name != "posix" or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
