"""The output rule ("nothing is lost"), in one place for every command that writes.

- `check_output(out, inputs)`: an output that is, contains or lies inside any of the command's inputs
  (real paths, symlinks resolved; a directory's symlinked files count as inputs too, as in a Hugging
  Face cache snapshot), or that is or contains the current directory, is refused with one line naming
  the output and the input, before any work.
- `prepare_output_dir(out, force, inputs)`: that check, then the existing-output check (`--force`
  needed), then the parent created and checked writable.
- `AtomicDir`: a complete output is built in a temporary directory beside the target,
  `.NAME.tmp-<pid>-<hex>`, and renamed into place; with `force` the old output is first renamed to
  `.NAME.old-<pid>-<hex>`, and deleted only after the rename succeeded (restored if it failed). On any
  failure (an exception, Ctrl-C) the temporary directory is removed.
- `RunDir`: a resumable run directory (evaluation, captioning): created atomically after the cheap
  checks, removed again on failure unless it holds finished items; with `force` the new run is built
  beside the old one, which is replaced only when the new run is complete.
- `clean_stale(parent)`: temporary and set-aside entries of our naming pattern whose owning process is
  gone (SIGKILL, power loss) are removed by the next command writing into the same parent; a set-aside
  old output whose target is missing (killed between the two renames) is renamed back instead.
- `output_error(path, e)`: an OSError while writing (disk full, read-only file system, permission
  denied) as one line naming the output.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vlm_merge.errors import VlmMergeError

STALE_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")

# errno values that mean "the output location cannot take the output", whatever file raised them
WRITE_ERRORS: dict[int, str] = {
    errno.ENOSPC: "free disk space or choose another --out",
    errno.EDQUOT: "free disk space or choose another --out",
    errno.EFBIG: "choose another --out on a file system that takes larger files",
    errno.EROFS: "choose another --out on a writable file system",
}
# errno values that are about the output only when they name a path under it
PATH_ERRORS: dict[int, str] = {
    errno.EACCES: "check its permissions or choose another --out",
    errno.EPERM: "check its permissions or choose another --out",
}

InputPath = str | os.PathLike | None


def real_path(path: str | os.PathLike) -> Path:
    """`path` with `~` expanded, made absolute and every symlink resolved (it need not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _inside(path: Path, parent: Path) -> bool:
    return path != parent and path.is_relative_to(parent)


def protected_paths(inputs: Iterable[InputPath]) -> list[tuple[str, Path]]:
    """(input as given, real path) for every existing input, plus the real targets of a directory's symlinks."""
    out: list[tuple[str, Path]] = []
    for given in inputs:
        if given is None or str(given) == "":
            continue
        p = Path(given).expanduser()
        if not os.path.lexists(p):
            continue  # not a path (e.g. a Hugging Face id resolved elsewhere)
        real = real_path(p)
        out.append((str(given), real))
        if real.is_dir():
            try:
                entries = list(os.scandir(real))
            except OSError:
                entries = []
            out += [(str(given), real_path(e.path)) for e in entries if e.is_symlink()]
    return out


def check_output(out: str | os.PathLike, inputs: Iterable[InputPath] = ()) -> Path:
    """Refuse an output that is, contains or lies inside an input, or is or contains the current directory."""
    target = real_path(out)
    cwd = real_path(os.getcwd())
    if target == cwd or _inside(cwd, target):
        raise VlmMergeError(f"{out}: output is or contains the current directory {cwd}; choose another output path")
    for given, real in protected_paths(inputs):
        if target == real:
            how = "is the input"
        elif _inside(real, target):
            how = "contains the input"
        elif _inside(target, real):
            how = "lies inside the input"
        else:
            continue
        raise VlmMergeError(f"{out}: output {how} {given}; it would be overwritten; choose another output path")
    return target


def output_error(
    path: str | os.PathLike, e: OSError, scope: str | os.PathLike | None = None, kept: str = "nothing was written"
) -> VlmMergeError | None:
    """One line for an OSError that is about the output at `path` (None if it is about something else).

    Disk full, quota, file size and read-only errors are the output's wherever they arise; permission
    errors only when they name a file under `scope` (default: `path`'s parent). `kept` says what is left.
    """
    why = WRITE_ERRORS.get(e.errno)
    if why is None and e.errno in PATH_ERRORS:
        under = real_path(scope if scope is not None else Path(path).parent)
        named = [real_path(f) for f in (e.filename, e.filename2) if f]
        if any(f == under or _inside(f, under) for f in named):
            why = PATH_ERRORS[e.errno]
    if why is None:
        return None
    return VlmMergeError(f"{path}: {os.strerror(e.errno)}; {why}; {kept}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path) -> None:
    """Delete a file, a symlink or a directory tree; missing is fine."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def side_path(target: Path, kind: str) -> Path:
    """A fresh name beside `target` owned by this process: `.NAME.<kind>-<pid>-<hex>`."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def clean_stale(parent: Path) -> list[Path]:
    """Remove our temporary / set-aside entries in `parent` whose owning process is gone; returns them.

    A set-aside old output (`.NAME.old-…`) whose NAME is missing was moved by a process killed
    between its two renames: it is renamed back to NAME, not deleted.
    """
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    cleaned = []
    for entry in entries:
        m = STALE_PATTERN.match(entry.name)
        if m is None or _alive(int(m["pid"])):
            continue
        path, name = Path(entry.path), parent / m["name"]
        if m["kind"] == "old" and not os.path.lexists(name):
            try:
                os.rename(path, name)
                continue
            except OSError:
                pass
        remove(path)
        cleaned.append(path)
    return cleaned


def _ensure_parent(out: Path) -> None:
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(out, e, parent) or VlmMergeError(f"{out}: cannot create {parent} ({e.strerror or e})") from None
    if not parent.is_dir():
        raise VlmMergeError(f"{out}: {parent} is not a directory; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        why = os.strerror(errno.EROFS if _read_only(parent) else errno.EACCES)
        raise VlmMergeError(f"{out}: cannot write to {parent} ({why}); choose another --out")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def prepare_output_dir(out: str | os.PathLike, force: bool, inputs: Iterable[InputPath] = ()) -> Path:
    """Check the target before any work starts: not an input, not existing unless `force`, parent writable."""
    out = Path(out).expanduser()
    check_output(out, inputs)
    if os.path.lexists(out) and not force:
        raise VlmMergeError(f"{out}: output already exists; pass --force (force=True) to replace it or choose another path")
    if os.path.lexists(out) and not out.is_dir():
        raise VlmMergeError(f"{out}: exists and is not a directory; remove it or choose another path")
    _ensure_parent(out)
    return out


def replace_dir(tmp: Path, target: Path, force: bool) -> None:
    """Rename the complete `tmp` to `target`; an existing target (only with `force`) is deleted after that."""
    old = None
    if os.path.lexists(target):
        if not force:
            raise VlmMergeError(f"{target}: appeared while writing; pass --force to replace it")
        old = side_path(target, "old")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        remove(old)


@contextmanager
def scratch_dir(target: Path) -> Iterator[Path]:
    """A temporary directory beside `target` to build it in (a file moved out of it), removed whatever happens."""
    _ensure_parent(target)
    clean_stale(target.parent)
    tmp = side_path(target, "tmp")
    try:
        tmp.mkdir()
        yield tmp
    except OSError as e:
        raise output_error(target, e) or e from None
    finally:
        remove(tmp)


class AtomicDir:
    """A temporary directory beside `target` that replaces it on success and vanishes on failure.

    `inputs` are the paths the command reads: the target may not be, contain or lie inside any of them.
    """

    def __init__(self, target: str | os.PathLike, force: bool = False, inputs: Iterable[InputPath] = ()):
        self.target = prepare_output_dir(target, force, inputs)
        self.force = force
        self.tmp = side_path(self.target, "tmp")

    def __enter__(self) -> Path:
        clean_stale(self.target.parent)
        try:
            self.tmp.mkdir()
        except OSError as e:
            raise output_error(self.target, e) or e from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                replace_dir(self.tmp, self.target, self.force)
                return
            except BaseException as e:
                exc = e
        remove(self.tmp)
        if isinstance(exc, OSError):
            mapped = output_error(self.target, exc)
            if mapped is not None:
                raise mapped from None
        if exc_type is None:
            raise exc


class RunDir:
    """A resumable run directory (finished items appended as they come) under the output rule.

    Made before any work: the checks (`check_output`, not a file, parent writable). `open(keep)` then
    yields the directory to write in: a new run dir is created atomically (an empty temporary directory
    renamed into place) and removed again if the run fails while `keep(dir)` says it holds no finished
    items; an existing one (no `force`) is resumed in place and never removed; with `force` the new run
    is written beside it and replaces it only when complete (the old one is untouched if it fails).
    """

    def __init__(self, target: str | os.PathLike, force: bool = False, inputs: Iterable[InputPath] = ()):
        self.target = Path(target).expanduser()
        check_output(self.target, inputs)
        if os.path.lexists(self.target) and not self.target.is_dir():
            raise VlmMergeError(f"{self.target}: exists and is not a directory; choose another --out")
        _ensure_parent(self.target)
        self.force = force

    def open(self, keep: Callable[[Path], bool]) -> _RunDirContext:
        """The context that yields the directory; `keep(dir)` says whether a failed run left finished items."""
        return _RunDirContext(self, keep)


class _RunDirContext:
    def __init__(self, run: RunDir, keep: Callable[[Path], bool]):
        self.run, self.keep = run, keep
        self.path: Path | None = None
        self.mode = ""

    def __enter__(self) -> Path:
        target = self.run.target
        clean_stale(target.parent)
        existing = target.is_dir() and any(target.iterdir())
        tmp = side_path(target, "tmp")
        try:
            if existing and not self.run.force:
                self.mode, self.path = "resume", target
                clean_stale(target)
            elif existing:
                tmp.mkdir()
                self.mode, self.path = "replace", tmp
            else:
                tmp.mkdir()
                if target.is_dir():
                    target.rmdir()  # empty: nothing to lose
                os.rename(tmp, target)
                self.mode, self.path = "new", target
        except OSError as e:
            remove(tmp)
            raise output_error(target, e) or e from None
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        target, path = self.run.target, self.path
        assert path is not None
        if exc_type is None:
            if self.mode != "replace":
                return
            try:
                replace_dir(path, target, True)
                return
            except BaseException as e:
                exc = e
        kept = self.mode == "resume" or (self.mode == "new" and self._kept(path))
        if not kept:
            remove(path)
        if isinstance(exc, OSError):
            what = f"the finished items are kept in {target}: run the same command to resume" if kept else "nothing was written"
            mapped = output_error(target, exc, kept=what)
            if mapped is not None:
                raise mapped from None
        if exc_type is None:
            raise exc

    def _kept(self, path: Path) -> bool:
        try:
            return self.keep(path)
        except Exception:
            return False
