"""The llama.cpp backend of `vlm-merge eval` (`--backend llama.cpp --model X.gguf --mmproj mmproj.gguf`): the same
benchmarks, prompts, metrics, predictions and scores.json as the transformers backend, answered by llama.cpp
(llama-cpp-python, the `llamacpp` extra).

What is the same: the prompt text (built by `eval.prompts` with the model's HF processor: the `processor/` folder
`vlm-merge export-gguf` writes beside the GGUF files, or `--processor DIR`) and its token ids (the HF tokenizer's,
so a tokenizer llama.cpp cannot reproduce exactly still gets the transformers backend's input); decoding (greedy,
HF's repetition penalty over prompt and answer tokens, `min_new_tokens` holding EOS back). What is llama.cpp's own:
the weights as stored in the GGUF (quantised or not), the image preprocessing and vision tower (clip.cpp / mtmd),
the arithmetic. Beam search is refused (llama.cpp has none).
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.decoding import GenerationSettings
from eval.generation import Generation
from eval.prompts import build_prompt, image_token
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.gguf import read_gguf_metadata

PROCESSOR_DIR = "processor"  # export-gguf's copy of the HF processor / tokenizer files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class LlamaCppModel:
    """A GGUF language model and its mmproj loaded in llama.cpp, with the HF tokenizer that builds its inputs."""

    model_path: Path
    mmproj_path: Path
    llm: object  # llama_cpp.Llama
    mtmd_ctx: object
    tokenizer: object
    threads: int
    processor: object = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def describe(self, name: str | None = None) -> dict:
        """What identifies the model in a score file (the transformers backend's keys, for GGUF files)."""
        import llama_cpp

        return {
            "name": name or self.model_path.stem,
            "name_or_path": str(self.model_path),
            "class": "llama.cpp",
            "dtype": self.model_path.stem.rsplit("-", 1)[-1],
            "device": "cpu",
            "parameters": int(llama_cpp.llama_model_n_params(self.llm.model)),
            "config_sha256": _sha256(self.model_path),
            "mmproj": str(self.mmproj_path),
            "mmproj_sha256": _sha256(self.mmproj_path),
        }

    def _eval_image(self, image) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = mtmd.mtmd_input_text()
            marker = mtmd.mtmd_default_marker()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
            if mtmd.mtmd_tokenize(self.mtmd_ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
                raise VlmMergeError(f"{self.mmproj_path}: llama.cpp could not tokenize an image")
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                new_past = llama_cpp.llama_pos(0)
                rc = mtmd.mtmd_helper_eval_chunk_single(
                    self.mtmd_ctx, self.llm._ctx.ctx, chunk, llama_cpp.llama_pos(self.llm.n_tokens),
                    llama_cpp.llama_seq_id(0), self.llm.n_batch, True, ctypes.byref(new_past))
                if rc:
                    raise VlmMergeError(f"{self.mmproj_path}: llama.cpp could not encode an image (status {rc})")
                self.llm.n_tokens = new_past.value
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype(np.float32)

    def answer(self, image, prompt: str, settings: GenerationSettings) -> Generation:
        """Greedy answer to one image + prompt: text ids by the HF tokenizer, the image through mtmd."""
        ids = self.tokenizer(prompt).input_ids
        image_id = self.tokenizer.convert_tokens_to_ids(self._image_token)
        if ids.count(image_id) != 1:
            raise VlmMergeError(f"the prompt holds {ids.count(image_id)} image tokens; the llama.cpp backend takes one")
        cut = ids.index(image_id)
        llm = self.llm
        llm.reset()
        llm._ctx.kv_cache_clear()
        if cut:
            llm.eval(ids[:cut])
        self._eval_image(image)
        if ids[cut + 1 :]:
            llm.eval(ids[cut + 1 :])
        seen = set(ids[:cut] + ids[cut + 1 :])
        eos = llm.token_eos()
        out: list[int] = []
        prompt_tokens = llm.n_tokens
        for step in range(settings.max_new_tokens):
            logits = self._last_logits()
            if settings.repetition_penalty != 1.0 and seen:
                idx = np.fromiter(seen, dtype=np.int64)
                vals = logits[idx]
                logits[idx] = np.where(vals > 0, vals / settings.repetition_penalty, vals * settings.repetition_penalty)
            if step < settings.min_new_tokens:
                logits[eos] = -np.inf
            token = int(np.argmax(logits))
            out.append(token)
            if token == eos or llm.n_tokens >= llm.n_ctx():
                break
            seen.add(token)
            llm.eval([token])
        text = self.tokenizer.decode(out, skip_special_tokens=True).strip()
        return Generation(text=text, token_ids=out, prompt_tokens=prompt_tokens)

    @property
    def _image_token(self) -> str:
        return image_token(self.processor)

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()


def open_llama(path: str | Path, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)` with llama.cpp's extra CPU buffer types off (`use_extra_bufts`:
    AMX and weight repacking). With them the native build on this project's machines segfaults in `llama_decode`
    on every quantised model (measured on Q8_0 / Q5_0 / Q4_0 weights; F16 runs), so weights stay in plain CPU
    buffers. llama-cpp-python does not expose the flag: the default parameters it starts from are wrapped while
    the model loads."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    defaults = lib.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        lib.llama_model_default_params = defaults


def load_llamacpp(model: str | Path, mmproj: str | Path | None, processor_dir: str | Path | None = None,
                  max_ctx: int = 4096, threads: int = 1) -> tuple[LlamaCppModel, object]:
    """Load `model` (GGUF) and `mmproj` in llama.cpp and the HF processor from `processor_dir` (default: the
    `processor/` folder beside the GGUF file, as export-gguf writes it); the context is the model's trained length,
    at most `max_ctx`."""
    from vlm_merge.extras import require_extra

    require_extra("llamacpp", "'vlm-merge eval --backend llama.cpp'")
    import llama_cpp.mtmd_cpp as mtmd
    from transformers import AutoProcessor

    model_path = Path(model).expanduser()
    if not model_path.is_file() or model_path.suffix != ".gguf":
        raise VlmMergeError(f"--model {model}: not a .gguf file; the llama.cpp backend loads a GGUF model")
    if mmproj is None:
        raise VlmMergeError("--backend llama.cpp needs --mmproj (the mmproj GGUF export-gguf wrote)")
    mmproj_path = Path(mmproj).expanduser()
    if not mmproj_path.is_file():
        raise VlmMergeError(f"--mmproj {mmproj}: no such file")
    proc_dir = Path(processor_dir).expanduser() if processor_dir else model_path.parent / PROCESSOR_DIR
    if not (proc_dir / "tokenizer_config.json").is_file():
        raise VlmMergeError(f"{proc_dir}: no HF processor files; pass --processor DIR (the model the GGUF was "
                            "exported from) or use export-gguf's output directory")
    processor = AutoProcessor.from_pretrained(proc_dir, local_files_only=True)
    trained = read_gguf_metadata(model_path).get("llama.context_length")
    n_ctx = min(max_ctx, int(trained)) if isinstance(trained, int) else max_ctx
    try:
        llm = open_llama(model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=False,
                         verbose=False)
    except ValueError as e:
        raise VlmMergeError(f"{model_path}: llama.cpp could not load it ({e})") from None
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = threads
    params.print_timings = False
    ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)
    if not ctx or not mtmd.mtmd_support_vision(ctx):
        raise VlmMergeError(f"{mmproj_path}: llama.cpp could not load it as a vision mmproj")
    m = LlamaCppModel(model_path, mmproj_path, llm, ctx, processor.tokenizer, threads, processor=processor)
    m._closers.append(lambda: mtmd.mtmd_free(ctx))
    return m, processor


def generate_llamacpp(
    model: LlamaCppModel, processor, images: Sequence, questions: Sequence[str], *, template="chat",
    settings: GenerationSettings | None = None, batch_size: int = 8, progress: bool = False,
    on_batch: Callable[[list[int], list[Generation]], None] | None = None,
) -> list[Generation]:
    """`eval.generation.generate` for a llama.cpp model: one question at a time (llama.cpp's batch is its
    context), each recorded through `on_batch` as it finishes."""
    settings = settings or GenerationSettings()
    if settings.num_beams != 1:
        raise VlmMergeError(f"num_beams={settings.num_beams}: the llama.cpp backend decodes greedily; pass "
                            "--num-beams 1")
    from tqdm import tqdm

    out = []
    for i, (image, question) in enumerate(tqdm(list(zip(images, questions)), disable=not progress, desc="llama.cpp")):
        g = model.answer(image, build_prompt(processor, question, template), settings)
        out.append(g)
        if on_batch is not None:
            on_batch([i], [g])
    return out
