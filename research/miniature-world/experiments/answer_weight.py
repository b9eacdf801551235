"""Session-4 micro experiment (EXPERIMENTS.md, "Session 4"): does weighting answer tokens W times in the loss
make a short-answer, English-only English base read scene descriptions? Trains the base alone, then scores 300
generated reading-comprehension answers per question type.

    python research/miniature-world/experiments/answer_weight.py W STEPS [HIDDEN LAYERS]   # e.g. 10 700
"""
import collections
import random
import sys
import time

import short_answers
import torch

from vlm_merge.world import scenes, text, train

book = short_answers.recorded_settings({}).phrasebook()  # session 4's wording
from transformers import LlamaForCausalLM

torch.set_num_threads(1)
W, steps = float(sys.argv[1]), int(sys.argv[2])
hidden = int(sys.argv[3]) if len(sys.argv) > 3 else 128
layers = int(sys.argv[4]) if len(sys.argv) > 4 else 4
s = train.WorldSettings(hidden=hidden, intermediate=3 * hidden, layers=layers)
tok = text.build_tokenizer(0, book)
eos = tok.token_to_id(text.EOS)
A = tok.encode("ASSISTANT:", add_special_tokens=False).ids
torch.manual_seed(0)
m = LlamaForCausalLM(train.lm_config(s, tok.get_vocab_size()))
sampler = text.mixture_sampler({"qa-en": 0.8, "text-en": 0.2}, 1, book, 4)

def answer_mask(ids):
    out, inside = [], False
    for i, t in enumerate(ids):
        out.append(inside)
        if ids[max(0, i - len(A) + 1): i + 1] == A:
            inside = True
        if t == eos:
            inside = False
    return out

def batch_fn(step):
    seqs = [train.encode_pair(tok, *next(sampler), eos) for _ in range(32)]
    b = train.collate_chats([(ids, [i > 0 for i in range(len(ids))]) for ids, _ in seqs], pad_id=0)
    wts = torch.zeros_like(b["labels"], dtype=torch.float)
    for j, (ids, _) in enumerate(seqs):
        am = answer_mask(ids)
        for i in range(1, len(ids)):
            wts[j, i] = W if am[i] else 1.0
    logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    lab = b["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), reduction="none", ignore_index=-100)
    w = wts[:, 1:].reshape(-1) * (lab.reshape(-1) != -100)
    return (ce * w).sum() / w.sum()

t = time.time()
losses = []
train._loop(list(m.parameters()), steps, 2e-3, batch_fn, "en", False, losses, weight_decay=0.01)
print("train s", round(time.time() - t), losses[-1])
m.eval()
rng = random.Random(5); ok = collections.defaultdict(list)
for i in range(300):
    sc = scenes.sample_scene(rng); qa = book.sample_qa(sc, rng, "en")
    ids = torch.tensor([tok.encode(text.prompt(book.describe(sc, "en"), qa.question)).ids])
    out = m.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=2)
    ans = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    ok[qa.qtype].append(scenes.content_correct(ans, qa.attribute, qa.value, "en"))
allv = [x for v in ok.values() for x in v]
print(f"W={W} steps={steps} hidden={hidden} layers={layers} reading", round(sum(allv)/len(allv), 3), {k: round(sum(v)/len(v), 2) for k, v in ok.items()}, flush=True)
