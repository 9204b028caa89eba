"""Incremental detokenisation gives the text of a full decode: checked at every step on random
token ids (byte pieces, special tokens, unfinished characters included), drawn afresh."""

import random

import pytest
from conftest import fresh_seed
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from powerfast.serving.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from powerfast.runtime.models import default_model_dir

    return PreTrainedTokenizerFast.from_pretrained(default_model_dir(verbose=False))


@pytest.fixture(scope="module")
def word_tokenizer():
    words = ["<unk>", "<eos>", "the", "answer", "is", "a", "b", ".", ",", "1", "2", "\\boxed{", "}"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def check_against_full_decode(tokenizer, ids: list[int], rng: random.Random) -> int:
    """Feed ``ids`` one (or a few) at a time; returns how many updates fell behind the full text."""
    detok = IncrementalDetokenizer(tokenizer)
    n, behind = 0, 0
    while n < len(ids):
        n = min(len(ids), n + rng.choice([1, 1, 1, 2, 3]))
        text = detok.update(ids[:n])
        full = tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert full.startswith(text), (ids[:n], text, full)
        assert not text.endswith("\ufffd")
        behind += len(text) < len(full.rstrip("\ufffd"))
    assert detok.update(ids, final=True) == tokenizer.decode(ids, skip_special_tokens=True)
    return behind


@pytest.mark.parametrize("kind", ["text", "random ids", "byte pieces"])
def test_smollm2_incremental_text_is_the_full_decode(smollm2_tokenizer, kind):
    tok = smollm2_tokenizer
    rng = random.Random(fresh_seed())
    for _ in range(20):
        if kind == "text":
            sample = rng.choice(["Natalia sold 48 clips in April.", "Le café coûte 3,50 €.", "数学很有趣。 2+2=4",
                                 "def f(x):\n    return x**2  # 🙂", "  spaces  and\ttabs\n\nnew lines"])
            ids = tok(sample * rng.randint(1, 3), add_special_tokens=False)["input_ids"]
        elif kind == "random ids":
            ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 80))]
        else:  # the byte-level pieces of multi-byte characters, split mid-character, and specials
            text = "".join(rng.choice("é€数🙂ab ") for _ in range(rng.randint(1, 30)))
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for _ in range(3):
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(tok.all_special_ids))
        check_against_full_decode(tok, ids, rng)


def test_word_level_incremental_text_is_the_full_decode(word_tokenizer):
    rng = random.Random(fresh_seed())
    for _ in range(50):
        ids = [rng.randrange(len(word_tokenizer)) for _ in range(rng.randint(1, 40))]
        assert check_against_full_decode(word_tokenizer, ids, rng) == 0


def test_decoding_work_grows_with_new_tokens_not_with_the_text(smollm2_tokenizer):
    decoded = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            decoded.append(len(ids))
            return smollm2_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = smollm2_tokenizer("The quick brown fox jumps over the lazy dog. " * 40, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(Counting())
    for n in range(1, len(ids) + 1):
        detok.update(ids[:n])
    assert detok.update(ids, final=True) == smollm2_tokenizer.decode(ids)
    assert len(ids) > 300 and max(decoded) <= 4  # each update decodes a window of a token or two


def test_the_direct_backend_decode_is_taken_only_where_it_is_the_same_call(smollm2_tokenizer, word_tokenizer):
    """SmolLM2 (no space clean-up) decodes through its backend directly; a tokenizer that
    cleans up spaces, or one that is not a Hugging Face fast tokenizer, through ``decode``."""
    from powerfast.serving.detokenizer import _direct_decoder

    assert _direct_decoder(smollm2_tokenizer) is not None
    ids = random.Random(fresh_seed()).choices(range(len(smollm2_tokenizer)), k=64)
    assert _direct_decoder(smollm2_tokenizer)(ids) == smollm2_tokenizer.decode(ids, skip_special_tokens=True)
    cleaning = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer.backend_tokenizer, unk_token="<unk>",
                                       clean_up_tokenization_spaces=True)
    assert _direct_decoder(cleaning) is None

    class Wrapped:
        backend_tokenizer = smollm2_tokenizer.backend_tokenizer
        clean_up_tokenization_spaces = False

        def decode(self, ids, skip_special_tokens=True):
            return smollm2_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    assert _direct_decoder(Wrapped()) is None
