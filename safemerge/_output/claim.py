"""The output directory: claimed for the whole run, written beside it, put in place atomically.

All temporary work lives in one sibling, `<parent>/.<name>.safemerge/` (a name too long for that is shortened, see
`sibling_stem`):
- `lock`: held (flock) by the run that owns the output; a second run is refused while it is held;
- `model/`: the merged model being written and verified;
- `offload/`: accelerate's offload folder, for a low-memory merge;
- `previous/`: only on platforms without an atomic directory swap, the old output while it is being replaced.
The sibling is removed on every exit path, and so are the output's parent directories the run created, unless a
model was put there. One left by a killed run is stale once its lock is free: the next run puts `previous/` back if
the output is missing, and removes the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from safemerge.errors import InputError, OutputBusyError, OutputExistsError, OutputWriteError, SafeMergeError

T = TypeVar("T")

logger = logging.getLogger(__name__)

FAILED_MARKER = "SAFEMERGE_VERIFICATION_FAILED.txt"
#: Bytes safemerge adds to the output's name (or its stem) for its siblings: "." + ".safemerge", ".failed-" + 8 hex.
_LONGEST_ADDITION = len(".failed-") + 8
#: Hex digits of the full name's hash in the stem of a name too long for the siblings.
_HASH_DIGITS = 16


def resolved(save_directory: str | os.PathLike[str]) -> Path:
    """The absolute output path; a symbolic link is followed to the directory it names."""
    path = Path(os.path.abspath(save_directory))
    # os.path.islink: a name too long for the filesystem is no link (check_target refuses it with the fix).
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def work_directory(target: Path) -> Path:
    """The temporary sibling of `target` (documented in docs/reference/cli.md)."""
    return target.parent / f".{sibling_stem(target)}.safemerge"


def sibling_stem(target: Path) -> str:
    """The name safemerge's siblings of `target` are named after: its own, or, where a sibling's name would not fit
    the filesystem, a shortened name, "~" and a hash of the full one. The same output always gets the same stem (a
    run finds what a killed run left), and two outputs get two stems."""
    name = target.name
    budget = _name_max(target.parent) - _LONGEST_ADDITION
    if len(os.fsencode(name)) <= budget:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:_HASH_DIGITS]
    short = name
    while short and len(os.fsencode(short)) + 1 + _HASH_DIGITS > budget:
        short = short[:-1]  # whole characters: the shortened name stays valid UTF-8
    return f"{short}~{digest}"


def check_target(target: Path, *, overwrite: bool) -> None:
    """Refuse a target that is the current directory, one above it, home or `/`, a name longer than the filesystem
    allows, a file, or a non-empty directory unless `overwrite`."""
    _refuse_enclosing(target)
    limit = _name_max(target.parent)
    if len(os.fsencode(target.name)) > limit:
        raise InputError(
            f"The output name '{target.name[:40]}...' is {len(os.fsencode(target.name))} bytes, and this filesystem "
            f"allows {limit}. Nothing was merged. Fix: choose a name of at most {limit} bytes."
        )
    if target.exists() and not target.is_dir():
        raise OutputExistsError(
            f"save_directory '{target}' exists and is a file; nothing was merged. "
            "Fix: choose a directory path (it is created if missing)."
        )
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"save_directory '{target}' exists and is not empty; nothing was merged. Fix: choose another "
            "directory, or pass overwrite=True (CLI: --overwrite) to replace it once the new model is verified."
        )


def _refuse_enclosing(target: Path) -> None:
    """Refuse `/`, the home directory, the current directory and those above it, whether or not overwrite is given:
    replacing one would take the user's other files with it (or pull the directory from under their shell)."""
    real = Path(os.path.realpath(target))
    if real == Path(real.anchor):
        _refuse(target, "the root directory")
    with contextlib.suppress(OSError):  # a current directory that was removed encloses nothing
        cwd = Path.cwd()
        if real == cwd:
            _refuse(target, "the current directory")
        if real in cwd.parents:
            _refuse(target, f"a directory above the current one ('{cwd}')")
    with contextlib.suppress(RuntimeError, KeyError):  # no home directory known
        if real == Path(os.path.realpath(Path.home())):
            _refuse(target, "your home directory")


