"""The offline CLIP tokenizer: known CLIP ids, special tokens, truncation, padding, where the vocabulary comes from."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from _prompts import HOSTILE_PROMPTS, LONG_PROMPT, random_prompts
from _reference_tokenizers import open_clip_tokenizer_module, released_tokenizer_module
from icthp.tokenizer import (
    TOKENIZATIONS,
    TokenizerNotFoundError,
    _vocab_and_merges,
    check_tokenization,
    clean_prompt,
    encode_open_clip,
    find_bpe_file,
    load_tokenizer,
    tokenize,
)

SOT, EOT = 49406, 49407
KNOWN = {
    # CLIP ids (OpenAI / open_clip / laion CLIP-H tokenizers agree on these).
    "a photo of a cat": [SOT, 320, 1125, 539, 320, 2368, EOT],
    "a dog": [SOT, 320, 1929, EOT],
    "A Ferrari car that is made out of WOOD": [SOT, 320, 9606, 1615, 682, 533, 1105, 620, 539, 1704, EOT],
}
PROMPTS = [
    "a tiny dragon taking a bath in a teacup",
    "A Ferrari car that is made out of WOOD!!",
    "it's 3.5 o'clock — café, naïve 東京 🐉",
    "  multiple   spaces\tand\nnewlines ",
]


@pytest.fixture(scope="module")
def openai_simple_tokenizer():
    """OpenAI's own reference tokenizer (``clip/simple_tokenizer.py`` of the openai-clip package).

    Loaded from its file so that ``clip/__init__.py`` (which imports torchvision) is not run.
    """
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openai-clip is not installed")
    source = Path(next(iter(spec.submodule_search_locations))) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", source)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as exc:  # ftfy / regex missing
        pytest.skip(f"openai-clip's simple tokenizer cannot be imported: {exc}")
    return module.SimpleTokenizer()


@pytest.mark.parametrize("prompt", list(KNOWN))
def test_known_clip_ids(tokenizer, prompt):
    assert tokenizer(prompt)["input_ids"] == KNOWN[prompt]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_ids_as_openai_reference_tokenizer(tokenizer, openai_simple_tokenizer, prompt):
    assert tokenizer(prompt)["input_ids"] == [SOT, *openai_simple_tokenizer.encode(prompt), EOT]


def test_special_tokens(tokenizer):
    assert tokenizer.bos_token_id == SOT and tokenizer.eos_token_id == EOT
    assert len(tokenizer) == 49408
    ids = tokenizer("")["input_ids"]
    assert ids == [SOT, EOT]


def test_tokenize_pads_to_77_with_a_mask(tokenizer):
    ids, mask = tokenize(tokenizer, ["a photo of a cat", "a dog"])
    assert ids.shape == mask.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == KNOWN["a photo of a cat"]
    assert ids[1, :4].tolist() == KNOWN["a dog"]
    assert mask.sum(1).tolist() == [7, 4]
    assert mask[0, :7].all() and not mask[0, 7:].any()
    # Padding uses the pad token; whatever it is, the first end-of-text is where CLIP pools.
    assert (ids[0, 7:] == tokenizer.pad_token_id).all()
    assert int((ids[1] == EOT).nonzero()[0]) == 3


def test_long_prompts_are_truncated_keeping_the_end_token(tokenizer):
    long_prompt = " ".join(["a photo of a cat"] * 40)  # 200 words
    ids, mask = tokenize(tokenizer, [long_prompt, "a cat"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == SOT and ids[0, -1] == EOT and mask[0].all()
    assert (ids[0, 1:-1] != EOT).all()
    full = tokenizer(long_prompt, truncation=False)["input_ids"]
    assert ids[0, :-1].tolist() == full[:76]  # the first 75 words' tokens, in order


def test_context_length_is_honoured(tokenizer):
    ids, mask = tokenize(tokenizer, ["a photo of a cat on a mat"], context_length=5)
    assert ids.tolist() == [[SOT, 320, 1125, 539, EOT]] and mask.all()


def test_find_bpe_file_honours_the_environment(tmp_path, monkeypatch):
    default = find_bpe_file()
    assert default.name == "bpe_simple_vocab_16e6.txt.gz"
    copy = tmp_path / "my-bpe.txt.gz"
    shutil.copy(default, copy)
    monkeypatch.setenv("ICTHP_CLIP_BPE", str(copy))
    assert find_bpe_file() == copy
    monkeypatch.setenv("ICTHP_CLIP_BPE", str(tmp_path / "missing.txt.gz"))
    with pytest.raises(TokenizerNotFoundError, match=r"ICTHP_CLIP_BPE=.*missing\.txt\.gz.* is not a file"):
        find_bpe_file()
    with pytest.raises(TokenizerNotFoundError, match="is not a file"):
        load_tokenizer()


def test_no_vocabulary_anywhere_fails_clearly(monkeypatch):
    monkeypatch.delenv("ICTHP_CLIP_BPE", raising=False)
    monkeypatch.setattr("icthp.tokenizer._BPE_PACKAGES", ("icthp_no_such_package",))
    with pytest.raises(TokenizerNotFoundError, match=r"install `openai-clip`.*ICTHP_CLIP_BPE.*vocab\.json and merges\.txt"):
        find_bpe_file()


def test_vocab_and_merges_files_beside_a_checkpoint(tokenizer, tmp_path, monkeypatch):
    vocab, merges = _vocab_and_merges(str(find_bpe_file()))
    assert len(vocab) == 49408 and len(merges) == 49152 - 256 - 2
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )

    def no_bpe():
        raise AssertionError("the packaged BPE file must not be read when vocab.json + merges.txt are given")

    monkeypatch.setattr("icthp.tokenizer.find_bpe_file", no_bpe)
    from_files = load_tokenizer(tmp_path)
    for prompt in [*KNOWN, *PROMPTS]:
        assert from_files(prompt)["input_ids"] == tokenizer(prompt)["input_ids"], prompt
    a, b = tokenize(from_files, PROMPTS), tokenize(tokenizer, PROMPTS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------- text cleaning
# The released evaluation tokenises with HPSv2's copy of open_clip's SimpleTokenizer, which cleans the text
# (ftfy, html.unescape twice, whitespace, lower case) before the BPE. Both references are the packages' own
# tokenizer.py files (tests/_reference_tokenizers.py), not a re-implementation.



@pytest.fixture(scope="module")
def released():
    return released_tokenizer_module()


@pytest.fixture(scope="module")
def open_clip_module():
    return open_clip_tokenizer_module()


def _zero_padded(tokenizer, prompts, **kw) -> torch.Tensor:
    """icthp's ids with padding replaced by 0, the way open_clip pads (icthp pads with end-of-text + mask 0)."""
    ids, mask = tokenize(tokenizer, prompts, **kw)
    return torch.where(mask.bool(), ids, torch.zeros_like(ids))


