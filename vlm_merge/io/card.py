"""Model cards: the README.md of a merged model, built with huggingface_hub's `ModelCard` / `ModelCardData`.

Front matter (`card_data`): `base_model` (every source, as a Hub id where it is one: an id, or a path
inside a Hugging Face cache, `.../models--ORG--NAME/snapshots/...`), `base_model_relation: merge`,
`license` inherited from the sources' own cards (`other` when they differ, with a warning),
`language: [ja, en]`, `pipeline_tag: image-text-to-text`, `library_name: transformers`, `tags`.
Body: how the model was made, the sources, the evaluation table when it was scored (`EvalRow`s read
from `vlm-merge eval` runs or an evolve run's held-out report), the recipe as replayable YAML, the
licence note and the details.

`model_card` is the card written beside the weights (sources as the user gave them); `public_card`
the published one, rebuilt from an output directory's `merge_recipe.yaml` and card: a source that is
not a Hub id appears as `local:NAME`, and the card is refused if any local path is left in it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import vlm_merge
from vlm_merge.errors import VlmMergeError

log = logging.getLogger(__name__)

LANGUAGES = ["ja", "en"]
PIPELINE_TAG = "image-text-to-text"
RECIPE_FILE = "merge_recipe.yaml"  # written by vlm_merge.engine.merge beside every merged model
TEST_REPORT_FILE = "test_report.json"  # an evolve run's held-out report, beside its model/
SOURCE_KEYS = ("vlm", "base_model", "target")  # a recipe's single-source keys, then `models[i].model`
ROLE_REFS = ("vlm",)  # a `models` entry may name the recipe's VLM by its role (vlm_merge.recipe.VLM_REF)
_CACHE_PATH = re.compile(r"models--([\w.-]+)--([\w.-]+)/snapshots/")
_DETAILS = "## Details"
_ABSOLUTE_PATH = re.compile(r"(?:^|[\s`'\"(=])(~?/[^\s`'\")/]+/[^\s`'\")]*)")  # /a/b..., ~/a/..., not URLs


@dataclass(frozen=True)
class EvalRow:
    """One score of the model card's evaluation table: mean and 95% bootstrap interval over `questions`."""

    benchmark: str
    metric: str
    model: str
    mean: float
    low: float
    high: float
    questions: int


def hub_id_of(ref: str) -> str | None:
    """The Hub id (`ORG/NAME`) a source reference stands for: an id (`@REVISION` dropped) or a path
    inside a Hugging Face cache; None for any other local path."""
    if (m := _CACHE_PATH.search(Path(ref).as_posix() + "/")) is not None:
        return f"{m.group(1)}/{m.group(2)}"
    from vlm_merge.io.hub import parse_hub_ref

    if Path(ref).expanduser().exists():
        return None
    ref_ = parse_hub_ref(ref)
    return ref_.repo_id if ref_ is not None else None


def public_name(ref: str) -> str:
    """How a source appears in a published card: its Hub id, else `local:NAME` (the directory's name only)."""
    return hub_id_of(ref) or f"local:{Path(ref).name or 'model'}"


