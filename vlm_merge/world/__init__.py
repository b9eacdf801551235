"""The miniature world: tiny English/Japanese LMs and an English VLM where merging measurably helps.

- `scenes`: PIL scenes of coloured shapes, EN/JA questions (several phrasings), content scoring;
- `text`: chat format, pretraining corpora, the shared BPE tokenizer;
- `datasets`: the VQA sets (eval custom-benchmark JSONL + PNG);
- `train` / `build`: training every part on CPU and saving HF checkpoints (`build_zoo`);
- `evaluate`: content accuracy, exact match, Japanese ROUGE-L, paired bootstrap;
- `experiment`: the bar (controls vs Chat Vector at the dev-chosen scale) over seeds;
- `vlm_merge.cli.world`: `vlm-merge zoo build|bar` (`add_world_commands`).
"""

from importlib import resources
from pathlib import Path


def _find_shipped_zoo() -> Path:
    """Where the prebuilt zoo is: `vlm_merge/_zoo/` in an installed wheel (package data, see pyproject.toml),
    else `assets/miniature-zoo/` of the source tree this package runs from (a checkout, an editable install)."""
    packaged = resources.files("vlm_merge") / "_zoo"
    if isinstance(packaged, Path) and (packaged / "zoo.json").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "assets" / "miniature-zoo"


SHIPPED_ZOO = _find_shipped_zoo()


def shipped_zoo() -> Path:
    """The prebuilt zoo of one seed (assets/miniature-zoo, shipped in the wheel): en-base, ja-base, en-vlm, data."""
    from vlm_merge.errors import VlmMergeError

    if not (SHIPPED_ZOO / "zoo.json").exists():
        raise VlmMergeError(f"{SHIPPED_ZOO}: no prebuilt zoo; build one with `vlm-merge zoo build --out DIR`")
    return SHIPPED_ZOO


def read_zoo_meta(path: Path) -> dict:
    """A zoo's zoo.json (a `--zoo` is user input): read by safe_load, `data` a mapping of split -> relative file,
    `seed` a whole number."""
    from vlm_merge.errors import VlmMergeError
    from vlm_merge.io.safe_load import Want, check_fields, load_json

    meta = load_json(path, "zoo description")
    check_fields(meta, {"data": Want((dict,), required=True), "seed": Want((int,), required=True)}, str(path))
    for split, file in meta["data"].items():
        if not isinstance(file, str) or Path(file).is_absolute() or ".." in Path(file).parts:
            raise VlmMergeError(f"{path}: data[{split!r}] must be a file name inside the zoo, not {str(file)[:40]!r}")
    return meta