def test_the_prompt_list_is_long_and_hostile(tokenizer):
    assert len(HOSTILE_PROMPTS) >= 40 and len(set(HOSTILE_PROMPTS)) == len(HOSTILE_PROMPTS)
    # Without the cleaning most of them tokenise differently: the list really exercises it.
    valid = [p for p in HOSTILE_PROMPTS if "\ud800" not in p]  # the raw path refuses a lone surrogate
    cleaned = _zero_padded(tokenizer, valid)
    raw = _zero_padded(tokenizer, valid, tokenization="transformers")
    differ = [p for p, a, b in zip(valid, cleaned, raw, strict=True) if not torch.equal(a, b)]
    assert len(differ) >= 20, differ


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS, ids=[repr(p)[:30] for p in HOSTILE_PROMPTS])
def test_ids_equal_the_released_evaluation_tokenizer(tokenizer, released, prompt):
    assert _zero_padded(tokenizer, [prompt])[0].tolist() == released.tokenize(prompt)[0].tolist()


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS, ids=[repr(p)[:30] for p in HOSTILE_PROMPTS])
def test_ids_equal_open_clips_own_tokenizer(tokenizer, open_clip_module, prompt):
    assert _zero_padded(tokenizer, [prompt])[0].tolist() == open_clip_module.tokenize(prompt)[0].tolist()


