"""`build_zoo(out, seed)`: train and save the whole miniature world as ordinary HF checkpoints.

Layout of `out`:
- ``en-base/``  LlamaForCausalLM trained from scratch on English (some Japanese and parallel text);
- ``ja-base/``  en-base continued-pretrained on Japanese (with English replay);
- ``en-vlm/``   LlavaForConditionalGeneration: pretrained CLIP vision tower + MLP projector + en-base's LM,
  tuned on English VQA (llava-hf processor files, chat template);
- ``data/``     images and {en,ja}-{dev,test}.jsonl (eval custom-benchmark schema);
- ``zoo.json``  settings, seed, timings, early-stopping record; ``train_log.json`` losses per stage.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from vlm_merge.engine import torch_threads
from vlm_merge.io.convert import CHAT_TEMPLATES
from vlm_merge.io.outputs import AtomicDir
from vlm_merge.world import datasets, evaluate, scenes, text, train
from vlm_merge.world.train import WorldSettings

log = logging.getLogger(__name__)

CHAT_TEMPLATE = CHAT_TEMPLATES["llama"]  # llava-hf's llava-1.5 template, as transformers 5 saves it
PARTS = ("en-base", "ja-base", "en-vlm")


def _write_json(path: Path, data, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n", encoding="utf-8")


def write_zoo_json(zoo: Path, meta: dict) -> None:
    """`zoo`/zoo.json: its top-level keys sorted, the settings in their own order. A mix is drawn from in its keys'
    order (`text.mixture_sampler`), so the settings zoo.json records rebuild the same zoo only in that order."""
    _write_json(zoo / "zoo.json", dict(sorted(meta.items())), sort_keys=False)


def save_llm(model: LlamaForCausalLM, tok, out: Path) -> None:
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(out)
    text.write_tokenizer(tok, out)


def write_processor_files(out: Path, vlm_tok) -> None:
    """tokenizer, chat template, preprocessor_config.json (CLIPImageProcessor) and processor_config.json."""
    text.write_tokenizer(vlm_tok, out, vlm=True, chat_template=CHAT_TEMPLATE)
    size = scenes.IMAGE_SIZE
    _write_json(out / "preprocessor_config.json", {
        "image_mean": list(train.CLIP_MEAN), "image_std": list(train.CLIP_STD),
        "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 1 / 255,
    })
    _write_json(out / "processor_config.json", {
        "image_token": text.IMAGE_TOKEN, "num_additional_image_tokens": 1, "patch_size": scenes.CELL,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default",
    })


def build_vlm(en: LlamaForCausalLM, tower, vlm_tok, s: WorldSettings, seed: int) -> LlavaForConditionalGeneration:
    """A LLaVA with `tower`, a fresh projector and `en`'s language model (embedding rows for <image>/<pad>)."""
    image_id, pad_id = vlm_tok.token_to_id(text.IMAGE_TOKEN), vlm_tok.token_to_id(text.PAD_TOKEN)
    rows = vlm_tok.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(seed)
    vlm = LlavaForConditionalGeneration(train.llava_config(s, rows, image_id, pad_id))
    vlm.model.vision_tower.load_state_dict(tower.state_dict())
    state = en.state_dict()
    with torch.no_grad():
        emb, head = state["model.embed_tokens.weight"], state["lm_head.weight"]
        extra = rows - emb.shape[0]
        new_emb = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)])
        new_head = torch.cat([head, head.mean(0, keepdim=True).expand(extra, -1)])
        lm_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        lm_state["embed_tokens.weight"] = new_emb
        vlm.model.language_model.load_state_dict(lm_state)
        vlm.lm_head.weight.copy_(new_head)
    return vlm