def _refuse(target: Path, what: str) -> NoReturn:
    raise InputError(
        f"save_directory '{target}' is {what}; safemerge replaces the whole directory with the merged model, so "
        "every other file in it would be gone. Nothing was merged. Fix: choose a new directory for the merged model "
        "(for example './merged')."
    )


def _name_max(directory: Path) -> int:
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


class Claim:
    """Ownership of an output directory for one run: the locked temporary sibling and what is written in it."""

    def __init__(self, target: Path, work: Path, lock_fd: int, created: list[Path], *, overwrite: bool) -> None:
        self.target = target
        #: Replace a non-empty target (with overwrite=False, one filled while the merge ran is refused, not replaced).
        self.overwrite = overwrite
        self.work = work
        self.staging = work / "model"
        #: accelerate's offload folder of a low-memory merge (transformers only writes there what it cannot read
        #: from the checkpoint in place).
        self.offload = work / "offload"
        self._lock_fd = lock_fd
        #: The output's parent directories this run created, deepest first: removed at the end while still empty.
        self._created = created
        #: The old output could not be put back after a failed rename: `previous/` stays for the next run.
        self._keep_previous = False

    def commit(self) -> None:
        """Put the verified model at the target: a rename, or an atomic swap with the old directory.

        Raises:
            OutputWriteError: a rename failed; the target is as it was (or, if even that failed, the message says
                where the old directory is).
            OutputExistsError: another program filled the target while safemerge ran.
        """
        try:
            if self.overwrite and self.target.is_dir() and any(self.target.iterdir()):
                self._replace()
            else:
                self._rename_into_place()
        except SafeMergeError:
            raise
        except OSError as exc:
            raise OutputWriteError(
                f"Could not put the merged model at '{self.target}' ({type(exc).__name__}: {exc}); "
                f"'{self.target}' is unchanged and the merged model was removed. Fix: check permissions and free "
                f"space in '{self.target.parent}' (or choose another directory), then run again."
            ) from exc

    def _rename_into_place(self) -> None:
        try:
            os.rename(self.staging, self.target)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputExistsError(
                    f"save_directory '{self.target}' was filled by another program while safemerge ran; it was not "
                    "replaced. Fix: run again with another directory, or with overwrite=True."
                ) from exc
            raise

    def _replace(self) -> None:
        if _exchange(self.staging, self.target):
            return  # `staging` now holds the old directory; release() removes it
        # No atomic swap here: the old directory waits in the sibling; the next run restores it if this one dies.
        previous = self.work / "previous"
        os.rename(self.target, previous)
        try:
            os.rename(self.staging, self.target)
        except BaseException as exc:
            self._put_back(previous, exc)
            raise

    def _put_back(self, previous: Path, exc: BaseException) -> None:
        """Rename the old directory back to the target after the new one could not take its place."""
        try:
            os.rename(previous, self.target)
        except OSError as again:
            self._keep_previous = True
            raise OutputWriteError(
                f"Could not put the merged model at '{self.target}' ({exc}), nor the old model back there ({again}). "
                "This filesystem has no atomic directory swap, so the old model had been moved aside first: the old "
                f"model is kept at '{previous}'. Fix: run safemerge into '{self.target}' again (it puts the old "
                f"model back first), or move '{previous}' to '{self.target}' yourself."
            ) from again
        if isinstance(exc, OSError):
            raise OutputWriteError(
                f"Could not put the merged model at '{self.target}' ({type(exc).__name__}: {exc}). This filesystem "
                "has no atomic directory swap, so the old model had been moved aside first: it was put back at "
                f"'{self.target}' unchanged, and the merged model was removed. Fix: check permissions and free "
                f"space in '{self.target.parent}' (or merge into a new directory), then run again."
            ) from exc

    def quarantine(self, problems: list[str]) -> Path:
        """Keep a model that failed verification, under a name nobody mistakes for the output."""
        failed = self.target.parent / f"{sibling_stem(self.target)}.failed-{secrets.token_hex(4)}"
        os.rename(self.staging, failed)
        (failed / FAILED_MARKER).write_text(
            "safemerge verification failed for this model; do not use it.\n" + "\n".join(problems) + "\n",
            encoding="utf-8",
        )
        return failed

    def release(self) -> None:
        """Remove the temporary sibling and the parents this run created (while empty), and give up the lock."""
        shutil.rmtree(self.work / "model", ignore_errors=True)
        if not self._keep_previous:
            shutil.rmtree(self.work / "previous", ignore_errors=True)
        shutil.rmtree(self.offload, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.work / "lock").unlink()
            self.work.rmdir()
        _remove_empty(self._created)
        os.close(self._lock_fd)


