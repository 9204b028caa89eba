"""bench/lab/score_completions.py: log p(completion | prompt) against a float64 token-by-token
reference, and the per-arm comparison against a baseline's completions."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import fresh_seed
from test_cli import WORDS, tiny_model_dir  # noqa: F401 - the same tiny model folder as the CLI tests
from transformers import AutoModelForCausalLM

from bench.lab import score_completions


def reference_logprob(model, prompt_ids, completion_ids) -> float:
    """Token by token, each step its own forward pass over the whole prefix, in float64."""
    model64 = model.to(torch.float64)
    total = 0.0
    ids = list(prompt_ids)
    for token in completion_ids:
        with torch.no_grad():
            logits = model64(torch.tensor([ids])).logits[0, -1]
        total += float(torch.log_softmax(logits, -1)[token])
        ids.append(token)
    model.to(torch.float32)
    return total


def test_completion_logprob_matches_a_float64_reference(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rng = random.Random(fresh_seed())
    for _ in range(4):
        prompt = [rng.randrange(len(WORDS)) for _ in range(rng.randint(1, 6))]
        completion = [rng.randrange(len(WORDS)) for _ in range(rng.randint(1, 8))]
        got = score_completions.completion_logprob(model, prompt, completion)
        want = reference_logprob(model, prompt, completion)
        assert got < 0 and math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5), (prompt, completion, got, want)
    assert score_completions.completion_logprob(model, [2, 3], []) == 0.0
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        score_completions.completion_logprob(model, [], [2])


def write_arm(folder: Path, records: list[dict]) -> Path:
    (folder / "task").mkdir(parents=True)
    (folder / "task" / "greedy-seed0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_each_arm_is_compared_with_the_baselines_completions(tiny_model_dir, tmp_path, capsys):
    prompt = "the answer is"
    greedy = write_arm(tmp_path / "greedy", [
        {"id": "p1", "prompt": prompt, "completion": " 1", "correct": True},
        {"id": "p2", "prompt": prompt, "completion": " 2 plus 3", "correct": False}])
    other = write_arm(tmp_path / "other", [
        {"id": "p1", "prompt": prompt, "completion": " 1", "correct": True},
        {"id": "p2", "prompt": prompt, "completion": " 3", "correct": True},
        {"id": "p3", "prompt": prompt, "completion": " a", "correct": False}])  # no baseline record: left out
    out = tmp_path / "scores.json"
    assert score_completions.main([str(greedy), str(other), "--model", str(tiny_model_dir), "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = {w: i for i, w in enumerate(WORDS)}
    want = reference_logprob(model, [ids["the"], ids["answer"], ids["is"]], [ids["2"], ids["plus"], ids["3"]])
    assert math.isclose(scores["greedy"]["p2"]["logp"], want, rel_tol=1e-5) and scores["greedy"]["p2"]["tokens"] == 3
    rows = {row["arm"]: row for row in score_completions.summarise(scores, "greedy")}
    diff = scores["other"]["p2"]["logp"] - scores["greedy"]["p2"]["logp"]
    assert rows["other"]["problems"] == 2 and rows["other"]["correct"] == 2 and rows["other"]["same"] == 1
    assert (rows["other"]["more_likely"], rows["other"]["less_likely"]) == ((1, 0) if diff > 0 else (0, 1))
    assert math.isclose(rows["other"]["median_diff"], diff / 2)
    assert rows["greedy"] == {"arm": "greedy", "problems": 2, "correct": 1, "same": 2, "more_likely": 0,
                              "less_likely": 0, "median_diff": 0.0}
    table = capsys.readouterr().out
    assert "against greedy" in table and table.count("\n") == 3
    with pytest.raises(SystemExit):
        score_completions.main([str(greedy), "--baseline", "nope", "--model", str(tiny_model_dir)])
    with pytest.raises(ValueError, match="no records under"):
        score_completions.load_records(tmp_path / "empty")
