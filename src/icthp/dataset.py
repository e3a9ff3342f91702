"""Torch ``Dataset`` and collate function for training on triplets, with named fields.

Each item is a dict of named tensors (no positional ``pixels_0 / 1 / r``); :class:`TripletCollator` stacks
them and tokenises the batch's prompts at once into a :class:`TripletBatch`::

    loader = DataLoader(TripletDataset(read_triplets("train.parquet")), batch_size=32,
                        collate_fn=TripletCollator(load_tokenizer()), num_workers=4)
    for batch in loader:
        batch.lose, batch.win, batch.refined            # [B, 3, 224, 224] normalised pixels
        batch.prompt_ids, batch.refined_prompt_ids      # [B, 77]
        batch.labels                                    # [B, 4] = E1 E2 R1 R2 (NaN where unlabelled)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch.utils.data import Dataset

from .data import LABELS, ROLES, Triplet
from .errors import InputError
from .preprocess import PreprocessConfig, load_image, pil_to_model_input
from .tokenizer import DEFAULT_TOKENIZATION, Tokenization, check_tokenization, tokenize


class TripletDataset(Dataset):
    """Triplets as model inputs: three preprocessed images (released preprocessing), prompts and labels.

    Args:
        triplets: rows from :func:`icthp.data.read_triplets`.
        preprocess: image size and normalisation (from the model; 224 px OpenAI CLIP by default).
        require_labels: refuse rows without E1 E2 R1 R2 (the ICT stage needs them).

    Example:
        >>> ds = TripletDataset(read_triplets("train.parquet"), require_labels=True)  # doctest: +SKIP
        >>> sorted(ds[0])  # doctest: +SKIP
        ['index', 'labels', 'lose', 'prompt', 'refined', 'refined_prompt', 'win']
    """

    def __init__(self, triplets: Sequence[Triplet], preprocess: PreprocessConfig = PreprocessConfig(),
                 require_labels: bool = False):
        self.triplets = list(triplets)
        self.preprocess = preprocess
        if require_labels:
            unlabelled = [t.index for t in self.triplets if not t.has_labels]
            if unlabelled:
                raise InputError(f"{len(unlabelled)} triplet(s) have no E1 E2 R1 R2 labels (first: row {unlabelled[0]}); "
                                 "build them with `icthp data label`")

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, i: int) -> dict:
        t = self.triplets[i]
        item: dict = {role: pil_to_model_input(load_image(getattr(t, role)), self.preprocess) for role in ROLES}
        item["prompt"] = t.prompt
        # Rows without a refined prompt (plain preference triplets) reuse the easy prompt.
        item["refined_prompt"] = t.refined_prompt or t.prompt
        item["labels"] = torch.tensor([float("nan") if getattr(t, k) is None else getattr(t, k) for k in LABELS],
                                      dtype=torch.float32)
        item["index"] = t.index
        return item


@dataclass
class TripletBatch:
    """A collated batch. Pixels ``[B, 3, S, S]``, token ids / masks ``[B, L]``, ``labels [B, 4]`` (E1 E2 R1 R2)."""

    lose: torch.Tensor
    win: torch.Tensor
    refined: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    refined_prompt_ids: torch.Tensor
    refined_prompt_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def to(self, device: str | torch.device, non_blocking: bool = False) -> TripletBatch:
        return TripletBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> TripletBatch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return TripletBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return self.lose.shape[0]


class TripletCollator:
    """Collate :class:`TripletDataset` items into a :class:`TripletBatch`, tokenising the prompts in one call.

    A class (not a closure) so that DataLoader worker processes can pickle it. ``tokenization`` is
    ``"open_clip"`` (the released evaluation's cleaning, default: training and scoring see the same ids) or
    ``"transformers"`` (the released training's tokenizer, no ftfy); see :mod:`icthp.tokenizer`.
    """

    def __init__(self, tokenizer, context_length: int = 77, tokenization: Tokenization = DEFAULT_TOKENIZATION):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.tokenization = check_tokenization(tokenization)

    def __call__(self, items: Sequence[dict]) -> TripletBatch:
        ids, mask = tokenize(self.tokenizer, [it["prompt"] for it in items], self.context_length,
                             tokenization=self.tokenization)
        rids, rmask = tokenize(self.tokenizer, [it["refined_prompt"] for it in items], self.context_length,
                               tokenization=self.tokenization)
        return TripletBatch(
            lose=torch.stack([it["lose"] for it in items]),
            win=torch.stack([it["win"] for it in items]),
            refined=torch.stack([it["refined"] for it in items]),
            prompt_ids=ids,
            prompt_mask=mask,
            refined_prompt_ids=rids,
            refined_prompt_mask=rmask,
            labels=torch.stack([it["labels"] for it in items]),
            index=torch.tensor([it["index"] for it in items]),
        )