def source_license(ref: str, cache_dir: str | Path | None = None) -> str | None:
    """The `license` of a source's own card: its README.md in a local directory, or in the Hub cache for an
    id (never downloads); None where there is no card or it names no licence."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    path = Path(ref).expanduser()
    card: Path | None = path / "README.md" if path.is_dir() else None
    if card is None and (hub := hub_id_of(ref)) is not None:
        from vlm_merge.io.hub import parse_hub_ref

        parsed = parse_hub_ref(ref)
        found = try_to_load_from_cache(hub, "README.md", cache_dir=cache_dir,
                                       revision=parsed.revision if parsed is not None else None)
        card = Path(found) if isinstance(found, str) else None
    if card is None or not card.is_file():
        return None
    try:
        meta = metadata_load(card) or {}
    except (OSError, ValueError, yaml.YAMLError, UnicodeDecodeError):
        return None
    lic = meta.get("license")
    return lic if isinstance(lic, str) and lic else None


def inherited_license(licenses: Mapping[str, str | None]) -> tuple[str | None, str | None]:
    """(the card's `license`, a note for the body) from each source's licence (role -> licence or None).
    One licence: that one; several: `other`, and the note (also logged as a warning) lists them."""
    known = {role: lic for role, lic in licenses.items() if lic}
    distinct = sorted(set(known.values()))
    if not distinct:
        return None, "No source card names a licence; check the sources' terms before using or sharing this model."
    if len(distinct) == 1:
        unknown = [r for r, lic in licenses.items() if not lic]
        return distinct[0], (f"Licence `{distinct[0]}`, inherited from the sources"
                             + (f" (no licence found for {', '.join(unknown)})" if unknown else "") + ".")
    note = ("The sources have different licences: " + ", ".join(f"{r} `{lic}`" for r, lic in known.items())
            + "; the merged model is bound by all of them.")
    log.warning("model card: %s", note)
    return "other", note


def recipe_sources(recipe: Mapping[str, Any]) -> dict[str, str]:
    """role -> source reference of a recipe as `Recipe.to_dict` writes it."""
    sources = {k: recipe[k] for k in SOURCE_KEYS if isinstance(recipe.get(k), str)}
    for i, m in enumerate(recipe.get("models") or []):
        if isinstance(m, dict) and isinstance(m.get("model"), str) and m["model"] not in ROLE_REFS:
            sources[f"models[{i}]"] = m["model"]
    return sources


def card_data(method: str, sources: Mapping[str, str], license: str | None):
    """The `ModelCardData` of a merged model whose sources are `sources` (role -> reference)."""
    from huggingface_hub import ModelCardData

    base = list(dict.fromkeys(h for h in map(hub_id_of, sources.values()) if h))
    return ModelCardData(
        base_model=base or None, base_model_relation="merge" if base else None, license=license,
        language=list(LANGUAGES), pipeline_tag=PIPELINE_TAG, library_name="transformers",
        tags=["merge", "vlm-merge", method.replace(" ", "-"), "japanese", "vision-language"],
    )


def _eval_table(rows: Sequence[EvalRow]) -> list[str]:
    if not rows:
        return []
    return ["## Evaluation", "", "Means with 95% bootstrap intervals.", "",
            "| benchmark | metric | model | mean | 95% CI | questions |", "|---|---|---|---|---|---|",
            *[f"| {r.benchmark} | {r.metric} | {r.model} | {r.mean:.4f} | [{r.low:.4f}, {r.high:.4f}] | {r.questions} |"
              for r in rows], ""]


def render_card(title: str, method: str, recipe: Mapping[str, Any], sources: Mapping[str, str],
                details: Sequence[str] = (), evals: Sequence[EvalRow] = (), cache_dir: str | Path | None = None,
                names: Mapping[str, str] | None = None) -> str:
    """The card's text. `names` maps a source reference to how it is shown (default: as given)."""
    from huggingface_hub import ModelCard

    shown = dict(names or {})
    license, note = inherited_license({role: source_license(ref, cache_dir) for role, ref in sources.items()})
    data = card_data(method, sources, license)
    body = [
        f"# {title}", "",
        f"Built with vlm-merge {vlm_merge.__version__} ({method}). " + (
            f"The language model and the VLMs' {' and '.join(recipe['modules'])} were merged; the rest is copied from the VLM."
            if recipe.get("modules") else "The vision encoder and projector are copied unchanged from the VLM; only the "
            "language model was merged."), "",
        "## Sources", "", "| role | model |", "|---|---|",
        *[f"| {role} | `{shown.get(ref, ref)}` |" for role, ref in sources.items()], "",
        *_eval_table(evals),
        "## Recipe", "", f"Replay with `vlm-merge merge {RECIPE_FILE} OUT` (the recipe is also in this repo):", "",
        "```yaml", _replace_refs_yaml(recipe, shown).rstrip(), "```", "",
        "## Licence", "", note or "", "",
    ]
    if details:
        body += [_DETAILS, "", *[f"- {d}" for d in details], ""]
    return str(ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body)))


def _replace_refs_yaml(recipe: Mapping[str, Any], names: Mapping[str, str]) -> str:
    def sub(v: Any) -> Any:
        if isinstance(v, str):
            return names.get(v, v)
        if isinstance(v, list):
            return [sub(x) for x in v]
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        return v

    plain = json.loads(json.dumps(dict(recipe), default=str))  # tuples -> lists, anything else as text
    return yaml.safe_dump(sub(plain), sort_keys=False, allow_unicode=True, default_flow_style=None)


def model_card(title: str, method: str, recipe: dict, sources: dict[str, str], details: list[str] | None = None) -> str:
    """The card written beside a merged model: sources as given (local paths included)."""
    return render_card(title, method, recipe, sources, details or ())


