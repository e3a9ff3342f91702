"""CLIP BPE tokenizer that works offline.

The ICT model is a CLIP text tower, so prompts are tokenised with CLIP's byte-level BPE (49408 ids, 77
tokens, truncated). The vocabulary is not downloaded: it is read from

1. ``vocab.json`` + ``merges.txt`` beside a checkpoint, when present;
2. the file named by the ``ICTHP_CLIP_BPE`` environment variable;
3. ``bpe_simple_vocab_16e6.txt.gz`` as shipped inside an installed package (``openai-clip``, which icthp
   depends on, ``clip-anytorch`` or ``open_clip_torch``).

and turned into a transformers CLIP tokenizer in memory, giving the same ids as the tokenizer of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the one the released training code uses).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

from .errors import TokenizerNotFoundError

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# Packages known to ship the OpenAI CLIP BPE merges, in order of preference.
_BPE_PACKAGES = ("clip", "open_clip")
# Number of merges CLIP keeps: 49152 - 256 - 2 (the vocabulary is 256 bytes x 2 + merges + 2 specials).
_N_MERGES = 49152 - 256 - 2
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level mapping: printable bytes map to themselves, the rest to unused code points,
    # so every byte sequence has a reversible unicode spelling without whitespace or control characters.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def find_bpe_file() -> Path:
    """Return the path of the CLIP BPE merges file (``bpe_simple_vocab_16e6.txt.gz``).

    Raises:
        TokenizerNotFoundError: when neither ``ICTHP_CLIP_BPE`` nor a package shipping the file is found.

    Example:
        >>> find_bpe_file().name
        'bpe_simple_vocab_16e6.txt.gz'
    """
    env = os.environ.get("ICTHP_CLIP_BPE")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise TokenizerNotFoundError(f"ICTHP_CLIP_BPE={env!r} is not a file")
        return path
    for package in _BPE_PACKAGES:
        # find_spec locates the package without importing it (importing `clip` would import torchvision).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            candidate = Path(location) / BPE_FILE_NAME
            if candidate.is_file():
                return candidate
    raise TokenizerNotFoundError(
        f"the CLIP BPE vocabulary ({BPE_FILE_NAME}) was not found: install `openai-clip` (a dependency of "
        "icthp), or set ICTHP_CLIP_BPE to the file, or put vocab.json and merges.txt beside the checkpoint"
    )


@functools.lru_cache(maxsize=4)
def _vocab_and_merges(bpe_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # First line is a version header; CLIP keeps the first 48894 merges.
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    vocab_list += ["".join(m) for m in merges]
    vocab_list += [START_OF_TEXT, END_OF_TEXT]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges  # type: ignore[return-value]


def _read_vocab_files(vocab_file: Path, merges_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    merges = [
        tuple(line.split())
        for line in merges_file.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#version")
    ]
    return vocab, merges  # type: ignore[return-value]


def _build(vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int):
    import transformers

    specials = {"bos_token": START_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT, "pad_token": END_OF_TEXT}
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5: CLIPTokenizer is tokenizers-backed and takes the vocabulary in memory.
        from transformers import CLIPTokenizer

        return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length, **specials)
    # transformers 4.x: the fast tokenizer only reads files; write them to a folder removed at once.
    from transformers import CLIPTokenizerFast

    with tempfile.TemporaryDirectory(prefix="icthp-bpe-") as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
        return CLIPTokenizerFast(
            vocab_file=str(vocab_file), merges_file=str(merges_file), model_max_length=model_max_length, **specials
        )


def load_tokenizer(checkpoint_dir: str | os.PathLike | None = None, model_max_length: int = 77):
    """Build the CLIP tokenizer without any network access.

    Args:
        checkpoint_dir: a directory that may hold ``vocab.json`` and ``merges.txt`` (used when present).
        model_max_length: context length; prompts are truncated to it (77 for every CLIP).

    Returns:
        A transformers CLIP tokenizer (fast).

    Example:
        >>> tok = load_tokenizer()
        >>> tok("a photo of a cat")["input_ids"][:2]
        [49406, 320]
    """
    if checkpoint_dir is not None:
        d = Path(checkpoint_dir)
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return _build(*_read_vocab_files(d / "vocab.json", d / "merges.txt"), model_max_length)
    vocab, merges = _vocab_and_merges(str(find_bpe_file()))
    return _build(vocab, merges, model_max_length)


def tokenize(tokenizer, prompts: list[str], context_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompts to fixed-length ``input_ids`` and ``attention_mask`` tensors ``[B, context_length]``.

    Long prompts are truncated (the end-of-text token is kept as the last token, as CLIP was trained).

    Example:
        >>> ids, mask = tokenize(load_tokenizer(), ["a cat", "a dog"])
        >>> tuple(ids.shape)
        (2, 77)
    """
    enc = tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=context_length,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]
