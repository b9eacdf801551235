"""Reading the small text files users hand us (configs, indexes, recipes, JSONL rows) without trusting them.

Every reader here checks, before parsing: that the path is a regular file (a FIFO, device or socket
is refused by `os.stat`, never opened), its size against a limit, that it is UTF-8; and after parsing:
nesting depth (no `RecursionError`), YAML alias expansion (a "billion laughs" alias bomb or a
self-referencing anchor fails fast), and the type of the top-level value. Each failure is one
`VlmMergeError` line naming the file, and the key where there is one.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlm_merge.errors import VlmMergeError

MAX_TEXT_BYTES = 64 * 1024**2  # configs, indexes and recipes are kilobytes; tokenizer.json files are megabytes
MAX_DEPTH = 64  # real configs nest 3-4 levels
MAX_YAML_NODES = 1_000_000  # after alias expansion; a recipe has hundreds

_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def check_regular_file(path: Path, what: str = "file") -> os.stat_result:
    """`os.stat` of `path`, which must be a regular file (checked without opening it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VlmMergeError(f"{path}: no such file") from None
    except OSError as e:
        raise VlmMergeError(f"{path}: cannot read the {what} ({e.strerror}); check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise VlmMergeError(f"{path}: is {kind}, not a regular file; pass the {what} itself")
    return st


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `max_bytes`."""
    path = Path(path)
    st = check_regular_file(path, what)
    if st.st_size > max_bytes:
        raise VlmMergeError(f"{path}: {st.st_size} bytes, larger than the {max_bytes}-byte limit for a {what}")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise VlmMergeError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if len(raw) > max_bytes:
        raise VlmMergeError(f"{path}: larger than the {max_bytes}-byte limit for a {what}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VlmMergeError(f"{path}: not UTF-8 text (byte {e.start}); the {what} must be UTF-8") from None


def _depth(value: Any, limit: int) -> int | None:
    """The first depth beyond `limit` reached in nested lists/dicts (None if within), without recursion."""
    stack = [(value, 1)]
    seen: set[int] = set()
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return d
            if id(v) in seen:
                continue
            seen.add(id(v))
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return None


def type_name(value: Any) -> str:
    """JSON's name for the type of a parsed value (what a user would call it)."""
    table = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"), (list, "a list"),
             (dict, "an object"), (type(None), "null"))
    return next((name for t, name in table if isinstance(value, t)), type(value).__name__)


def parse_json(text: str, label: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text; `label` (a file, or file:line) names it in errors."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise VlmMergeError(f"{label}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise VlmMergeError(f"{label}: JSON nested too deeply (limit {max_depth} levels)") from None
    if _depth(value, max_depth) is not None:
        raise VlmMergeError(f"{label}: JSON nested too deeply (limit {max_depth} levels)")
    return value


def load_json(path: str | Path, what: str = "JSON file", expect: type = dict, max_bytes: int = MAX_TEXT_BYTES) -> Any:
    """A JSON file whose top-level value must be an `expect` (dict: a JSON object)."""
    try:
        value = parse_json(read_text(path, what, max_bytes), str(path))
    except VlmMergeError as e:
        raise VlmMergeError(f"{e}; fix or re-download the {what}") from None
    if not isinstance(value, expect):
        want = type_name(expect())
        raise VlmMergeError(f"{path}: the {what} must be {want}, not {type_name(value)}; fix or re-download it")
    return value


def field(data: dict, key: str, expect: type | tuple[type, ...], label: str, *, required: bool = True) -> Any:
    """`data[key]`, checked to be of type `expect` (bool is not a number); errors name `label` and the key."""
    if key not in data:
        if required:
            raise VlmMergeError(f"{label}: missing key {key!r}")
        return None
    value = data[key]
    types = expect if isinstance(expect, tuple) else (expect,)
    is_bool_as_number = isinstance(value, bool) and bool not in types
    if not isinstance(value, types) or is_bool_as_number:
        want = " or ".join(dict.fromkeys(type_name(t()) for t in types))
        raise VlmMergeError(f"{label}: {key!r} must be {want}, not {type_name(value)} ({str(value)[:40]!r})")
    return value


@dataclass(frozen=True)
class Want:
    """What one key of a parsed file must hold: one of `types` (bool is not a number, a number is finite),
    at least `minimum` for a number, and, for an object, its own keys checked by `fields`."""

    types: tuple[type, ...]
    minimum: float | None = None
    required: bool = False
    fields: Mapping[str, Want] | None = None

    def describe(self) -> str:
        """E.g. 'a whole number >= 1 or null', 'an object'."""
        kinds = [t for t in self.types if t is not type(None)]
        names = "a whole number" if kinds == [int] else " or ".join(dict.fromkeys(type_name(t()) for t in kinds))
        return (names + (f" >= {self.minimum:g}" if self.minimum is not None else "")
                + (" or null" if type(None) in self.types else ""))


def check_fields(data: Mapping, table: Mapping[str, Want], label: str, prefix: str = "") -> None:
    """Check `data` against `table` (key -> `Want`), depth first; the error names `label` and the dotted key."""
    for key, want in table.items():
        name = f"{prefix}{key}"
        if key not in data:
            if want.required:
                raise VlmMergeError(f"{label}: missing key {name!r}")
            continue
        value = data[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = isinstance(value, want.types) and not (isinstance(value, bool) and bool not in want.types)
        if ok and number and (not math.isfinite(value) or (want.minimum is not None and value < want.minimum)):
            ok = False
        if not ok:
            raise VlmMergeError(f"{label}: {name!r} must be {want.describe()}, not {type_name(value)} "
                                f"({str(value)[:40]!r})")
        if want.fields is not None and isinstance(value, Mapping):
            check_fields(value, want.fields, label, f"{name}.")


class _CheckedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, composing a document only after checking its size with aliases expanded."""

    def compose_document(self):  # noqa: D102 - PyYAML hook
        node = super().compose_document()
        _check_yaml_graph(node, self.name)
        return node


def _check_yaml_graph(root: yaml.Node, label: str) -> None:
    """Refuse a composed YAML graph that is cyclic, too deep, or too large once aliases are expanded.

    Sizes are counted per distinct node (memoised), so an alias bomb is measured without expanding it.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_YAML_NODES:
                raise VlmMergeError(f"{label}: YAML aliases expand to more than {MAX_YAML_NODES} values (an alias bomb?); "
                                    "write the values out")
            if depth[key] > MAX_DEPTH:
                raise VlmMergeError(f"{label}: YAML nested too deeply (limit {MAX_DEPTH} levels)")
            continue
        if key in size:
            continue
        if key in on_path:
            raise VlmMergeError(f"{label}: a YAML anchor refers to itself (self-referencing alias); write the values out")
        on_path.add(key)
        stack.append((node, True))
        for c in children:
            if id(c) in on_path:
                raise VlmMergeError(f"{label}: a YAML anchor refers to itself (self-referencing alias); write the values out")
            if id(c) not in size:
                stack.append((c, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def parse_yaml(text: str, label: str, what: str = "YAML file") -> Any:
    """Parse one YAML document with the safe loader and the alias / depth checks."""
    loader = _CheckedLoader(text)
    loader.name = label
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or ""
        raise VlmMergeError(f"{label}: invalid YAML{where}" + (f" ({problem})" if problem else "") + f"; fix the {what}") from None
    except RecursionError:
        raise VlmMergeError(f"{label}: YAML nested too deeply (limit {MAX_DEPTH} levels)") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """A YAML file read with `read_text`'s checks and parsed with `parse_yaml`'s."""
    return parse_yaml(read_text(path, what), str(path), what)
