"""The offline CLIP tokenizer: known CLIP ids, special tokens, truncation, padding, where the vocabulary comes from."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from icthp.tokenizer import (
    TokenizerNotFoundError,
    _vocab_and_merges,
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
