"""CLIP BPE tokenizer that works offline.

The ICT model is a CLIP text tower, so prompts are tokenised with CLIP's byte-level BPE (49408 ids, 77
tokens, truncated). The vocabulary is not downloaded: it is read from

1. ``vocab.json`` + ``merges.txt`` beside a checkpoint, when present;
2. the file named by the ``ICTHP_CLIP_BPE`` environment variable;
3. ``bpe_simple_vocab_16e6.txt.gz`` as shipped inside an installed package (``openai-clip``, which icthp
   depends on, ``clip-anytorch`` or ``open_clip_torch``).

and turned into a transformers CLIP tokenizer in memory, giving the same ids as the tokenizer of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the one the released training code uses).

Text cleaning is part of the score. :func:`tokenize` turns prompts into ids one of two ways
(:data:`TOKENIZATIONS`):

``open_clip`` (the default everywhere)
    The released evaluation's tokenizer (open_clip's ``SimpleTokenizer``, as vendored by HPSv2 and called
    by ``trainer/eval/eval.py``): the text is cleaned (``ftfy.fix_text``, ``html.unescape`` twice, strip,
    runs of whitespace to one space, lower case), split with open_clip's pattern (its literal
    ``<start_of_text>`` / ``<end_of_text>`` are special tokens, transformers' ``<|endoftext|>`` is plain
    text), then byte-level BPE. Curly quotes, HTML entities, ligatures, fullwidth letters and mojibake give
    other ids without the cleaning.
``transformers``
    A transformers CLIP tokenizer on the raw text (NFC, whitespace, lower case; no ftfy): what the released
    *training* code and PickScore's release used.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from .errors import InputError, TokenizerNotFoundError

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# Packages known to ship the OpenAI CLIP BPE merges, in order of preference.
_BPE_PACKAGES = ("clip", "open_clip")
# Number of merges CLIP keeps: 49152 - 256 - 2 (the vocabulary is 256 bytes x 2 + merges + 2 specials).
_N_MERGES = 49152 - 256 - 2
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"

Tokenization = Literal["open_clip", "transformers"]
#: the ways a prompt can become token ids (see the module docstring); the first is the default
TOKENIZATIONS: tuple[str, ...] = ("open_clip", "transformers")
DEFAULT_TOKENIZATION: Tokenization = "open_clip"

# open_clip's names of its two special tokens (ids 49406 and 49407, as transformers' <|startoftext|> and
# <|endoftext|>). Typed literally in a prompt they become those ids, as in the released evaluation.
_OPEN_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")


@functools.lru_cache(maxsize=1)
def _open_clip_patterns():
    # Imported here: ftfy and regex take ~0.15 s to import, which `icthp --help` should not pay.
    import ftfy
    import regex

    # open_clip's pre-tokenisation: its special tokens, English contractions, runs of letters, single digits,
    # runs of anything else that is not whitespace; the `regex` module (\p{L}, \p{N}) with IGNORECASE, as
    # open_clip compiles it. Whitespace is the `regex` module's \s (Unicode White_Space), as the released
    # tokenizer collapses it (str.split() would also split on the separators U+001C..U+001F).
    pattern = regex.compile(
        "|".join(_OPEN_CLIP_SPECIALS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    return ftfy.fix_text, pattern, regex.compile(r"\s+")


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


def check_tokenization(tokenization: str) -> Tokenization:
    """Return ``tokenization`` if it is one of :data:`TOKENIZATIONS`, else raise a ``ValueError`` naming them."""
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"tokenization must be one of {', '.join(TOKENIZATIONS)}, got {tokenization!r}")
    return tokenization  # type: ignore[return-value]


def clean_prompt(text: str) -> str:
    """The released evaluation's text cleaning (open_clip's default ``lower`` cleaning).

    ``ftfy.fix_text`` (mojibake, curly quotes, ligatures, fullwidth letters, control characters), HTML
    entities unescaped twice, runs of whitespace to one space, stripped, lower-cased.

    Example:
        >>> clean_prompt("  A ‘Café’ &amp;amp; ﬁsh\t\tＡＢＣ ")
        "a 'café' & fish abc"
    """
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
    fix_text, _, whitespace = _open_clip_patterns()
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return whitespace.sub(" ", text).strip().lower()


def _byte_level(piece: str, _table: dict[int, str] = _bytes_to_unicode()) -> str:
    return "".join(_table[b] for b in piece.encode("utf-8"))


def _bpe_model(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"tokenization='open_clip' needs a tokenizers-backed (fast) CLIP tokenizer, got {type(tokenizer).__name__}; "
            "icthp.tokenizer.load_tokenizer() builds one"
        )
    return backend.model


def encode_open_clip(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as the released evaluation computes them, without start / end tokens.

    :func:`clean_prompt`, then open_clip's pre-tokenisation, then the byte-level BPE of ``tokenizer`` (whose
    merges are CLIP's, so each piece gets the ids open_clip's own BPE gives it).

    Example:
        >>> encode_open_clip(load_tokenizer(), "A Ferrari&amp;a ‘car’")
        [320, 9606, 261, 320, 262, 1615, 262]
    """
    model = _bpe_model(tokenizer)
    specials = {_OPEN_CLIP_SPECIALS[0]: tokenizer.bos_token_id, _OPEN_CLIP_SPECIALS[1]: tokenizer.eos_token_id}
    ids: list[int] = []
    for piece in _open_clip_patterns()[1].findall(clean_prompt(text)):
        special = specials.get(piece)
        if special is not None:
            ids.append(special)
        else:
            ids.extend(t.id for t in model.tokenize(_byte_level(piece)))
    return ids


def _tokenize_open_clip(tokenizer, prompts: Sequence[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    sot, eot = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    ids = torch.full((len(prompts), context_length), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), context_length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        tokens = [sot, *encode_open_clip(tokenizer, prompt), eot]
        if len(tokens) > context_length:
            # As open_clip truncates: the first context_length ids, the last one replaced by end-of-text.
            tokens = tokens[:context_length]
            tokens[-1] = eot
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = 1
    return ids, mask


def tokenize(tokenizer, prompts: Sequence[str], context_length: int = 77, *,
             tokenization: Tokenization = DEFAULT_TOKENIZATION) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise prompts to fixed-length ``input_ids`` and ``attention_mask`` tensors ``[B, context_length]``.

    ``tokenization="open_clip"`` (default) cleans and splits the text as the released evaluation does;
    ``"transformers"`` runs the transformers tokenizer on the raw text (the released training); see the
    module docstring. Long prompts are truncated (the end-of-text token is kept as the last token, as CLIP
    was trained); padding is the pad token (end-of-text for CLIP), with the mask 0 there. CLIP pools at the
    first end-of-text token under a causal mask, so padding never changes the features.

    Example:
        >>> ids, mask = tokenize(load_tokenizer(), ["a cat", "a dog"])
        >>> tuple(ids.shape)
        (2, 77)
        >>> tokenize(load_tokenizer(), ["it’s"])[0][0, :4].tolist()
        [49406, 585, 568, 49407]
    """
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}")
    if check_tokenization(tokenization) == "open_clip":
        return _tokenize_open_clip(tokenizer, prompts, context_length)
    for i, p in enumerate(prompts):
        # ftfy replaces lone surrogates on the open_clip path; the Rust tokenizer would fail with a TypeError.
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"prompt {i} is not valid Unicode ({exc.reason} at position {exc.start})") from None
    enc = tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=context_length,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]