@contextlib.contextmanager
def claim(target: Path, *, overwrite: bool) -> Iterator[Claim]:
    """Own `target` for the duration: lock its temporary sibling, clean what a killed run left, release at the end.

    Missing parent directories are created for the sibling, and removed again unless a model was put there. The
    target was checked where the request was built (`_request`); it is checked again once the lock is held."""
    try:
        created = _make_parents(target.parent)
    except OSError as exc:
        raise _unwritable(target, exc) from exc
    work = work_directory(target)
    try:
        fd = _lock(work, target)
    except BaseException:
        _remove_empty(created)
        raise
    held = Claim(target, work, fd, created, overwrite=overwrite)
    try:
        _recover(work, target)
        check_target(target, overwrite=overwrite)  # again, now that no other safemerge run can change it
        yield held
    finally:
        held.release()


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and the directories above it that are missing; those created, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    if missing:
        missing[0].mkdir(parents=True, exist_ok=True)
    return missing


def _unwritable(target: Path, exc: OSError) -> InputError:
    """Before any work: the place chosen for the output cannot be written, a usage error."""
    return InputError(
        f"Cannot write beside save_directory '{target}' ({type(exc).__name__}: {exc}); nothing was merged. Fix: "
        "choose a directory on a filesystem you can write to."
    )


def _remove_empty(directories: list[Path]) -> None:
    """Remove `directories` (deepest first) up to the first one that is not empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def _lock(work: Path, target: Path) -> int:
    """Create `work` and lock it for this run: the lock's file descriptor (OutputBusyError if another run holds it)."""
    try:
        work.mkdir(exist_ok=True)
        fd = os.open(work / "lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise _unwritable(target, exc) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputBusyError(
            f"Another safemerge run ({_owner(work)}) is writing '{target}' right now; nothing was merged. Fix: wait "
            "for it to finish, or choose another directory."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid()}).encode())
    return fd


def _owner(work: Path) -> str:
    try:
        return f"pid {json.loads((work / 'lock').read_text())['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _recover(work: Path, target: Path) -> None:
    """Clean what a run killed before its cleanup left in `work` (its lock is free, so it is dead)."""
    previous = work / "previous"
    if previous.exists() and not target.exists():
        os.rename(previous, target)
        logger.warning("put back %s: a killed safemerge run had moved it to %s", target, previous)
    leftovers = [p for p in (work / "model", previous) if p.exists()]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    if leftovers:
        logger.warning("removed what a killed safemerge run left in %s", work)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where the platform cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # filesystem or kernel without the flag
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def save_model(model: Any, held: Claim, *, max_shard_size: str | int | None = None) -> None:
    """save_pretrained into the claim's staging directory; a failure is an OutputWriteError, nothing is left."""
    options = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    write_staging(held, lambda staging: model.save_pretrained(str(staging), **options))


def write_staging(held: Claim, write: Callable[[Path], T]) -> T:
    """`write(staging directory)`; a failure is an OutputWriteError and the partial files are removed."""
    try:
        return write(held.staging)
    except SafeMergeError:
        shutil.rmtree(held.staging, ignore_errors=True)
        raise
    except Exception as exc:  # safetensors raises its own error type for a full disk
        shutil.rmtree(held.staging, ignore_errors=True)
        raise OutputWriteError(
            f"Could not write the merged model into '{held.staging}' ({type(exc).__name__}: {exc}); "
            f"'{held.target}' was not written and the partial files were removed. Fix: free space or check "
            "permissions there (or choose another directory), then run again."
        ) from exc


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` through a temporary file in the same directory (mode from the umask). A NaN or
    infinite float raises ValueError: strict parsers refuse them (reports pass through `to_jsonable` first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
