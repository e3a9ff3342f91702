"""TripletDataset + TripletCollator: named fields equal the released preprocessing and tokenisation."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from icthp.data import Triplet, read_triplets
from icthp.dataset import TripletBatch, TripletCollator, TripletDataset
from icthp.errors import InputError
from icthp.preprocess import preprocess_pil
from icthp.tokenizer import tokenize


@pytest.fixture(scope="module")
def demo_triplets(demo_dir):
    rows = read_triplets(demo_dir / "triplets.jsonl")
    # Give the first row labels and a refined prompt, leave the second as it is (unlabelled).
    first = rows[0]
    labelled = Triplet(first.prompt, first.lose, first.win, first.refined, refined_prompt=first.prompt + ", detailed",
                       E1=0.2, E2=0.4, R1=0.1, R2=0.3, index=first.index)
    return [labelled, rows[1]]


def test_items_and_batches_have_named_fields(demo_triplets, tokenizer):
    ds = TripletDataset(demo_triplets)
    item = ds[0]
    assert set(item) == {"lose", "win", "refined", "prompt", "refined_prompt", "labels", "index"}
    expected = preprocess_pil([demo_triplets[0].lose, demo_triplets[0].win, demo_triplets[0].refined])
    for k, role in enumerate(("lose", "win", "refined")):
        assert torch.equal(item[role], expected[k])
    assert item["labels"].tolist() == pytest.approx([0.2, 0.4, 0.1, 0.3])
    assert all(math.isnan(v) for v in ds[1]["labels"].tolist())  # unlabelled row: NaN, not a fake 0
    assert ds[1]["refined_prompt"] == demo_triplets[1].prompt  # no refined prompt: the easy one is reused

    collate = TripletCollator(tokenizer)
    batch = collate([ds[0], ds[1]])
    assert isinstance(batch, TripletBatch) and len(batch) == 2
    assert batch.lose.shape == (2, 3, 224, 224)
    ids, mask = tokenize(tokenizer, [t.prompt for t in demo_triplets])
    assert torch.equal(batch.prompt_ids, ids) and torch.equal(batch.prompt_mask, mask)
    rids, _ = tokenize(tokenizer, [demo_triplets[0].refined_prompt, demo_triplets[1].prompt])
    assert torch.equal(batch.refined_prompt_ids, rids)
    assert batch.index.tolist() == [t.index for t in demo_triplets]
    moved = batch.to("cpu")
    assert torch.equal(moved.win, batch.win)


def test_dataloader_with_workers(demo_triplets, tokenizer):
    collate = TripletCollator(tokenizer)
    pickle.dumps(collate)  # worker processes receive it pickled
    loader = DataLoader(TripletDataset(demo_triplets), batch_size=2, collate_fn=collate, num_workers=2)
    (batch,) = list(loader)
    direct = collate([TripletDataset(demo_triplets)[i] for i in range(2)])
    assert torch.equal(batch.refined, direct.refined) and torch.equal(batch.prompt_ids, direct.prompt_ids)


def test_require_labels_refuses_unlabelled_rows(demo_triplets):
    with pytest.raises(InputError, match=r"no E1 E2 R1 R2 labels.*icthp data label"):
        TripletDataset(demo_triplets, require_labels=True)


def _fake_item(i: int, prompt: str, refined: str) -> dict:
    image = torch.zeros(3, 224, 224)
    return {"lose": image, "win": image, "refined": image, "prompt": prompt, "refined_prompt": refined,
            "labels": torch.zeros(4), "index": i}


@pytest.mark.parametrize("tokenization", ["open_clip", "transformers"])
def test_collator_tokenises_as_configured(tokenizer, tokenization):
    # Training sees the released evaluation's ids by default; tokenization="transformers" gives the released
    # training's (no ftfy), which differ on curly quotes and HTML entities.
    prompts = ["it’s a “wooden” car", "Tom &amp; Jerry"]
    refined = ["ﬁne ＦＵＬＬ detail", "a plain prompt"]
    collate = TripletCollator(tokenizer, tokenization=tokenization)
    batch = collate([_fake_item(i, p, r) for i, (p, r) in enumerate(zip(prompts, refined, strict=True))])
    ids, mask = tokenize(tokenizer, prompts, tokenization=tokenization)
    rids, rmask = tokenize(tokenizer, refined, tokenization=tokenization)
    assert torch.equal(batch.prompt_ids, ids) and torch.equal(batch.prompt_mask, mask)
    assert torch.equal(batch.refined_prompt_ids, rids) and torch.equal(batch.refined_prompt_mask, rmask)
    other = tokenize(tokenizer, prompts, tokenization="transformers" if tokenization == "open_clip" else "open_clip")[0]
    assert not torch.equal(other[0], ids[0]) and not torch.equal(other[1], ids[1])
    assert pickle.loads(pickle.dumps(collate)).tokenization == tokenization
    with pytest.raises(ValueError, match="tokenization must be one of"):
        TripletCollator(tokenizer, tokenization="raw")
