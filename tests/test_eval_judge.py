"""The LLM judge (#33) against a real OpenAI-compatible server on localhost: `transformers serve` (transformers'
own server, the `transformers[serving]` extra in `test`) serving the miniature zoo's Japanese base LLM with a chat
template added, and the same model as a local transformers judge. A tiny random-ish model is a useless judge:
these tests check plumbing, parsing, the cache (a resumed run asks nothing), token counts and failure handling.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from eval.judge import JudgeRequest, JudgmentCache, OpenAIJudge, TransformersJudge, make_judge
from eval.judge_metrics import HeronBench, LlmAsAJudge, heron_parse, llm_judge_parse
from eval.metrics import score_predictions
from tests.conftest import error_line
from tests.test_eval_heron import write_heron_dir
from vlm_merge.cli import main
from vlm_merge.errors import VlmMergeError

ZOO = Path(__file__).resolve().parents[1] / "assets" / "miniature-zoo"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
MAX_TOKENS = 8  # the judges' replies are cut short here; parsing and counting are what is tested


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory) -> Path:
    """The miniature world's Japanese base LLM with a plain chat template: a (tiny) chat model."""
    out = tmp_path_factory.mktemp("judge") / "ja-base-chat"
    shutil.copytree(ZOO / "ja-base", out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        config = json.loads((out / name).read_text())
        config[key] = 4096  # the judge prompts are ~1000 tokens of this tokenizer (RoPE: no position table to grow)
        (out / name).write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def server(judge_model, tmp_path_factory):
    """`transformers serve MODEL` on a free localhost port; yields its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [str(Path(sys.executable).with_name("transformers")), "serve", str(judge_model), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _dead_url() -> str:
    return f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there


def _api_judge(judge_model, base_url, cache_dir, **kw) -> OpenAIJudge:
    judge = make_judge(str(judge_model), base_url=base_url, cache_dir=cache_dir, max_tokens=MAX_TOKENS, **kw)
    assert isinstance(judge, OpenAIJudge)
    return judge


QUESTIONS = [{"question": "これは何色ですか？", "context": "赤い正方形の画像。", "category": c} for c in ("conv", "detail", "complex")]
REFS = ["赤です。", "赤い正方形です。", "赤色の正方形が一つあります。"]
PREDS = ["赤", "青い丸です。", "わかりません。"]


@pytest.mark.slow
def test_server_judge_scores_caches_and_resumes_without_calls(server, judge_model, tmp_path):
    cache = tmp_path / "cache"
    judge = _api_judge(judge_model, server, cache, concurrency=2)
    scorer = HeronBench(judge=judge)
    report = score_predictions(REFS, PREDS, [scorer], meta=QUESTIONS)
    stats = report.scorers["heron-bench"]
    assert stats["judgments"] == 3 and stats["from_cache"] == 0
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0  # the server's usage, summed
    assert stats["judge"]["base_url"] == server and len(stats["prompt_sha256"]) == 16
    # every per-sample value is what Heron's parse_score makes of the reply the server sent (cached on disk)
    replies = [json.loads(p.read_text())["text"] for p in sorted(cache.rglob("*.json"))]
    assert len(replies) == 3
    parsed = [heron_parse(r) for r in replies]
    assert stats["parse_failures"] == sum(p is None for p in parsed)
    assert sum(row["heron_parsed"] for row in report.per_sample) == 3 - stats["parse_failures"]
    assert {"heron", "heron_conv", "heron_detail", "heron_complex", "heron_parsed"} <= set(report.aggregate)
    # a resumed / re-scored run asks nothing: the same scores with the server unreachable
    offline = HeronBench(judge=_api_judge(judge_model, _dead_url(), cache, max_retries=0, timeout=2))
    again = score_predictions(REFS, PREDS, [offline], meta=QUESTIONS)
    assert again.per_sample == report.per_sample
    assert again.scorers["heron-bench"]["from_cache"] == 3


@pytest.mark.slow
def test_llm_as_a_judge_through_the_server_and_partial_failure(server, judge_model, tmp_path):
    cache = tmp_path / "cache"
    scorer = LlmAsAJudge(judge=_api_judge(judge_model, server, cache))
    report = score_predictions(REFS[:2], PREDS[:2], [scorer], meta=QUESTIONS[:2])
    replies = {json.loads(p.read_text())["text"] for p in cache.rglob("*.json")}
    for row in report.per_sample:  # 0 where no digit (eval-mm's value), flagged unparsed: never silently 0
        assert row["llm_as_a_judge_parsed"] == float(row["llm_as_a_judge"] != 0 or any(
            llm_judge_parse(r) == 0 for r in replies))
    assert report.scorers["llm-as-a-judge"]["parse_failures"] == sum(llm_judge_parse(r) is None for r in replies)
    # a third question with the server gone: one line, the two answered stay cached
    offline = LlmAsAJudge(judge=_api_judge(judge_model, _dead_url(), cache, max_retries=1, timeout=2))
    with pytest.raises(VlmMergeError, match=r"1 of 1 requests failed after retries .*rerun to retry"):
        score_predictions(REFS, PREDS, [offline], meta=QUESTIONS)
    assert len(list(cache.rglob("*.json"))) == 2


def test_transformers_judge_counts_tokens_and_caches(judge_model, tmp_path):
    judge = make_judge(str(judge_model), cache_dir=tmp_path / "cache")
    assert isinstance(judge, TransformersJudge)
    request = JudgeRequest.chat("You are an expert evaluator.", "Question: 何色？\nYour Score:", max_tokens=4)
    first = judge.judge([request, request])
    assert first[0].prompt_tokens > 0 and 0 < first[0].completion_tokens <= 4 and not first[0].cached
    assert first[1].cached and first[1].text == first[0].text  # asked once
    again = make_judge(str(judge_model), cache_dir=tmp_path / "cache").judge([request])
    assert again[0].cached and again[0].text == first[0].text
    # the cache key is the judge + the prompt: another answer in the prompt is asked again
    other = JudgeRequest.chat("You are an expert evaluator.", "Question: 何色？ 赤\nYour Score:", max_tokens=4)
    assert JudgmentCache.key(judge.identity, other) != JudgmentCache.key(judge.identity, request)


def test_judge_metric_without_judge_is_one_line(tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"answer": "a", "prediction": "b", "question": "q"}) + "\n")
    assert main(["score", str(preds), "--metrics", "llm-as-a-judge"]) == 2
    assert "metric llm-as-a-judge needs an LLM judge: pass --judge-model" in error_line(capsys)


def test_no_api_key_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"answer": "a", "prediction": "b", "question": "q"}) + "\n")
    assert main(["score", str(preds), "--metrics", "llm-as-a-judge", "--judge-model", "gpt-4o-2024-11-20",
                 "--judge-cache", str(tmp_path / "c")]) == 2
    assert "judge gpt-4o-2024-11-20: no API key; set OPENAI_API_KEY" in error_line(capsys)


@pytest.mark.slow
def test_eval_heron_from_the_cli_with_a_server_judge(server, judge_model, zoo, tmp_path, capsys):
    data = write_heron_dir(tmp_path / "heron")
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["eval", "--model", str(zoo.vlms["llava-hf-llama"]), "--bench", "japanese-heron-bench", "--data", str(data),
            "--protocol", "heron", "--metrics", "heron-bench,heron-bench-evalmm,evalmm-rougel", "--max-new-tokens", "4", "--limit", "4", "--out", str(out), "--quiet",
            "--device", "cpu", "--judge-model", str(judge_model), "--judge-base-url", server,
            "--judge-cache", str(cache), "--judge-max-tokens", str(MAX_TOKENS), "--evalmm"]
    assert main(argv) == 0
    scores = json.loads((out / "scores.json").read_text())
    record = scores["scorers"]["heron-bench"]
    assert record["judge"]["model"] == str(judge_model) and record["judgments"] == 4
    assert record["parse_failures"] == 4 - sum(json.loads(line)["heron_parsed"]
                                               for line in (out / "predictions.jsonl").read_text().splitlines())
    assert "heron" in scores["scores"] and scores["protocol"]["name"] == "heron"
    evalmm = [json.loads(line) for line in (out / "prediction.jsonl").read_text().splitlines()]
    assert [set(r) for r in evalmm] == [{"question_id", "text", "answer", "input_text", "rougel", "heron-bench"}] * 4
    evaluation = json.loads((out / "evaluation.jsonl").read_text())  # eval-mm's names; Heron's own metric has no twin
    assert set(evaluation) == {"rougel", "heron-bench"}
    assert evaluation["heron-bench"]["details"]["parse_error_count"] == scores["scorers"]["heron-bench-evalmm"]["parse_failures"]
    assert evaluation["heron-bench"]["overall_score"] == pytest.approx(scores["scores"]["heron_evalmm"]["mean"])
    # resumed with the server unreachable: nothing generated, nothing asked, same scores
    argv[argv.index(server)] = _dead_url()
    assert main(argv) == 0
    again = json.loads((out / "scores.json").read_text())
    assert again["scorers"]["heron-bench"]["from_cache"] == 4 and again["scorers"]["heron-bench-evalmm"]["from_cache"] == 4
    assert again["scores"] == scores["scores"]
    capsys.readouterr()


def test_retries_with_backoff_on_5xx_then_one_line(judge_model, tmp_path):
    """Failure injection (not a judge): an endpoint that always answers 503 (Retry-After: 0) is asked
    1 + max_retries times per request, then the run fails in one line with the server's words."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"error": {"message": "overloaded"}}'
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        judge = _api_judge(judge_model, f"http://127.0.0.1:{httpd.server_port}/v1", tmp_path / "c", max_retries=2,
                           timeout=5)
        with pytest.raises(VlmMergeError, match=r"1 of 1 requests failed after retries \(first: HTTP 503: .*overloaded"):
            judge.judge([JudgeRequest.chat("s", "u")])
        assert hits == ["/v1/chat/completions"] * 3
        assert not list((tmp_path / "c").rglob("*.json"))  # a failure is never cached
    finally:
        httpd.shutdown()


def test_eval_ja_vg_vqa_with_llm_as_a_judge_beside_rouge_and_a_local_judge(judge_model, zoo, tmp_path, capsys):
    """`--judge-model DIR` without a base URL is a local transformers judge; llm-as-a-judge sits beside ROUGE-L and
    reads each question's text (the runner hands scorers the question with its columns)."""
    from eval.fixture_datasets import write_ja_vg_vqa

    data = write_ja_vg_vqa(tmp_path / "vg", n_images=2)
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["eval", "--model", str(zoo.vlms["llava-hf-llama"]), "--bench", "ja-vg-vqa-500", "--data", str(data),
            "--protocol", "llm-jp", "--metrics", "rouge-ja,llm-as-a-judge", "--max-new-tokens", "4", "--limit", "2",
            "--out", str(out), "--quiet", "--device", "cpu", "--judge-model", str(judge_model),
            "--judge-cache", str(cache), "--judge-max-tokens", "4"]
    assert main(argv) == 0
    scores = json.loads((out / "scores.json").read_text())
    record = scores["scorers"]["llm-as-a-judge"]
    assert record["judge"]["backend"] == "transformers" and record["judgments"] == 2 and record["prompt_tokens"] > 0
    assert {"rougeL", "llm_as_a_judge", "llm_as_a_judge_parsed"} <= set(scores["scores"])
    # each judgment is cached under the key of eval-mm's prompt holding that question, answer and prediction
    from eval.judge_metrics import LLM_JUDGE_INSTRUCTION, LLM_JUDGE_SYSTEM

    identity = make_judge(str(judge_model)).identity
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    expected = {JudgmentCache.key(identity, JudgeRequest.chat(LLM_JUDGE_SYSTEM, LLM_JUDGE_INSTRUCTION.format(
        Question=r["question"], Answer=r["answer"], Prediction=r["prediction"]), max_tokens=4, temperature=0.0, seed=0))
        for r in rows}
    assert {p.stem for p in cache.rglob("*.json")} == expected and len(expected) == 2
    capsys.readouterr()


def test_evaluate_api_heron_with_a_local_judge(judge_model, zoo, tmp_path):
    """From Python: `evaluate(..., protocol="heron", judge=make_judge(...))`; the Heron ratios are the published
    statistic of the per-sample scores the run wrote."""
    from eval.judge_metrics import heron_overall
    from eval.runner import evaluate

    data = write_heron_dir(tmp_path / "heron")
    judge = make_judge(str(judge_model), cache_dir=tmp_path / "cache", max_tokens=4)
    result = evaluate(str(zoo.vlms["llava-hf-llama"]), "japanese-heron-bench", data=data, protocol="heron", judge=judge,
                      max_new_tokens=4, limit=5, out_dir=tmp_path / "run", device="cpu", progress=False)
    rows = result.predictions
    exact = heron_overall([r["heron_model"] for r in rows], [r["heron_reference"] for r in rows],
                          [r["meta"]["category"] for r in rows])
    assert result.scores["heron"].mean == pytest.approx(exact["overall"], nan_ok=True)
    assert result.metadata["scorers"]["heron-bench"]["judgments"] == 5
    assert result.summary().keys() == {"heron", "heron_conv", "heron_detail", "heron_complex"}
