"""LLM judges: chat requests sent to a judge model, every judgment cached on disk.

A `Judge` answers `JudgeRequest`s (chat messages + decoding settings) with `Judgment`s (the reply text and its
token counts). Two backends:

- `OpenAIJudge`: any OpenAI-compatible chat-completions endpoint through the `openai` package (the `judge` extra):
  OpenAI (`OPENAI_API_KEY`), Azure OpenAI's v1 endpoint, a vLLM / llama.cpp / Ollama / `transformers serve` server
  (`base_url`, e.g. http://localhost:8000/v1; a local server needs no key). Requests run on at most `concurrency`
  threads; the client retries connection errors, timeouts, 408 / 409 / 429 and 5xx answers `max_retries` times with
  exponential backoff (the openai client's own retry loop, honouring Retry-After) and gives up on a request after
  `timeout` seconds.
- `TransformersJudge`: a local causal language model directory (safetensors, its own chat template, greedy).

`JudgmentCache` keeps one JSON file per judgment under a directory, keyed by the SHA-256 of the judge's identity
(model name, or a local model's path and config / weight-file hash) and the request (messages, max tokens,
temperature, seed): the prompt holds the question and the answer, so re-scoring the same predictions, or resuming
an interrupted scoring, sends nothing again. A request that fails after the retries is not cached; the others are,
and the error is one line saying how many failed. Each judgment is cached as soon as it is answered, so an
interrupted run keeps what was answered.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from eval.outputs import write_atomic
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.safe_load import load_json

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlm-merge" / "judge"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
LOCAL_SERVER_KEY = "EMPTY"  # what vLLM / llama.cpp servers accept when they were started without --api-key


@dataclass(frozen=True)
class JudgeRequest:
    """One chat request to the judge: messages ({role, content}) and decoding settings."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    max_tokens: int = 1024
    temperature: float = 0.0
    seed: int | None = 0

    @classmethod
    def chat(cls, system: str, user: str, **settings) -> JudgeRequest:
        return cls((("system", system), ("user", user)), **settings)

    def openai_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def key_material(self) -> dict:
        return {"messages": [list(m) for m in self.messages], "max_tokens": self.max_tokens,
                "temperature": self.temperature, "seed": self.seed}


@dataclass(frozen=True)
class Judgment:
    """The judge's reply to one request, its token counts, and whether it came from the cache."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


def prompt_hash(*templates: str) -> str:
    """Short SHA-256 of a judge prompt's fixed text (recorded in score files, so a changed prompt is visible)."""
    return hashlib.sha256("\0".join(templates).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class JudgmentCache:
    """Judgments on disk: `<dir>/<key[:2]>/<key>.json`, written atomically; `dir=None` caches nothing."""

    dir: Path | None

    @staticmethod
    def key(identity: str, request: JudgeRequest) -> str:
        material = json.dumps({"judge": identity, **request.key_material()}, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> Judgment | None:
        if self.dir is None or not self._path(key).is_file():
            return None
        try:
            data = load_json(self._path(key), "judgment cache file")
            return Judgment(str(data["text"]), int(data["prompt_tokens"]), int(data["completion_tokens"]), cached=True)
        except (VlmMergeError, KeyError, TypeError, ValueError):
            return None  # a damaged entry is asked again and rewritten

    def put(self, key: str, judgment: Judgment) -> None:
        if self.dir is None:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {k: v for k, v in asdict(judgment).items() if k != "cached"}
            write_atomic(path, json.dumps(record, ensure_ascii=False))
        except OSError as e:
            raise VlmMergeError(f"judgment cache {self.dir}: cannot write ({e.strerror}); pass another --judge-cache") from None


@dataclass
class Judge(ABC):
    """A judge model; `judge(requests)` answers from the cache first, then asks the model for the rest."""

    cache: JudgmentCache = field(default_factory=lambda: JudgmentCache(DEFAULT_CACHE))
    max_tokens: int | None = None  # caps every request's max_tokens (`--judge-max-tokens`; recorded), None: as published

    @property
    @abstractmethod
    def identity(self) -> str:
        """What the cache key names the judge by."""

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """The judge as recorded in score files."""

    @abstractmethod
    def _ask(self, requests: Sequence[JudgeRequest], answered: Callable[[int, Judgment], None]) -> list[Judgment | Exception]:
        """Ask the model; a failed request is its exception. `answered(i, judgment)` is called as each request is
        answered (it caches the judgment at once, so an interrupted run keeps what was answered)."""

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgment]:
        if self.max_tokens is not None:
            requests = [replace(r, max_tokens=min(r.max_tokens, self.max_tokens)) for r in requests]
        keys = [JudgmentCache.key(self.identity, r) for r in requests]
        found: dict[str, Judgment] = {}
        for k in dict.fromkeys(keys):
            hit = self.cache.get(k)
            if hit is not None:
                found[k] = hit
        todo = {k: r for k, r in zip(keys, requests) if k not in found}
        todo_keys = list(todo)
        answers = self._ask(list(todo.values()), lambda i, j: self.cache.put(todo_keys[i], j)) if todo else []
        failures = []
        for k, answer in zip(todo_keys, answers):
            if isinstance(answer, Exception):
                failures.append(answer)
            else:
                found[k] = answer
        if failures:
            raise VlmMergeError(
                f"judge {self.identity}: {len(failures)} of {len(todo)} requests failed after retries "
                f"(first: {_one_line(failures[0])}); the {len(todo) - len(failures)} answered are cached, rerun to retry")
        asked = set(todo)
        out, seen = [], set()
        for k in keys:  # a request repeated within one call is asked once and counted as cached after that
            j = found[k]
            out.append(j if k not in asked or k not in seen else Judgment(j.text, j.prompt_tokens, j.completion_tokens, True))
            seen.add(k)
        return out


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass
class OpenAIJudge(Judge):
    """A model behind an OpenAI-compatible chat-completions endpoint."""

    model: str = ""
    base_url: str | None = None
    api_key_env: str = DEFAULT_API_KEY_ENV
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if not self.model:
            raise VlmMergeError("--judge-model: name the judge model (e.g. gpt-4o-2024-11-20, or a local model directory)")
        if self.concurrency < 1:
            raise VlmMergeError(f"--judge-concurrency {self.concurrency}: must be at least 1")

    @property
    def identity(self) -> str:
        return self.model

    def describe(self) -> dict[str, object]:
        return {"backend": "openai-compatible", "model": self.model, "base_url": self.base_url or "https://api.openai.com/v1",
                "concurrency": self.concurrency, "max_retries": self.max_retries, "timeout_s": self.timeout,
                "max_tokens_cap": self.max_tokens}

    def _client(self):
        from vlm_merge.extras import require_extra

        require_extra("judge", "an OpenAI-compatible judge")
        import openai

        key = os.environ.get(self.api_key_env)
        if not key:
            if self.base_url is None:
                raise VlmMergeError(f"judge {self.model}: no API key; set {self.api_key_env} (or pass --judge-base-url "
                                    "for a local server)")
            key = LOCAL_SERVER_KEY
        return openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=self.max_retries, timeout=self.timeout)

    def _ask(self, requests: Sequence[JudgeRequest], answered: Callable[[int, Judgment], None]) -> list[Judgment | Exception]:
        import openai

        client = self._client()

        def one(request: JudgeRequest) -> Judgment | Exception:
            extra = {"seed": request.seed} if request.seed is not None else {}
            try:
                reply = client.chat.completions.create(model=self.model, messages=request.openai_messages(),
                                                       max_tokens=request.max_tokens, temperature=request.temperature,
                                                       **extra)
            except openai.APIStatusError as e:  # the server's own words (e.g. a prompt longer than its context)
                return VlmMergeError(f"HTTP {e.status_code}: {_one_line(Exception(e.response.text or e.message))}")
            except openai.OpenAIError as e:
                return e
            if not reply.choices:
                return VlmMergeError("the reply has no choices")
            usage = reply.usage
            return Judgment(reply.choices[0].message.content or "",
                            int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))

        out: list[Judgment | Exception] = [VlmMergeError("not asked")] * len(requests)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            futures = {pool.submit(one, r): i for i, r in enumerate(requests)}
            for future in as_completed(futures):
                i = futures[future]
                out[i] = future.result()
                if isinstance(out[i], Judgment):
                    answered(i, out[i])
        return out


