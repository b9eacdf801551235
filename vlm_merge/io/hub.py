"""The Hugging Face Hub round trip: model ids resolved to local snapshots (downloaded when online), merged
models published.

Download (`fetch_model`). A model reference that is not a local directory is a Hub id, `ORG/NAME` or
`ORG/NAME@REVISION` (a branch, tag or commit; `--revision` on single-model commands means the same).
Online, `huggingface_hub.snapshot_download` fetches what vlm-merge reads (`CONFIG_PATTERNS` and
`WEIGHT_PATTERNS`: configs, tokenizer, processor and chat-template files, the model card, and the
safetensors weights, or the PyTorch `.bin` shards when the repo has no safetensors), with huggingface_hub's
progress bars; it skips files already complete in the cache and resumes partial ones, so a rerun continues
an interrupted download. Offline (`HF_HUB_OFFLINE=1`, or `--offline`, which sets it for the process) only
the cache is read, and an uncached id is one line naming the exact `hf download ...` command that fetches
it (configs and safetensors: offline, whether a repo has only `.bin` shards cannot be known).

Publish (`push_folder`). A vlm-merge output goes to the Hub in one `upload_folder` call, after
`create_repo` (which makes it private with `--private`): the folder's files as they are, except its
README.md, which is replaced by the public card (`vlm_merge.io.card.public_card`: Hub ids for the
sources, no local paths). The repo id, the token and the files are checked before anything is sent.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vlm_merge.errors import VlmMergeError

# What a command reads from a model repo, as `allow_patterns` (fnmatch: `*` also crosses `/`).
CONFIG_PATTERNS = (
    "*.json",  # config, generation config, tokenizer(_config), special tokens, processor, index files
    "*.jinja",  # chat templates (transformers 4.48+ keeps them apart)
    "tokenizer.model", "spiece.model", "*.tiktoken", "vocab.txt", "vocab.json", "merges.txt",
    "README.md", "LICENSE*",  # the card carries the licence the merged model inherits
)
WEIGHT_PATTERNS = {"safetensors": ("*.safetensors",), "bin": ("pytorch_model*.bin",)}
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's own reading of boolean variables


@dataclass(frozen=True)
class HubRef:
    """A Hub model id and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_ref(text: str, revision: str | None = None) -> HubRef | None:
    """`ORG/NAME` or `ORG/NAME@REVISION` as a `HubRef`; None for anything that is not a valid Hub id.
    `revision` (a `--revision` flag) applies when the text names none; naming two different ones is an error."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo, sep, rev = text.partition("@")
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")) or (sep and not rev):
        return None
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    if rev and revision and rev != revision:
        raise VlmMergeError(f"{text}: names revision {rev!r} but --revision is {revision!r}; give one")
    return HubRef(repo, rev or revision)


def with_revision(text: str, revision: str | None) -> str:
    """Model reference `text` with a `--revision` folded in (`ORG/NAME@REVISION`); a local directory or a
    reference that is not a Hub id with a revision is the one-line error."""
    if revision is None:
        return text
    if Path(text).expanduser().exists() or (ref := parse_hub_ref(text, revision)) is None:
        raise VlmMergeError(f"--revision {revision}: applies to Hugging Face ids only, and {text!r} is not one")
    return str(ref)


def hub_offline() -> bool:
    """Whether downloads are off: HF_HUB_OFFLINE as huggingface_hub read it at import, or as it is now
    (`--offline` sets it when the command starts)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_VALUES


