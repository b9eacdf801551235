"""Training the miniature zoo on CPU: the English base, its Japanese continued pretraining, the vision
tower, and the English VLM (LLaVA recipe: frozen pretrained vision tower, projector + language model tuned
on English visual QA, early-stopped on English dev content accuracy).

Everything is deterministic for a seed: data come from `random.Random` streams, weights from
`torch.manual_seed`, and the result does not depend on the CPU thread count (`threads` sets the speed: the
language-model stages give the same sums on 1 or 2 threads, and the vision tower always trains on one).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from vlm_merge.engine import torch_threads
from vlm_merge.world import scenes, text

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
N_PATCH_CLASSES = 1 + len(scenes.COLORS) * len(scenes.SHAPES)


# the parameters of one Llama decoder layer (`model.layers.N.<name>.weight`), which `vlm_train_modules` selects from
LAYER_PARAMETERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                    "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


@dataclass
class WorldSettings:
    """Sizes, steps, learning rates, corpora and wording of one zoo build; the defaults build the shipped zoo
    (docs/miniature-world.md: what each lever does and the overrides that rebuild earlier worlds)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    vision_hidden: int = 64
    vision_layers: int = 2
    batch: int = 32
    en_steps: int = 1200
    en_lr: float = 2e-3
    ja_steps: int = 300
    ja_lr: float = 5e-4
    ja_block_lr_scale: float = 1.0  # the Japanese continued pretraining's block learning rate, relative to ja_lr
    vision_steps: int = 200
    vlm_steps: int = 3200
    # a projector that barely moves from its random start (1e-6) and a language model at 1e-3: the VLM's own
    # layers, not the projector, learn to read the image tokens, so that skill is in the VLM's delta and the
    # Japanese base in the VLM shell cannot read the image without it
    vlm_lr: float = 1e-6  # projector; the language model gets vlm_lr * vlm_lm_lr_scale
    vlm_lm_lr_scale: float = 1000.0
    qa_turns: int = 4  # questions per scene in the text models' reading-comprehension chats
    vlm_turns: int = 3  # questions per image in a VLM training chat (LLaVA's multi-turn conversations)
    vlm_replay: float = 0.15  # share of each VLM batch that is text-only chat (as LLaVA mixes ShareGPT)
    # the replayed documents' mix (None: en_mix): mostly English, with one Japanese chat in twenty, as LLaVA's stage
    # 2 replays mostly-English ShareGPT; the Japanese share keeps the VLM's tuned layers readable by the Japanese
    # base's upper layers, so Chat Vector stays constructive up to scale 0.5-0.75
    vlm_replay_mix: dict | None = field(default_factory=lambda: {"qa-en": 0.65, "xqa-en": 0.15, "text-en": 0.15,
                                                                 "qa-ja": 0.05})
    vlm_train_vocab: bool = False  # whether the VLM stage tunes embed_tokens and lm_head (else only the blocks)
    # which decoder layers each fine-tune trains (None: all; the final norm goes with the last layer): the VLM
    # stage the first two (reading the image), the Japanese continued pretraining the last two and the vocabulary
    ja_train_layers: list[int] | None = field(default_factory=lambda: [2, 3])
    vlm_train_layers: list[int] | None = field(default_factory=lambda: [0, 1])
    # which parameters of those layers the VLM stage trains, as name substrings (e.g. ["self_attn"]; None: all)
    vlm_train_modules: list[str] | None = None
    # batches of documents of similar length, and the VLM stage's text-only chats in a batch of their own:
    # about 1.5x fewer padded tokens per step (HF's `group_by_length`)
    group_by_length: bool = True
    vlm_min_steps: int = 2100  # no early stop before this step: a stage stopped sooner leaves a smaller delta
    vlm_target: float = 0.97  # stop once English dev content accuracy reaches this ...
    vlm_target_checks: int = 2  # ... in this many checks in a row (one check of 150 questions is +-3 points)
    vlm_check_every: int = 150
    # the English base also reads English scenes asked about in Japanese (xqa-ja, a fifth of its documents):
    # cross-lingual questions, which raise Chat Vector's gain over the Japanese base in the VLM shell
    en_mix: dict = field(default_factory=lambda: {"qa-en": 0.35, "xqa-en": 0.1, "xqa-ja": 0.2, "text-en": 0.1,
                                                  "qa-ja": 0.05, "text-ja": 0.05, "para": 0.15})
    ja_mix: dict = field(default_factory=lambda: {"qa-ja": 0.55, "xqa-ja": 0.12, "text-ja": 0.12, "qa-en": 0.1,
                                                  "xqa-en": 0.03, "text-en": 0.03, "para": 0.05})
    # how the world words its scenes, questions and answers (`scenes.Phrasebook`): the question types asked
    # (None: all; the two positional ones keep the English VLM under 0.95; of the counts only colour+shape, since
    # no merge moves a count off the answer prior), "sentence" or "short"
    # answers, counts as digits ("2" / "2個"), the Japanese word order ("aligned": the English one)
    qtypes: list[str] | None = field(default_factory=lambda: ["count_both", "color_of", "shape_of", "more"])
    answers: str = "short"
    count_digits: bool = True
    ja_order: str = "aligned"
    threads: int = 2

    def as_dict(self) -> dict:
        return asdict(self)

    def phrasebook(self) -> scenes.Phrasebook:
        """The `scenes.Phrasebook` of these settings (a bad value raises `VlmMergeError` naming it)."""
        qtypes = scenes.QTYPES if self.qtypes is None else tuple(self.qtypes)
        return scenes.Phrasebook(qtypes, self.answers, self.count_digits, self.ja_order)

    def check(self) -> None:
        """Values that fit their types but not each other: the wording (`phrasebook`) and layer lists that name
        layers the model does not have (which would silently train nothing). Raises `VlmMergeError`."""
        from vlm_merge.errors import VlmMergeError

        self.phrasebook()
        for name in ("ja_train_layers", "vlm_train_layers"):
            bad = [i for i in getattr(self, name) or [] if not 0 <= i < self.layers]
            if bad:
                raise VlmMergeError(f"{name}={getattr(self, name)}: the language model has layers 0-{self.layers - 1} "
                                    f"(layers={self.layers}); no layer {bad[0]}")
        unmatched = [m for m in self.vlm_train_modules or [] if not any(m in p for p in LAYER_PARAMETERS)]
        if unmatched or self.vlm_train_modules == []:
            raise VlmMergeError(f"vlm_train_modules={self.vlm_train_modules}: {unmatched[0] if unmatched else '[]'} "
                                f"names no parameter of a decoder layer ({', '.join(LAYER_PARAMETERS)}); use parts of "
                                "those names, or null for all")

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> WorldSettings:
        """Settings from `base` (e.g. `--smoke` sizes) and `overrides` (`--set NAME=JSON`), each value checked
        against its field's type: a wrong name or type is one `VlmMergeError` naming the setting."""
        from vlm_merge.errors import VlmMergeError

        hints = get_type_hints(cls)
        for name, value in overrides.items():
            if name not in hints:
                raise VlmMergeError(f"--set {name}: not a world setting; known: {', '.join(hints)}")
            if not _fits(value, hints[name]):
                default = getattr(cls(), name)
                example = f" (the default: {name}={json.dumps(default)})" if default is not None else ""
                raise VlmMergeError(f"--set {name}={json.dumps(value)}: expected {_type_name(hints[name])}{example}")
        settings = cls(**{**(base or {}), **overrides})
        try:
            settings.check()
        except VlmMergeError as e:
            raise VlmMergeError(f"--set {e}") from None
        return settings


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a WorldSettings field type (int, float, bool, dict, list[int], X | None)."""
    if isinstance(tp, types.UnionType):
        return any(_fits(value, t) for t in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool or isinstance(value, bool):
        return tp is bool and isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float)
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if tp is dict:
        return isinstance(value, dict) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                               for v in value.values())
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a JSON object of numbers"}.get(
        tp, str(tp).replace("NoneType", "null").replace("None", "null"))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------- models
def lm_config(s: WorldSettings, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=text.MAX_LENGTH,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.02,
    )


def vision_config(s: WorldSettings) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=scenes.IMAGE_SIZE, patch_size=scenes.CELL, hidden_size=s.vision_hidden,
        intermediate_size=2 * s.vision_hidden, num_hidden_layers=s.vision_layers, num_attention_heads=4,
        projection_dim=s.vision_hidden, hidden_act="quick_gelu",
    )


def llava_config(s: WorldSettings, vocab_size: int, image_token_id: int, pad_id: int) -> LlavaConfig:
    cfg = LlavaConfig(
        text_config=lm_config(s, vocab_size).to_dict() | {"pad_token_id": pad_id},
        vision_config=vision_config(s).to_dict(),
        image_token_index=image_token_id, vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=(scenes.GRID * scenes.GRID), projector_hidden_act="gelu",
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def pixels(images) -> torch.Tensor:
    """CLIPImageProcessor's output for images already IMAGE_SIZE square: rescale + normalise."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- batches
