"""Model cards: a README.md recording how a merged model was made and from what."""

from __future__ import annotations

import json
import vlm_merge


def model_card(title: str, method: str, recipe: dict, sources: dict[str, str], details: list[str] | None = None) -> str:
    """A markdown model card with front matter tags, the recipe as JSON and the sources."""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [merge, vlm-merge, " + method + "]",
        "---",
        f"# {title}",
        "",
        f"Built with vlm-merge {vlm_merge.__version__} ({method}). The vision encoder and projector are copied "
        "unchanged from the VLM; only the language model was merged.",
        "",
        "## Sources",
        "",
        "| role | model |",
        "|---|---|",
        *[f"| {role} | `{path}` |" for role, path in sources.items()],
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(recipe, indent=2, ensure_ascii=False),
        "```",
    ]
    if details:
        lines += ["", "## Details", "", *[f"- {d}" for d in details]]
    return "\n".join(lines) + "\n"