@dataclass
class TransformersJudge(Judge):
    """A local causal language model directory as the judge: its chat template, greedy decoding, one at a time.
    (Sampling settings of a request other than max_tokens are not used: greedy is what temperature 0 asks for.)"""

    path: Path = Path()
    device: str = "cpu"
    _loaded: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()
        if not (self.path / "config.json").is_file():
            raise VlmMergeError(f"--judge-model {self.path}: not a model directory (no config.json)")

    @property
    def identity(self) -> str:
        digest = hashlib.sha256((self.path / "config.json").read_bytes())
        for f in sorted(self.path.glob("*.safetensors")):
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return f"local:{self.path.resolve()}:{digest.hexdigest()[:16]}"

    def describe(self) -> dict[str, object]:
        return {"backend": "transformers", "model": str(self.path.resolve()), "identity": self.identity,
                "device": self.device, "decoding": "greedy", "max_tokens_cap": self.max_tokens}

    def _load(self):
        if self._loaded is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(self.path)
                model = AutoModelForCausalLM.from_pretrained(self.path, use_safetensors=True).to(self.device).eval()
            except (OSError, ValueError) as e:
                raise VlmMergeError(f"--judge-model {self.path}: cannot load as a causal language model "
                                    f"({_one_line(e)})") from None
            if not tokenizer.chat_template:
                raise VlmMergeError(f"--judge-model {self.path}: the tokenizer has no chat template; a judge needs one")
            self._loaded = (tokenizer, model)
        return self._loaded

    def _ask(self, requests: Sequence[JudgeRequest], answered: Callable[[int, Judgment], None]) -> list[Judgment | Exception]:
        import torch

        tokenizer, model = self._load()
        out: list[Judgment | Exception] = []
        for request in requests:
            ids = tokenizer.apply_chat_template(request.openai_messages(), add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"].to(self.device)
            with torch.no_grad():
                generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=request.max_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            new = generated[0, ids.shape[1]:]
            out.append(Judgment(tokenizer.decode(new, skip_special_tokens=True), int(ids.shape[1]), int(new.shape[0])))
            answered(len(out) - 1, out[-1])
        return out


def make_judge(
    model: str, *, base_url: str | None = None, api_key_env: str = DEFAULT_API_KEY_ENV, concurrency: int = 8,
    max_retries: int = 5, timeout: float = 120.0, cache_dir: str | Path | None = DEFAULT_CACHE, device: str = "cpu",
    max_tokens: int | None = None,
) -> Judge:
    """`--judge-model`: an existing directory is a local transformers judge, anything else a model name at an
    OpenAI-compatible endpoint (`base_url`, default OpenAI's). `cache_dir=None` disables the cache."""
    cache = JudgmentCache(Path(cache_dir).expanduser() if cache_dir is not None else None)
    if base_url is None and Path(model).expanduser().is_dir():
        return TransformersJudge(cache=cache, max_tokens=max_tokens, path=Path(model), device=device)
    return OpenAIJudge(cache=cache, max_tokens=max_tokens, model=model, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
                       max_retries=max_retries, timeout=timeout)
