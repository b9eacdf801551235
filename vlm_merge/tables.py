"""Plain-text tables: the one formatter the `vlm-merge` commands, `eval`'s commands, the demo and the notebook print with."""


def format_table(headers: list[str], rows: list[list[str]] | list[tuple[str, ...]]) -> str:
    """A plain-text table with aligned columns: the header, a dashed rule, one line per row."""
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *[line(r) for r in cells[1:]]])