def _card_title_and_details(card: Path) -> tuple[str | None, str | None, list[str]]:
    """(title, method, details) of a card this module wrote, as far as they can be read back."""
    if not card.is_file():
        return None, None, []
    text = card.read_text(encoding="utf-8", errors="replace")
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), None)
    method = m.group(1) if (m := re.search(r"Built with vlm-merge \S+ \(([^)]*)\)", text)) else None
    details: list[str] = []
    if _DETAILS in text:
        for line in text.split(_DETAILS, 1)[1].splitlines():
            if line.startswith("## "):
                break
            if line.startswith("- "):
                details.append(line[2:])
    return title, method, details


def public_card(model_dir: str | Path, evals: Sequence[EvalRow] = (), cache_dir: str | Path | None = None,
                title: str | None = None) -> str:
    """The card to publish for vlm-merge output `model_dir`: rebuilt from its `merge_recipe.yaml` and card,
    every source by Hub id or `local:NAME` (in the detail lines too); a detail line that would still show a local
    path is left out, and a
    card that still holds one (the output's own path, a source's, the home or working directory) is refused."""
    from vlm_merge.io.safe_load import load_yaml

    model_dir = Path(model_dir)
    recipe_path = model_dir / RECIPE_FILE
    if not recipe_path.is_file():
        raise VlmMergeError(f"{model_dir}: no {RECIPE_FILE}; push publishes outputs of vlm-merge chat-vector, merge or evolve")
    recipe = load_yaml(recipe_path, "recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("merge_method"), str):
        raise VlmMergeError(f"{recipe_path}: not a vlm-merge recipe (no merge_method); it is not a vlm-merge output")
    sources = recipe_sources(recipe)
    names = {ref: public_name(ref) for ref in sources.values()}
    old_title, method, details = _card_title_and_details(model_dir / "README.md")
    private = _local_strings(model_dir, sources.values())
    for ref in sorted(sources.values(), key=len, reverse=True):  # a source path in a detail line becomes its name
        details = [d.replace(ref, names[ref]) for d in details]
    details = [d for d in details if not any(p in d for p in private) and not _ABSOLUTE_PATH.search(d)]
    card = render_card(title or old_title or f"{recipe['merge_method']} merge", method or recipe["merge_method"],
                       recipe, sources, details, evals, cache_dir, names)
    leaked = [p for p in private if p in card] + [m.group(1) for m in _ABSOLUTE_PATH.finditer(card)]
    if leaked:
        raise VlmMergeError(f"{model_dir}: the public card would show the local path {leaked[0]!r}; not published")
    return card


def _local_strings(model_dir: Path, refs) -> list[str]:
    """The local paths a public card must not show: the output's, every source path's, home, cwd."""
    out = {str(model_dir), str(model_dir.resolve()), str(Path.home()), str(Path.cwd())}
    for ref in refs:
        if hub_id_of(ref) is None or Path(ref).expanduser().exists():
            out |= {ref, str(Path(ref).expanduser().resolve())}
    return sorted((p for p in out if len(p) > 1), key=len, reverse=True)


def eval_rows_from_run(run_dir: str | Path, model: str = "this model") -> list[EvalRow]:
    """The scores of a `vlm-merge eval` run directory (its scores.json) as card rows."""
    from vlm_merge.io.safe_load import Want, check_fields, load_json

    path = Path(run_dir) / "scores.json"
    meta = load_json(path, "scores file")
    agg = Want((dict,), fields={k: Want((int, float), required=True) for k in ("mean", "low", "high")})
    check_fields(meta, {"scores": Want((dict,), required=True),
                        "benchmark": Want((dict,), required=True, fields={"name": Want((str,), required=True),
                                                                          "questions_evaluated": Want((int,), required=True)})},
                 str(path))
    for metric, value in meta["scores"].items():
        check_fields({metric: value}, {metric: agg}, str(path), "scores.")
    b = meta["benchmark"]
    return [EvalRow(b["name"], metric, model, a["mean"], a["low"], a["high"], b["questions_evaluated"])
            for metric, a in meta["scores"].items()]


def eval_rows_from_test_report(path: str | Path) -> list[EvalRow]:
    """The models of an evolve run's held-out report (test_report.json) as card rows."""
    from vlm_merge.io.safe_load import load_json

    rec = load_json(Path(path), "held-out report")
    try:
        return [EvalRow(str(rec["benchmark"]), str(rec["metric"]), name, float(m["mean"]), float(m["low"]),
                        float(m["high"]), int(rec["questions"])) for name, m in rec["models"].items()]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise VlmMergeError(f"{path}: not an evolve held-out report (benchmark, metric, questions, models)") from None
