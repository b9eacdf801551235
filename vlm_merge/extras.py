"""The optional parts of vlm-merge (pip extras) and the one-line error when a command's extra is missing.

`pip install vlm-merge` is the light core: inspect, validate, merge, chat-vector. The extras, declared
once in pyproject.toml, add the rest: `eval` (eval, score, compare, caption), `evolve` (evolve, with
Ray for `--workers`), `demo` (the miniature world: demo, zoo build / bar). Which distributions an extra
needs is read from the installed project's metadata (its `Requires-Dist` lines), so this module holds no
second list of them.
"""

from __future__ import annotations

from importlib import metadata

from vlm_merge.errors import VlmMergeError

DISTRIBUTION = "vlm-merge"


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def missing_requirements(extra: str) -> list[str]:
    """The distributions `extra` needs that are not installed (an extra that names others of this project, as
    `vlm-merge[eval]`, needs theirs too). Empty when the project's metadata is not there (run from a source
    tree that was never installed): nothing can be said, and an import error tells the rest."""
    from packaging.requirements import Requirement

    try:
        lines = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    missing, seen, todo = [], set(), [extra]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for req in map(Requirement, lines):
            in_extra = (req.marker is not None and req.marker.evaluate({"extra": current})
                        and not req.marker.evaluate({"extra": ""}))
            if not in_extra:
                continue
            if _normalized(req.name) == DISTRIBUTION:
                todo.extend(req.extras)
            elif not _installed(req.name) and req.name not in missing:
                missing.append(req.name)
    return missing


def require_extra(extra: str, what: str, *, unneeded: tuple[str, ...] = ()) -> None:
    """Raise the one-line error if `extra`'s distributions are not all installed; `what` names the command
    or function that needs them (`'vlm-merge eval'`, `eval.evaluate`). `unneeded`: distributions of the extra
    that `what` does without this time (Ray, for an evolve run in one process)."""
    if missing := [name for name in missing_requirements(extra) if name not in unneeded]:
        raise VlmMergeError(f"{what} needs the {extra} extra: pip install '{DISTRIBUTION}[{extra}]' "
                            f"(not installed: {', '.join(missing)})")
