"""Our llm-jp-eval-mm metrics equal eval-mm 0.4.1's, computed by eval-mm itself (in bench/.venv-evalmm).

For the same predictions: `evalmm-rougel`, `evalmm-exact-match`, `evalmm-substring-match` per sample and their
means against eval-mm's `rougel`, `exact-match`, `substring-match` scorers. For the judge metrics, given the same
judge replies (replayed in order to both: eval-mm through a client object with its `batch_generate_chat_response`,
ours through a `Judge` that answers from the same list): the parsed per-sample scores and the aggregates of
`llm-as-a-judge` and `heron-bench-evalmm` against eval-mm's `llm-as-a-judge` and `heron-bench`. The inputs cover
what the two normalisations and parsers must agree on: full-width letters and digits, emoji, repeated spaces,
prolonged-sound marks and tildes (which neologdn folds and NFKC keeps), empty predictions, substring and exact hits, JSON in code fences, loose JSON, replies that do not parse.

    .venv/bin/python -m bench.evalmm_equal      # installs bench/.venv-evalmm on first use (a few minutes)

Prints one table row per quantity (values compared to 1e-9) and exits 1 on any difference.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.evalmm_env import ensure_evalmm
from eval.evalmm import EvalmmExactMatch, EvalmmRougeL, EvalmmSubstringMatch
from eval.judge import Judge, JudgeRequest, Judgment, JudgmentCache
from eval.judge_metrics import HeronBenchEvalmm, LlmAsAJudge
from eval.metrics import score_predictions
from vlm_merge.tables import format_table

REFS = ["私は猫です。", "たかしが公園で遊んでいた。", "池のほとりです。", "赤い車", "ＡＢＣ株式会社", "3本",
        "東京タワーです", "白い犬が２匹います。", "富士山", "晴れ 😀", "寿司", "京都の  金閣寺", "すごーーーい景色", "",
        "信号は青〜"]
PREDS = ["私は猫です。", "たかしが公園にいたようだ。", "ここは湖の岸です。", "赤い車です", "ABC株式会社です", "３本",
         "東京タワー", "白い犬が2匹います。", "", "晴れ", "お寿司です 🍣", "京都の 金閣寺", "すごーい景色です", "何もない",
         "信号は青"]
QUESTIONS = [f"質問{i}は何ですか？" for i in range(len(REFS))]
CONTEXTS = [f"画像{i}の説明。" for i in range(len(REFS))]
CATEGORIES = ["conv", "detail", "complex"] * 5
JUDGE_REPLIES = ["5", "Score: 4", "3\n", "スコア: 2", "I cannot rate this.", "1", "4/5", "5.0", "", "2", "3",
                 "The score is 4", "no digit", "1", "5"]
HERON_REPLIES = ['```json\n{"score_gpt": 9, "score": 7}\n```', '{"score_gpt": 8, "score": 8}',
                 'Here: {"score": 3, "score_gpt": 10}', "not json", '```json\n{"score": 6}\n```',
                 '{"score_gpt": 7, "score": 2}', '{"score_gpt": "9", "score": "5"}', '```json {bad} ```',
                 '{"score_gpt": 10, "score": 10}', '{"a": 1} {"score": 4, "score_gpt": 6}', '{"score_gpt": 9, "score": 1}',
                 "```json\n{\"score_gpt\": 8,\n \"score\": 7}\n```", '{"score_gpt": 5, "score": 9}', "",
                 '{"score_gpt": 6, "score": 6}']

EVALMM_SIDE = r'''
import json, sys
from eval_mm.metrics.exact_match_scorer import ExactMatchScorer
from eval_mm.metrics.heron_bench_scorer import HeronBenchScorer
from eval_mm.metrics.llm_as_a_judge_scorer import LlmAsaJudgeScorer
from eval_mm.metrics.rougel_scorer import RougeLScorer
from eval_mm.metrics.substring_match_scorer import SubstringMatchScorer
from eval_mm.metrics.scorer import ScorerConfig

class Replay:  # eval-mm's client interface, answering with the given replies in order
    def __init__(self, replies): self.replies = list(replies)
    def batch_generate_chat_response(self, messages, **kw):
        out, self.replies = self.replies[:len(messages)], self.replies[len(messages):]
        return out

x = json.load(sys.stdin)
out = {}
for name, cls in (("rougel", RougeLScorer), ("exact-match", ExactMatchScorer), ("substring-match", SubstringMatchScorer)):
    s = cls(ScorerConfig())
    scores = s.score(x["refs"], x["preds"])
    out[name] = {"scores": scores, "details": s.aggregate(scores).details}
s = LlmAsaJudgeScorer(ScorerConfig(docs={"input_text": x["questions"]}, client=Replay(x["judge"]), judge_model="m",
                                   batch_size=4))
scores = s.score(x["refs"], x["preds"])
out["llm-as-a-judge"] = {"scores": scores, "details": s.aggregate(scores).details}
docs = [{"context": c, "input_text": q, "category": k} for c, q, k in zip(x["contexts"], x["questions"], x["categories"])]
s = HeronBenchScorer(ScorerConfig(docs=docs, client=Replay(x["heron"]), judge_model="m"))
scores = s.score(x["refs"], x["preds"])
out["heron-bench"] = {"scores": scores, "details": {k: float(v) for k, v in s.aggregate(scores).details.items()}}
print(json.dumps(out))
'''


@dataclass
class ReplayJudge(Judge):
    """Answers requests with the given replies, in order (the bench's stand-in for a judge model)."""

    replies: tuple[str, ...] = ()

    @property
    def identity(self) -> str:
        return "replay"

    def describe(self) -> dict[str, object]:
        return {"backend": "replay"}

    def _ask(self, requests: list[JudgeRequest], answered) -> list[Judgment]:
        assert len(requests) == len(self.replies)
        return [Judgment(r) for r in self.replies]


def ours() -> dict[str, dict]:
    meta = [{"question": q, "context": c, "category": k} for q, c, k in zip(QUESTIONS, CONTEXTS, CATEGORIES)]
    no_cache = JudgmentCache(None)
    scorers = [EvalmmRougeL(), EvalmmExactMatch(), EvalmmSubstringMatch(),
               LlmAsAJudge(judge=ReplayJudge(cache=no_cache, replies=tuple(JUDGE_REPLIES))),
               HeronBenchEvalmm(judge=ReplayJudge(cache=no_cache, replies=tuple(HERON_REPLIES)))]
    report = score_predictions(REFS, PREDS, scorers, meta=meta, resamples=10)
    col = lambda name: [row[name] for row in report.per_sample]  # noqa: E731
    agg = {k: v.mean for k, v in report.aggregate.items()}
    return {
        "rougel": {"scores": col("evalmm_rougel"), "details": {"rougel": agg["evalmm_rougel"]}},
        "exact-match": {"scores": col("evalmm_exact_match"), "details": {"exact_match": agg["evalmm_exact_match"]}},
        "substring-match": {"scores": col("evalmm_substring_match"),
                            "details": {"substring_match": agg["evalmm_substring_match"]}},
        "llm-as-a-judge": {"scores": col("llm_as_a_judge"), "details": {"llm_as_a_judge": agg["llm_as_a_judge"]}},
        "heron-bench": {"scores": [{"score": int(s), "score_gpt": int(g)} for s, g in
                                   zip(col("heron_evalmm_score"), col("heron_evalmm_score_gpt"))],
                        "details": {**{f"{c}_rel": agg[f"heron_evalmm_{c}"] for c in ("conv", "detail", "complex")
                                       if f"heron_evalmm_{c}" in agg},
                                    "overall_rel": agg["heron_evalmm"],
                                    "parse_error_count": report.scorers["heron-bench-evalmm"]["parse_failures"]}},
    }


def theirs(python: Path) -> dict[str, dict]:
    payload = json.dumps({"refs": REFS, "preds": PREDS, "questions": QUESTIONS, "contexts": CONTEXTS,
                          "categories": CATEGORIES, "judge": JUDGE_REPLIES, "heron": HERON_REPLIES}, ensure_ascii=False)
    done = subprocess.run([str(python), "-c", EVALMM_SIDE], input=payload, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"eval-mm side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return abs(float(a) - float(b)) <= 1e-9


def main() -> int:
    env = ensure_evalmm()
    mine, ref = ours(), theirs(env.python)
    rows, ok = [], True
    for metric in mine:
        same_scores = _close(mine[metric]["scores"], ref[metric]["scores"])
        rows.append([metric, "per-sample", str(len(ref[metric]["scores"])), "equal" if same_scores else "DIFFERENT"])
        for key, value in mine[metric]["details"].items():
            theirs_value = ref[metric]["details"].get(key)
            same = theirs_value is not None and _close(value, theirs_value)
            rows.append([metric, key, f"{float(value):.6f} vs {float(theirs_value or 0):.6f}", "equal" if same else "DIFFERENT"])
            ok &= same
        ok &= same_scores
    print(format_table(["metric (eval-mm name)", "quantity", "ours vs eval-mm 0.4.1", "verdict"], rows))
    # for contrast: the Sakana-normalised metrics on the same inputs are not eval-mm's (what the evalmm-* ones are for)
    sakana = score_predictions(REFS, PREDS, ["rouge-ja", "exact-match", "substring-match"], resamples=10).summary()
    print(f"for contrast, Sakana-normalised: rouge-ja rougeL {sakana['rougeL']:.6f} vs eval-mm rougel "
          f"{ref['rougel']['details']['rougel']:.6f}; exact-match {sakana['exact_match']:.6f} vs "
          f"{ref['exact-match']['details']['exact_match']:.6f}; substring-match {sakana['substring_match']:.6f} vs "
          f"{ref['substring-match']['details']['substring_match']:.6f}")
    print("ALL EQUAL" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
