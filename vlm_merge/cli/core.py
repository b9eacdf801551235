"""The light core's commands: `vlm-merge inspect`, `chat-vector`, `merge`, `validate`."""

from __future__ import annotations

import argparse
import json

from vlm_merge.cli.parsing import add_hub_options, add_output_options, add_text_config_option, parse_size
from vlm_merge.cli.push import add_push_options, check_push, push_after
from vlm_merge.errors import VlmMergeError
from vlm_merge.tables import format_table


def _parse_scales(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise VlmMergeError(f"{what}: {text!r} is not a comma-separated list of numbers") from None


def _parse_module_scales(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise VlmMergeError(f"--module-scale {item!r}: expected NAME=NUMBER, e.g. mlp=0.5") from None
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    from vlm_merge.architecture.anatomy import align, inspect_checkpoint, inspect_llm, inspect_vlm
    from vlm_merge.engine import config_conflicts, describe_parts, vision_tower_status, vlm_text_config
    from vlm_merge.io.checkpoint import CheckpointReader, resolve_model_dir

    reader = CheckpointReader(resolve_model_dir(args.path, args.cache_dir, args.revision), args.cache_dir)
    base = CheckpointReader(args.base, args.cache_dir) if args.base else None
    anatomy = inspect_vlm(reader, base) if (base is not None or _looks_multimodal(reader)) else inspect_checkpoint(reader)
    info = describe_parts(anatomy)
    tower = vision_tower_status(anatomy, args.vision_tower, args.cache_dir)
    if tower is not None:
        info["vision_tower_source"] = {k: v for k, v in tower.items() if k != "line"}
    alignment = None
    conflicts: list[str] = []
    if base is not None:
        base_anat = inspect_llm(base, "--base")
        alignment = align(anatomy, base_anat)
        conflicts = config_conflicts({f"{reader.path.name}": vlm_text_config(anatomy),
                                      f"{base.path.name} (--base)": base_anat.config})
        info["alignment"] = {
            "base": str(base.path),
            "paired_tensors": len(alignment.pairs),
            "base_vocab_rows": alignment.base_vocab_rows,
            "vlm_vocab_rows": alignment.vlm_vocab_rows,
            "text_config_conflicts": conflicts,
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    tc = anatomy.text_config
    print(f"{anatomy.path}\nlayout: {anatomy.layout.name} — {anatomy.layout.description}")
    print(f"architectures: {', '.join(anatomy.config.get('architectures') or ['?'])}; format: {reader.format}, "
          f"{len(reader.weight_files)} weight file(s)")
    print(f"language model: {anatomy.num_layers} layers, hidden {anatomy.hidden_size}, vocab rows {anatomy.vocab_rows}"
          f" (config vocab_size {tc.get('vocab_size')}, model_type {tc.get('model_type')})\n")
    print(format_table(["part", "tensors", "parameters", "dtype", "key prefix"], anatomy.summary_rows()))
    if alignment is not None:
        delta = (alignment.vlm_vocab_rows or 0) - (alignment.base_vocab_rows or 0)
        print(f"\nalignment with {base.path}: {len(alignment.pairs)} language-model tensors paired, shapes match"
              + (f"; vocab rows differ by {delta:+d} (matched by token string when merging)" if delta else ""))
        for line in conflicts:
            print(f"warning: {line}")
    if tower is not None:
        print(f"\n{tower['line']}")
    return 0


def _looks_multimodal(reader) -> bool:
    from vlm_merge.architecture.anatomy import inspect_checkpoint

    return inspect_checkpoint(reader).layout.name not in ("llm",)


def cmd_chat_vector(args: argparse.Namespace) -> int:
    from chat_vector import chat_vector

    check_push(args)
    out = chat_vector(
        args.vlm, args.en_base, args.ja_base, args.out,
        scale=args.scale,
        layer_scales=_parse_scales(args.layer_scales, "--layer-scales"),
        module_scales=_parse_module_scales(args.module_scale),
        skip=args.skip,
        dtype=args.dtype,
        vision_tower=args.vision_tower,
        cache_dir=args.cache_dir,
        force=args.force,
        max_shard_bytes=parse_size(args.max_shard_size),
        progress=not args.quiet,
        trust_remote_code=args.trust_remote_code,
        text_config_from=args.text_config_from or "vlm",
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"wrote {out}")
    push_after(args, out)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from vlm_merge.engine import merge

    check_push(args)
    out = merge(
        args.recipe, args.out, dtype=args.dtype, device=args.device, force=args.force,
        max_shard_bytes=parse_size(args.max_shard_size), vision_tower=args.vision_tower, cache_dir=args.cache_dir,
        progress=not args.quiet, trust_remote_code=args.trust_remote_code, text_config_from=args.text_config_from,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"wrote {out}")
    push_after(args, out)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from vlm_merge.engine import validate

    rp, rows = validate(args.recipe, vision_tower=args.vision_tower, cache_dir=args.cache_dir,
                        text_config_from=args.text_config_from)
    r = rp.recipe
    print(f"recipe {args.recipe}: {r.merge_method} — OK")
    print(f"output: {'VLM ' + r.vlm if r.vlm else 'LLM'}; vocabulary and text config from {r.tokenizer_source}"
          + (f"; starts from target {r.target}" if r.target else ""))
    if rp.backbone.vocab is not None:
        print("vocabulary: " + rp.backbone.vocab.summary())
    print(rp.backbone.card_details()[0])
    print()
    print(format_table(["part", "tensors", "method", "sources"], rows))
    return 0


def add_core_commands(sub) -> None:
    """Register the core commands on the CLI's subparsers."""
    from vlm_merge.recipe.presets import DEFAULT_SKIP, SKIP_PRESETS


    s = sub.add_parser("inspect", help="name the parts of a checkpoint (vision tower, projector, language model)")
    s.add_argument("path", help="model directory or Hugging Face id (ORG/NAME[@REVISION])")
    s.add_argument("--base", help="a standalone LLM to align the VLM's language model with")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--vision-tower", help="CLIP checkpoint for an original LLaVA that does not embed its tower")
    add_hub_options(s, revision=True)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("chat-vector", help="ja_vlm_llm = ja_base + scale * (vlm_llm - en_base)")
    s.add_argument("--vlm", required=True, help="the English VLM (LLaVA-1.5 / LLaVA-1.6, any supported layout)")
    s.add_argument("--en-base", required=True, help="the English LLM the VLM was tuned from")
    s.add_argument("--ja-base", required=True, help="the Japanese LLM continued-pretrained from the same base")
    s.add_argument("--out", required=True, help="output directory (written atomically)")
    s.add_argument("--scale", type=float, default=1.0, help="global chat-vector scale (default 1.0)")
    s.add_argument("--layer-scales", help="comma-separated per-layer multipliers, one per decoder layer")
    s.add_argument("--module-scale", action="append", metavar="NAME=X",
                   help="per-module multiplier: attention, mlp, norms, embeddings, lm_head (repeatable)")
    s.add_argument("--skip", default=DEFAULT_SKIP,
                   help=f"tensors that keep the Japanese base's value: presets ({', '.join(SKIP_PRESETS)}) "
                        f"and/or regexes on canonical LLM keys, comma-separated (default: {DEFAULT_SKIP})")
    add_output_options(s)
    add_push_options(s)
    s.set_defaults(func=cmd_chat_vector)

    s = sub.add_parser("merge", help="merge by a recipe (ours or mergekit's YAML)")
    s.add_argument("recipe", help="recipe YAML (e.g. a merged model's merge_recipe.yaml to reproduce it)")
    s.add_argument("out", help="output directory (written atomically)")
    s.add_argument("--device", default="cpu", help="where the merge arithmetic runs: cpu (default) or cuda")
    add_output_options(s)
    add_push_options(s)
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("validate", help="check a recipe against its sources without merging")
    s.add_argument("recipe")
    s.add_argument("--vision-tower", help="CLIP checkpoint for original-LLaVA VLMs that do not embed theirs")
    add_hub_options(s)
    add_text_config_option(s)
    s.set_defaults(func=cmd_validate)
