"""Two gloo processes with features gathered with gradient give the single-process loss and gradients."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from icthp.distributed import gather_with_grad
from icthp.losses import ict_loss
from icthp.modeling import architecture_dict, build_hp, clip_config, set_hp_trainable

B, D_IN, D = 6, 10, 8


def _data():
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(B, 3, D_IN, generator=g)
    x_e, x_r = torch.randn(B, D_IN, generator=g), torch.randn(B, D_IN, generator=g)
    labels = torch.rand(B, 4, generator=g)
    return x_img, x_e, x_r, labels


def _model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"img": torch.nn.Linear(D_IN, D), "txt": torch.nn.Linear(D_IN, D)})


def _loss(model, x_img, x_e, x_r, labels, gather):
    img, te, tr = model["img"](x_img), model["txt"](x_e), model["txt"](x_r)
    if gather:
        img, te, tr, labels = (gather_with_grad(t) for t in (img, te, tr, labels))
    return ict_loss(img, te, tr, labels).loss


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        per = B // world
        local = [t[rank * per : (rank + 1) * per] for t in _data()]
        loss = _loss(model, *local, gather=True)
        loss.backward()
        for p in model.parameters():  # what DDP does: average the gradients over processes
            dist.all_reduce(p.grad)
            p.grad /= world
        # Plain lists: tensors sent through a queue live in this process's shared memory, gone once it exits.
        queue.put((rank, loss.item(), {n: p.grad.tolist() for n, p in model.named_parameters()}))
        # Tearing gloo down while the peer still has traffic in flight aborts the process (SIGABRT from
        # the gloo transport); both sides wait here first, as the training loop does before it ends.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_global_batch():
    model = _model()
    loss = _loss(model, *_data(), gather=False)
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters()}

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, dist_loss, grads in results:
        assert dist_loss == pytest.approx(loss.item(), abs=1e-6)
        for n, g in grads.items():
            assert torch.allclose(torch.tensor(g), expected[n], atol=1e-6), n
    # Without the gather, each process would only see its own negatives: a different loss.
    half = [t[:3] for t in _data()]
    assert abs(_loss(_model(), *half, gather=False).item() - loss.item()) > 1e-4


def test_gather_is_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_hp_freezing_follows_fix_rate():
    model = build_hp(clip_config(architecture_dict("clip-tiny")), "cpu")  # 2 layers + post_layernorm
    trainable = set(set_hp_trainable(model, fix_rate=0.5))  # int(3 * 0.5) = 1 block frozen
    assert not any(n.startswith("vision_model.encoder.layers.0.") for n in trainable)
    assert any(n.startswith("vision_model.encoder.layers.1.") for n in trainable)
    assert any(n.startswith("vision_model.post_layernorm") for n in trainable)
    assert "visual_projection.weight" not in trainable
    assert any(n.startswith("vision_model.embeddings") for n in trainable)  # as released
    assert all(any(n == f"head.{k}" for n in trainable) for k, _ in model.head.named_parameters())
    trainable = set(set_hp_trainable(model, fix_rate=1.0, freeze_embeddings=True))
    assert all(n.startswith("head.") for n in trainable)
    with pytest.raises(ValueError, match="fix_rate"):
        set_hp_trainable(model, fix_rate=1.5)