def build_zoo(out: str | Path, seed: int = 0, settings: WorldSettings | None = None, progress: bool = True,
              force: bool = False, dev_check: int = 150) -> Path:
    """Train and write the zoo of `seed` into `out` (see the module docstring). Returns `out`."""
    s = settings or WorldSettings()
    s.check()
    out = Path(out).expanduser()
    empty = out.is_dir() and not any(out.iterdir())  # an empty directory is replaced without --force: nothing to lose
    atomic = AtomicDir(out, force or empty)
    with atomic as tmp, torch_threads(s.threads):  # threads restored afterwards
        t0 = time.perf_counter()
        timings, losses = {}, {}
        train.seed_all(seed)

        def stage(name):
            losses[name] = []
            log.info("stage %s", name)
            return losses[name]

        t = time.perf_counter()
        book = s.phrasebook()
        tok = text.build_tokenizer(seed, book)
        vlm_tok = text.vlm_tokenizer(tok)
        files = datasets.write_datasets(tmp / "data", seed, book)
        timings["data+tokenizer"] = time.perf_counter() - t

        t = time.perf_counter()
        torch.manual_seed(seed)
        en = LlamaForCausalLM(train.lm_config(s, tok.get_vocab_size()))
        train.train_lm(en, tok, s.en_mix, seed * 1000 + 1, s.en_steps, s.en_lr, s.batch, "english base", progress, stage("en-base"),
                       s.qa_turns, group_by_length=s.group_by_length, book=book)
        save_llm(en, tok, tmp / "en-base")
        timings["en-base"] = time.perf_counter() - t

        t = time.perf_counter()
        save_llm(train_ja_base(en, tok, s, seed, progress, stage("ja-base")), tok, tmp / "ja-base")
        timings["ja-base"] = time.perf_counter() - t

        t = time.perf_counter()
        tower = train_tower(s, seed, progress, stage("vision"))
        timings["vision"] = time.perf_counter() - t

        t = time.perf_counter()
        steps, checks = train_en_vlm(en, tower, vlm_tok, s, seed, files["en-dev"], tmp / "en-vlm", progress, stage("en-vlm"),
                                     dev_check)
        timings["en-vlm"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0

        _write_json(tmp / "train_log.json", losses)
        meta = {
            "format": "vlm-merge miniature world", "seed": seed, "settings": s.as_dict(), "parts": list(PARTS),
            "data": {k: str(v.relative_to(tmp)) for k, v in files.items()}, "vlm_steps": steps,
            "vlm_checks": checks, "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "torch_threads": s.threads,
        }
        write_zoo_json(tmp, meta)
    return atomic.target


def train_ja_base(en: LlamaForCausalLM, tok, s: WorldSettings, seed: int, progress: bool, losses: list) -> LlamaForCausalLM:
    """The Japanese continued pretraining of `build_zoo`: a copy of `en` trained on `s.ja_mix` (`en` is unchanged)."""
    ja = copy.deepcopy(en)
    train.train_lm(ja, tok, s.ja_mix, seed * 1000 + 2, s.ja_steps, s.ja_lr, s.batch, "japanese base", progress, losses,
                   s.qa_turns, s.ja_block_lr_scale, s.ja_train_layers, s.group_by_length, book=s.phrasebook())
    return ja


def train_tower(s: WorldSettings, seed: int, progress: bool, losses: list):
    """The vision tower of `build_zoo` (`train.train_vision` with the build's seed for that stage)."""
    return train.train_vision(s, seed * 1000 + 3, progress, losses)


def train_en_vlm(en: LlamaForCausalLM, tower, vlm_tok, s: WorldSettings, seed: int, en_dev: Path, out: Path,
                 progress: bool, losses: list, dev_check: int = 150) -> tuple[int, list[dict]]:
    """The VLM stage of `build_zoo`: `build_vlm` on `en` and `tower`, tuned on English VQA with the early stop on the
    first `dev_check` questions of `en_dev` (0: no checks), saved with its processor files into `out`.
    Returns (steps trained, the dev checks)."""
    from transformers import AutoProcessor

    vlm = build_vlm(en, tower, vlm_tok, s, seed * 1000 + 4)
    out.mkdir()
    write_processor_files(out, vlm_tok)
    processor = AutoProcessor.from_pretrained(str(out))
    dev_rows = datasets.read_rows(en_dev)[:dev_check]
    dev_images = datasets.load_images(en_dev, dev_rows)
    checks = []

    def check(step: int) -> bool:
        """Score English dev; stop once the last `vlm_target_checks` checks all reached `vlm_target`."""
        preds = evaluate.answer(vlm, processor, dev_images, [r["question"] for r in dev_rows])
        acc = float(evaluate.score(dev_rows, preds, rouge=False).content.mean())
        checks.append({"step": step, "en_dev_content_accuracy": acc})
        log.info("english VLM step %d: en dev content accuracy %.3f", step, acc)
        vlm.train()
        recent = checks[-s.vlm_target_checks:]
        return len(recent) == s.vlm_target_checks and all(c["en_dev_content_accuracy"] >= s.vlm_target for c in recent)

    steps = train.train_vlm(vlm, vlm_tok, s, seed * 1000 + 5, progress, losses, check if dev_check else None)
    vlm.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=vlm_tok.token_to_id(text.PAD_TOKEN))
    vlm.save_pretrained(out)
    return steps, checks