def download_command(ref: HubRef, cache_dir: str | Path | None = None) -> str:
    """The `hf download` command line that fetches what `fetch_model` would (huggingface_hub's CLI)."""
    parts = ["hf", "download", ref.repo_id]
    if ref.revision:
        parts += ["--revision", ref.revision]
    for pattern in (*CONFIG_PATTERNS, *WEIGHT_PATTERNS["safetensors"]):
        parts += ["--include", f"'{pattern}'"]
    if cache_dir is not None:
        parts += ["--cache-dir", str(cache_dir)]
    return " ".join(parts)


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def fetch_model(text: str, cache_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """The local snapshot of Hub model `text` (`ORG/NAME[@REVISION]`): from the cache when offline, else
    downloaded (or completed) by `snapshot_download` with `CONFIG_PATTERNS` and the safetensors (else `.bin`)
    `WEIGHT_PATTERNS`. Every failure is one line."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    ref = parse_hub_ref(text, revision)
    if ref is None:
        raise VlmMergeError(f"{text}: no such model directory (and not a Hugging Face id of the form org/name)")
    offline = hub_offline()

    def snapshot(weights: str) -> Path:
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache_dir, local_files_only=offline,
                                      allow_patterns=[*CONFIG_PATTERNS, *WEIGHT_PATTERNS[weights]]))

    try:
        path = snapshot("safetensors")
        if not _has_weights(path):  # an older repo with PyTorch shards only
            path = snapshot("bin")
    except hf_errors.LocalEntryNotFoundError:  # also an incomplete snapshot offline
        if offline:
            raise VlmMergeError(
                f"{text}: not a local directory and not in the Hugging Face cache, and downloads are off (HF_HUB_OFFLINE "
                f"or --offline); download it with `{download_command(ref, cache_dir)}` or pass its local path"
            ) from None
        raise VlmMergeError(f"{text}: not a local directory, not in the Hugging Face cache, and the Hub cannot be reached; "
                            f"check the connection, or download it with `{download_command(ref, cache_dir)}`") from None
    except hf_errors.GatedRepoError:
        raise VlmMergeError(f"{ref}: a gated repo; accept its terms on the Hub and log in (`hf auth login`)") from None
    except hf_errors.RepositoryNotFoundError:
        raise VlmMergeError(f"{ref.repo_id}: no such model on the Hub (or it is private: log in with `hf auth login`)") from None
    except hf_errors.RevisionNotFoundError:
        raise VlmMergeError(f"{ref.repo_id}: no revision {ref.revision!r} on the Hub") from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VlmMergeError(f"{ref}: download failed ({first[:200]}); rerun to resume it") from None
    return path


# -- publishing -----------------------------------------------------------------------------------------

class HubApi(Protocol):
    """The two calls of `huggingface_hub.HfApi` that publishing makes."""

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False,
                    repo_type: str | None = None): ...

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, commit_message: str | None = None,
                      repo_type: str | None = None, ignore_patterns: list[str] | None = None): ...


def check_repo_id(repo_id: str, what: str = "--push-to-hub") -> str:
    """`repo_id` if it is a Hub model id of the form ORG/NAME, else the one-line error (`what` names the option)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("expected exactly one '/'")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).strip().splitlines()[0]
        raise VlmMergeError(f"{what} {repo_id!r}: not a Hub repo id of the form ORG/NAME ({reason[:160]})") from None
    return repo_id


def check_can_push(repo_id: str, what: str = "--push-to-hub") -> str:
    """Everything about a push that can fail before the work it publishes: the id, offline mode, a token."""
    from huggingface_hub import get_token

    check_repo_id(repo_id, what)
    if hub_offline():
        raise VlmMergeError(f"{what} {repo_id}: downloads and uploads are off (HF_HUB_OFFLINE or --offline)")
    if not get_token():
        raise VlmMergeError(f"{what} {repo_id}: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN")
    return repo_id


PUSH_IGNORE = [".*", "**/.*", "__pycache__/*"]  # hidden files (temp dirs, caches) never leave the machine


def push_folder(folder: str | Path, repo_id: str, card: str, *, private: bool = False, api: HubApi | None = None,
                commit_message: str | None = None) -> str:
    """Publish `folder` to model repo `repo_id` with `card` as its README.md: `create_repo` (exist_ok,
    `private`) and one `upload_folder` of a staging directory holding links to the folder's files and the
    card (the folder itself is not changed). Returns the repo's URL."""
    folder = Path(folder)
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise VlmMergeError(f"{folder}: not a directory to push")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    from huggingface_hub import errors as hf_errors

    with tempfile.TemporaryDirectory(prefix="vlm-merge-push-") as tmp:
        stage = Path(tmp)
        for src in sorted(folder.rglob("*")):
            rel = src.relative_to(folder)
            if src.is_dir() or rel.as_posix() == "README.md" or any(p.startswith(".") for p in rel.parts):
                continue
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).symlink_to(src.resolve())
        (stage / "README.md").write_text(card, encoding="utf-8")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=stage, repo_type="model", ignore_patterns=PUSH_IGNORE,
                              commit_message=commit_message or f"vlm-merge: upload {folder.name}")
        except (hf_errors.HfHubHTTPError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VlmMergeError(f"push to {repo_id} failed ({first[:200]}); nothing else changed, rerun to retry") from None
    return f"https://huggingface.co/{repo_id}"
