"""What the command checks and says before and around the work: settings before the model
loads, a KV pool too small in one line, quiet and direct loading of small models."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from test_cli import tiny_model_dir  # noqa: F401  (fixture)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from powerfast import cli
from powerfast.runtime import models


@pytest.mark.parametrize("argv, message", [
    (["sample", "hi", "--alpha", "0"], "alpha must be a positive finite number, got 0.0"),
    (["sample", "hi", "--method", "low-temp", "--alpha", "-1"], "alpha must be a positive finite number, got -1.0"),
    (["sample", "hi", "--rollouts", "1"], "the jackknife needs num_rollouts >= 2, got 1"),
    (["sample", "hi", "--method", "best-of-n", "--num-samples", "0"], "num_samples must be an int >= 1, got 0"),
    (["sample", "hi", "--method", "sir", "--num-samples", "0"], "num_samples must be an int >= 1, got 0"),
    (["sample", "hi", "--method", "sir", "--temperature", "0"],
     "temperature must be > 0 (greedy q is degenerate), got 0.0"),
    (["sample", "hi", "--method", "sir", "--alpha", "0"], "alpha must be a positive finite number, got 0.0"),
    (["eval", "--task", "math500", "--methods", "plain,sir", "--temperature", "0"],
     "temperature must be > 0 (greedy q is degenerate), got 0.0"),
    (["sample", "hi", "--candidate-proposal", "tempered", "--block-size", "1"],
     "candidate_proposal='tempered' draws the L candidate blocks: it needs block_size > 1"),
    (["eval", "--task", "multistep-val", "--methods", "power", "--candidate-proposal", "tempered", "--reuse-rollouts"],
     "and no reuse_rollouts (reused candidates are rollouts; got True)"),
    (["sample", "hi", "--max-new-tokens", "0"], "max_new_tokens must be an int > 0, got 0"),
    (["sample", "hi", "--kv-memory", "0"], "--kv-memory must be >= 1 MiB, got 0"),
    (["eval", "--task", "math500", "--methods", "plain,mcmc", "--mcmc-steps", "-1"],
     "mcmc_steps must be an int >= 0, got -1"),
    (["serve", "--replicas", "2", "--tensor-parallel", "2"], "--replicas and --tensor-parallel 2 do not combine"),
    (["serve", "--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["serve", "--replicas", "2", "--max-replicas", "1"], "--max-replicas must be >= --replicas (2), got 1"),
    (["serve", "--replicas", "2", "--cpus-per-replica", "0"], "--cpus-per-replica must be > 0, got 0"),
])
def test_settings_fail_before_anything_heavy_is_imported(argv, message, tmp_path):
    """No model, not even torch, is touched: the missing --model path is never looked at."""
    program = (
        "import sys\nfrom powerfast import cli\n"
        f"code = cli.main({argv + ['--model', str(tmp_path / 'missing')]!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "does not exist" not in done.stderr
    assert done.stderr.count("\n") == 1  # one line, no traceback


def test_replicas_of_a_model_that_does_not_exist_are_refused_before_ray_starts(tmp_path, capsys):
    pytest.importorskip("ray.serve", reason="needs the replicas extra")
    missing = tmp_path / "no-such-model"
    assert cli.main(["serve", "--replicas", "2", "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"model {str(missing)!r} is no packaged model" in err and err.count("\n") == 1
    assert not __import__("ray").is_initialized()


def test_kv_memory_too_small_is_one_line_with_the_least_that_would_do(tiny_model_dir, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    argv = ["sample", "the answer is", "--model", str(tiny_model_dir), "--method", "best-of-n", "--num-samples", "64",
            "--max-new-tokens", "100", "--ignore-eos", "--no-chat-template", "--seed", "1", "--json"]
    assert cli.main(argv + ["--kv-memory", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("powerfast sample: error: --kv-memory 1 (256 pages, 256 free) is too small"), err
    least = int(re.search(r"use --kv-memory (\d+) or more", err).group(1))
    assert least == 2  # 64 samples x 7 pages of 16 positions + 1 prompt page = 449 pages of 4 KiB
    assert cli.main(argv + ["--kv-memory", str(least)]) == 0


def test_out_of_pages_during_a_run_is_still_one_line(tiny_model_dir, capsys, monkeypatch):   # noqa: F811
    from powerfast.samplers.ancestral import AncestralSampler

    monkeypatch.setenv("POWERFAST_INTERPRET_OPS", "0")
    monkeypatch.setattr(AncestralSampler, "peak_kv_pages", lambda self, *args: 0)  # a check that missed
    code = cli.main(["sample", "the answer is", "--model", str(tiny_model_dir), "--method", "best-of-n",
                     "--num-samples", "64", "--max-new-tokens", "100", "--ignore-eos", "--no-chat-template",
                     "--kv-memory", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "KV cache out of pages" in err, err


def test_small_models_load_without_a_progress_bar(tiny_model_dir, capfd):  # noqa: F811
    model, tokenizer = models.load_model(tiny_model_dir, device="cpu")
    assert "Loading weights" not in capfd.readouterr().err
    assert tokenizer is not None and model.config.vocab_size == 15


def test_a_cache_with_the_embedding_under_the_output_name_is_rewritten_once(tmp_path):
    """Caches written before stored the tied embedding as ``lm_head.weight``: transformers
    then initialised the embedding at every load. The rewrite keeps the logits exactly."""
    from safetensors import safe_open
    from safetensors.torch import save_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    config.save_pretrained(tmp_path)
    save_model(model, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})  # the old layout
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys() and "model.embed_tokens.weight" not in f.keys()
    models._move_tied_embedding(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    models._move_tied_embedding(tmp_path)  # nothing left to do
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, atol=0, rtol=0)


def test_conversion_stores_the_tied_embedding_under_its_own_name(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    models._save_dequantised(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        tokens = torch.tensor([[2, 4, 6]])
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, atol=0, rtol=0)


@pytest.mark.slow
def test_default_tokenizer_is_what_auto_tokenizer_gives():
    from transformers import AutoTokenizer

    folder = models.default_model_dir(verbose=False)
    direct = models.load_model(device="cpu")[1]
    auto = AutoTokenizer.from_pretrained(folder)
    conversation = [{"role": "user", "content": "What is 17 + 25? <|im_end|> Explain."}]
    assert direct.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True) == \
        auto.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    ids = auto("Natalia sold 48 clips.")["input_ids"]
    assert direct("Natalia sold 48 clips.")["input_ids"] == ids
    assert direct.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    assert (direct.eos_token_id, direct.pad_token_id, direct.all_special_ids) == \
        (auto.eos_token_id, auto.pad_token_id, auto.all_special_ids)