def encode_pair(tok: Tokenizer, prompt: str, answer: str, eos_id: int) -> tuple[list[int], int]:
    """Token ids of `prompt answer</s>` (BOS first) and where the answer starts (loss mask boundary)."""
    if not prompt:
        ids = tok.encode(answer).ids + [eos_id]
        return ids, 1
    ids = tok.encode(f"{prompt} {answer}").ids + [eos_id]
    return ids, len(tok.encode(prompt).ids)


def encode_text_chat(tok: Tokenizer, doc: tuple[str, str], eos_id: int) -> tuple[list[int], list[bool]]:
    """A replayed text-only chat of the VLM stage: the ids of `encode_pair` and which positions are trained on (the
    answer and its EOS)."""
    ids, start = encode_pair(tok, *doc, eos_id)
    return ids, [i >= start for i in range(len(ids))]


def collate_chats(chats: list[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch whose labels are the answer tokens only (-100 elsewhere)."""
    width = max(len(ids) for ids, _ in chats)
    input_ids = torch.full((len(chats), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chats), width), -100, dtype=torch.long)
    mask = torch.zeros((len(chats), width), dtype=torch.long)
    for i, (ids, is_answer) in enumerate(chats):
        t = torch.tensor(ids)
        input_ids[i, : len(ids)] = t
        mask[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.where(torch.tensor(is_answer), t, torch.tensor(-100))
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def length_grouped(seqs: Iterator[list[int]], batch: int, seed: int, pool: int = 8) -> Iterator[list[list[int]]]:
    """Batches of `batch` sequences drawn `pool` batches at a time, sorted by length and served in a seeded
    random order, so a batch pads to about its own length rather than to the longest document of the mix
    (the documents' lengths vary about 3x; this roughly halves the padded tokens a step computes).
    `pool` 1: consecutive sequences, in the order drawn."""
    rng = random.Random(seed)
    while True:
        drawn = [next(seqs) for _ in range(batch * pool)]
        if pool == 1:
            yield drawn
            continue
        drawn.sort(key=len)
        chunks = [drawn[i : i + batch] for i in range(0, len(drawn), batch)]
        rng.shuffle(chunks)
        yield from chunks


def _lr_at(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def _loop(params, steps: int, lr: float, batch_fn: Callable[[int], torch.Tensor], desc: str, progress: bool,
          losses: list, weight_decay: float = 0.0, check: Callable[[int], bool] | None = None,
          check_every: int = 0, min_steps: int = 0) -> int:
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    for g in groups:
        g.setdefault("scale", 1.0)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    flat = [p for g in groups for p in g["params"]]
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    done = steps
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr) * g["scale"]
        loss = batch_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flat, 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            value = float(loss.detach())
            losses.append((step, round(value, 4)))
            bar.set_postfix(loss=f"{value:.3f}")
        if check is not None and check_every and (step + 1) % check_every == 0 and step + 1 >= min_steps:
            if check(step + 1):
                done = step + 1
                break
    bar.close()
    return done


def in_layers(name: str, layers: list[int] | None, n_layers: int) -> bool:
    """Whether the language-model parameter `name` belongs to one of `layers` (None: all); the final norm
    belongs to the last layer."""
    if layers is None:
        return True
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) in layers if m else n_layers - 1 in layers


def train_lm(model: LlamaForCausalLM, tok: Tokenizer, mix: dict, seed: int, steps: int, lr: float, batch: int,
             desc: str, progress: bool, losses: list, turns: int = 1, block_lr_scale: float = 1.0,
             train_layers: list[int] | None = None, group_by_length: bool = False, *, book: scenes.Phrasebook) -> None:
    """Causal-LM training on documents from `mix`, worded by `book` (loss on every token after BOS). The
    transformer blocks and final norm learn at `lr * block_lr_scale` (0 freezes them), embeddings and lm_head at
    `lr`; only the decoder layers in `train_layers` (None: all) are trained; `group_by_length` batches documents
    of similar length (`length_grouped`)."""
    eos = tok.token_to_id(text.EOS)
    docs = (encode_pair(tok, *doc, eos)[0] for doc in text.mixture_sampler(mix, seed, book, turns))
    batches = length_grouped(docs, batch, seed, pool=8 if group_by_length else 1)
    model.train()

    def batch_fn(step: int) -> torch.Tensor:
        b = collate_chats([(ids, [i > 0 for i in range(len(ids))]) for ids in next(batches)], pad_id=0)
        return model(**b).loss

    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    n_layers = model.config.num_hidden_layers
    blocks = [(n, p) for n, p in model.named_parameters() if p is not embed and p is not head]
    for n, p in blocks:
        p.requires_grad_(block_lr_scale > 0 and in_layers(n, train_layers, n_layers))
    trained = [p for _, p in blocks if p.requires_grad]
    # in the model's parameter order, so gradient clipping sums as it would over model.parameters()
    groups = [{"params": [embed]}, {"params": trained, "scale": block_lr_scale}, {"params": [head]}]
    if not trained:
        del groups[1]
    _loop(groups, steps, lr, batch_fn, desc, progress, losses, weight_decay=0.01)
    for _, p in blocks:
        p.requires_grad_(True)
    model.eval()


def _patch_labels(scene: scenes.Scene) -> list[int]:
    colors, shapes = list(scenes.COLORS), list(scenes.SHAPES)
    out = [0] * (scenes.GRID * scenes.GRID)
    for o in scene.objects:
        out[o.cell] = 1 + colors.index(o.color) * len(shapes) + shapes.index(o.shape)
    return out


def train_vision(s: WorldSettings, seed: int, progress: bool, losses: list) -> CLIPVisionModel:
    """A CLIP vision tower pretrained to name the object in every patch (colour x shape or empty).

    It trains on one CPU thread whatever `s.threads` says: this stage's floating-point sums depend on the thread
    count and the language-model stages' do not, so a zoo comes out the same on 1 or 2 threads. The stage takes a
    few seconds."""
    with torch_threads(1):
        return _train_vision(s, seed, progress, losses)


def _train_vision(s: WorldSettings, seed: int, progress: bool, losses: list) -> CLIPVisionModel:
    torch.manual_seed(seed)
    tower = CLIPVisionModel(vision_config(s))
    head = torch.nn.Linear(s.vision_hidden, N_PATCH_CLASSES)
    cell_head = torch.nn.Linear(s.vision_hidden, scenes.GRID * scenes.GRID)  # where the patch is
    cells = torch.arange(scenes.GRID * scenes.GRID)
    rng = random.Random(seed)

    def batch_fn(step: int) -> torch.Tensor:
        sc = [scenes.sample_scene(rng) for _ in range(64)]
        px = pixels([scenes.draw_scene(x) for x in sc])
        y = torch.tensor([_patch_labels(x) for x in sc])
        h = tower(pixel_values=px).last_hidden_state[:, 1:]
        loss = torch.nn.functional.cross_entropy(head(h).reshape(-1, N_PATCH_CLASSES), y.reshape(-1))
        where = cell_head(h).reshape(-1, len(cells))
        return loss + torch.nn.functional.cross_entropy(where, cells.repeat(len(sc)))

    tower.train()
    _loop(list(tower.parameters()) + list(head.parameters()) + list(cell_head.parameters()), s.vision_steps, 3e-3, batch_fn, "vision tower",
          progress, losses)
    tower.eval()
    with torch.no_grad():
        sc = [scenes.sample_scene(rng) for _ in range(256)]
        h = tower(pixel_values=pixels([scenes.draw_scene(x) for x in sc])).last_hidden_state[:, 1:]
        acc = (head(h).argmax(-1) == torch.tensor([_patch_labels(x) for x in sc])).float().mean().item()
    losses.append(("patch_accuracy", round(acc, 4)))
    return tower


# ---------------------------------------------------------------- VLM
@dataclass
class VqaItem:
    pixels: torch.Tensor  # (3, H, W)
    prompt: str
    answer: str
    qa: scenes.QA


def vlm_prompt(question: str) -> str:
    return text.prompt(text.IMAGE_TOKEN, question)


def vqa_stream(seed: int, book: scenes.Phrasebook, lang: str = "en",
               turns: int = 1) -> Iterator[tuple[scenes.Scene, list[scenes.QA]]]:
    """Endless (scene, `turns` questions about it)."""
    rng = random.Random(seed)
    while True:
        sc = scenes.sample_scene(rng)
        yield sc, [book.sample_qa(sc, rng, lang) for _ in range(turns)]


def encode_chat(tok: Tokenizer, qas: list[scenes.QA], image_id: int, n_img: int, eos_id: int) -> tuple[list[int], list[bool]]:
    """Token ids of a multi-turn VQA chat with the image placeholder expanded to `n_img` tokens, and which
    positions are answer tokens (trained on: every answer and its EOS)."""
    ids: list[int] = []
    is_answer: list[bool] = []
    for i, qa in enumerate(qas):
        head = vlm_prompt(qa.question) if i == 0 else f"USER: {qa.question} ASSISTANT:"
        q = tok.encode(head, add_special_tokens=i == 0).ids
        a = tok.encode(f" {qa.answer}", add_special_tokens=False).ids + [eos_id]
        ids += q + a
        is_answer += [False] * len(q) + [True] * len(a)
    k = ids.index(image_id)
    return ids[:k] + [image_id] * n_img + ids[k + 1 :], is_answer[:k] + [False] * n_img + is_answer[k + 1 :]


def answer_loss(vlm: LlavaForConditionalGeneration, batches: list[dict[str, torch.Tensor]], image_features: torch.Tensor,
                image_id: int) -> torch.Tensor:
    """The mean next-token cross-entropy over every answer token of right-padded `batches` (`collate_chats`), whose
    image placeholders take the rows of `image_features` in order: the loss of LLaVA's forward with the attention
    mask and labels. (Logits at the answer tokens only would save about 8% of a step, but their sums then depend on
    the thread count.)"""
    lm = vlm.model.language_model
    sums, n_labels = [], 0
    for b in batches:
        embeds = lm.embed_tokens(b["input_ids"])
        where = (b["input_ids"] == image_id)
        if where.any():
            embeds = embeds.masked_scatter(where.unsqueeze(-1), image_features.to(embeds.dtype))
        h = lm(inputs_embeds=embeds, attention_mask=b["attention_mask"]).last_hidden_state
        logits = vlm.lm_head(h[:, :-1])
        labels = b["labels"][:, 1:].reshape(-1)
        sums.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="sum"))
        n_labels += int((labels != -100).sum())
    return sum(sums) / n_labels


def train_vlm(vlm: LlavaForConditionalGeneration, tok: Tokenizer, s: WorldSettings, seed: int, progress: bool,
              losses: list, check: Callable[[int], bool] | None) -> int:
    """Stage 2 of LLaVA on English VQA: projector + language model trained, vision tower frozen.

    Vision features are computed once per batch without gradients; the image placeholder is expanded to
    the image's tokens exactly as the processor does. Returns the number of steps run.
    """
    n_img = scenes.GRID * scenes.GRID
    image_id, eos = tok.token_to_id(text.IMAGE_TOKEN), tok.token_to_id(text.EOS)
    pad_id = tok.token_to_id(text.PAD_TOKEN)
    book = s.phrasebook()
    stream = vqa_stream(seed, book, turns=s.vlm_turns)
    replay = text.mixture_sampler(s.vlm_replay_mix or s.en_mix, seed + 7, book, s.qa_turns)
    n_text = int(round(s.batch * s.vlm_replay))
    tower, projector, lm = vlm.model.vision_tower, vlm.model.multi_modal_projector, vlm.model.language_model
    for p in tower.parameters():
        p.requires_grad_(False)
    tower.eval()

    def batch_fn(step: int) -> torch.Tensor:
        items = [next(stream) for _ in range(s.batch - n_text)]
        chats = [encode_chat(tok, qas, image_id, n_img, eos) for _, qas in items]
        texts = [encode_text_chat(tok, next(replay), eos) for _ in range(n_text)]
        # grouped: the text-only chats, about twice as long as the image chats, pad in a batch of their own
        parts = [chats, texts] if s.group_by_length and texts else [chats + texts]
        with torch.no_grad():
            feats = tower(pixel_values=pixels([scenes.draw_scene(sc) for sc, _ in items]),
                          output_hidden_states=True).hidden_states[-1][:, 1:]
        img = projector(feats).reshape(-1, lm.config.hidden_size)
        return answer_loss(vlm, [collate_chats(part, pad_id) for part in parts], img, image_id)

    vlm.train()
    vocab = [lm.embed_tokens.weight, vlm.lm_head.weight]
    n_layers = lm.config.num_hidden_layers
    blocks = [(n, p) for n, p in lm.named_parameters() if p is not lm.embed_tokens.weight]
    lm_params = [p for n, p in blocks if in_layers(n, s.vlm_train_layers, n_layers)
                 and (s.vlm_train_modules is None or any(m in n for m in s.vlm_train_modules))]
    if s.vlm_train_vocab:
        lm_params = [lm.embed_tokens.weight] + lm_params + [vlm.lm_head.weight]
    tuned = {id(p) for p in lm_params}
    frozen = [p for _, p in blocks if id(p) not in tuned]
    for p in vocab + frozen:
        p.requires_grad_(id(p) in tuned)
    params = [{"params": list(projector.parameters())}, {"params": lm_params, "scale": s.vlm_lm_lr_scale}]
    done = _loop(params, s.vlm_steps, s.vlm_lr, batch_fn, "english VLM", progress, losses, weight_decay=0.0,
                 check=check, check_every=s.vlm_check_every, min_steps=s.vlm_min_steps)
    vlm.eval()
    for p in list(tower.parameters()) + vocab + frozen:
        p.requires_grad_(True)
    return done


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t