def test_random_strings_equal_both_references(tokenizer, released, open_clip_module):
    prompts = random_prompts(400, seed=11)
    ours = _zero_padded(tokenizer, prompts)
    assert torch.equal(ours, released.tokenize(prompts))
    assert torch.equal(ours, open_clip_module.tokenize(prompts))


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS[:20], ids=[repr(p)[:30] for p in HOSTILE_PROMPTS[:20]])
def test_clean_prompt_equals_the_released_cleaning(released, prompt):
    assert clean_prompt(prompt) == released.whitespace_clean(released.basic_clean(prompt)).lower()


def test_cleaning_examples():
    assert clean_prompt("it’s “quoted”") == "it's \"quoted\""
    assert clean_prompt("Tom &amp;amp; Jerry") == "tom & jerry"  # unescaped twice
    assert clean_prompt("ﬁne ＦＵＬＬ") == "fine full"
    assert clean_prompt("donâ€™t") == "don't"
    assert clean_prompt(" a\t\n b\u3000c ") == "a b c"


def test_special_tokens_as_the_released_tokenizer_reads_them(tokenizer):
    # open_clip's own names become the special ids; transformers' names are plain text there.
    assert encode_open_clip(tokenizer, "a <end_of_text> b") == [320, EOT, 321]
    assert encode_open_clip(tokenizer, "<START_OF_TEXT>") == [SOT]
    assert EOT not in encode_open_clip(tokenizer, "<|endoftext|>")
    # ... whereas the transformers tokenizer (the released training's) reads <|endoftext|> as the token.
    assert tokenizer("<|endoftext|>")["input_ids"] == [SOT, EOT, EOT]


def test_truncation_keeps_the_end_token_as_open_clip_does(tokenizer, released):
    ids, mask = tokenize(tokenizer, [LONG_PROMPT])
    assert mask.all() and ids[0, -1] == EOT and ids[0, 0] == SOT
    assert ids[0].tolist() == released.tokenize(LONG_PROMPT)[0].tolist()
    assert tokenize(tokenizer, [LONG_PROMPT], context_length=5)[0].tolist() == \
        released.tokenize(LONG_PROMPT, context_length=5).tolist()


def test_transformers_tokenization_is_the_plain_transformers_tokenizer(tokenizer):
    # tokenization="transformers" (the released training's) is the tokenizer's own call on the raw text.
    for prompt in HOSTILE_PROMPTS:
        if "\ud800" in prompt:
            continue  # the Rust tokenizer cannot take a lone surrogate (see the next test)
        ids, mask = tokenize(tokenizer, [prompt], tokenization="transformers")
        enc = tokenizer(prompt, padding="max_length", truncation=True, max_length=77)
        assert ids[0].tolist() == enc["input_ids"] and mask[0].tolist() == enc["attention_mask"], prompt


def test_lone_surrogates_are_cleaned_or_refused_clearly(tokenizer):
    # ftfy replaces a lone surrogate (as the release does), so the default path takes such a prompt; the
    # raw transformers path names the prompt instead of failing inside the Rust tokenizer.
    from icthp.errors import InputError

    assert encode_open_clip(tokenizer, "a \ud800 cat") == encode_open_clip(tokenizer, "a \ufffd cat")
    with pytest.raises(InputError, match=r"prompt 1 is not valid Unicode \(surrogates not allowed at position 2\)"):
        tokenize(tokenizer, ["a cat", "a \ud800 cat"], tokenization="transformers")


def test_tokenization_is_checked(tokenizer):
    assert TOKENIZATIONS[0] == "open_clip" and check_tokenization("transformers") == "transformers"
    with pytest.raises(ValueError, match="tokenization must be one of open_clip, transformers, got 'ftfy'"):
        tokenize(tokenizer, ["a cat"], tokenization="ftfy")
    with pytest.raises(TypeError, match="prompt 1 must be a str, got NoneType"):
        tokenize(tokenizer, ["a cat", None])
