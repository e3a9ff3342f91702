"""Baselines load by their default hub ids offline (HF_HUB_OFFLINE=1) from huggingface_hub's cache, with
no download, and say what to do when the files are not cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _hub import fake_hub_cache
from icthp.baselines.aesthetic import write_random_aesthetic
from icthp.baselines.clip import write_random_clip, write_random_pickscore
from icthp.baselines.hpsv2 import write_random_hpsv2
from icthp.baselines.imagereward import write_random_imagereward

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]


def test_default_hub_ids_load_offline_from_the_cache(tmp_path):
    w = tmp_path / "weights"
    aesthetic = write_random_aesthetic(w / "aesthetic")
    (aesthetic / "sac+logos+ava1-l14-linearMSE.pth").rename(aesthetic / "aesthetic-model.pth")  # trl's copy
    clip_l14 = Path(shutil.move(aesthetic / "clip", w / "clip-l14"))
    (w / "bert").mkdir()
    (w / "bert" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    hps = write_random_hpsv2(w / "hps", version="v2.0")
    write_random_hpsv2(hps, version="v2.1", seed=5)  # both files in one repository, as xswu/HPSv2
    repos = {
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": write_random_clip(w / "clip"),
        "yuvalkirstain/PickScore_v1": write_random_pickscore(w / "pickscore"),
        "xswu/HPSv2": hps,
        "THUDM/ImageReward": write_random_imagereward(w / "imagereward", vocab=False),  # as released: no vocab.txt
        "google-bert/bert-base-uncased": w / "bert",
        "trl-lib/ddpo-aesthetic-predictor": aesthetic,
        "openai/clip-vit-large-patch14": clip_l14,
    }
    cache = tmp_path / "hub"
    for i, (repo, files) in enumerate(repos.items()):
        fake_hub_cache(cache, repo, files, f"{i:040d}")
    code = (
        "import json, torch\n"
        "from icthp.baselines import BASELINES, load_baseline\n"
        "x = torch.rand(2, 3, 64, 80)\n"
        "out = {}\n"
        "for name in BASELINES:\n"
        "    s = load_baseline(name)\n"
        "    out[name] = {'files': s.info.files, 'score': s.score(x, None if name == 'aesthetic' else 'a cat').tolist()}\n"
        "try:\n"
        "    load_baseline('clip', 'someone/not-cached')\n"
        "except Exception as exc:\n"
        "    out['error'] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    snapshot = {repo: str(cache / f"models--{repo.replace('/', '--')}" / "snapshots" / f"{i:040d}")
                for i, repo in enumerate(repos)}
    assert out["hpsv2"]["files"] == [snapshot["xswu/HPSv2"] + "/HPS_v2_compressed.pt"]
    assert out["hpsv2.1"]["files"] == [snapshot["xswu/HPSv2"] + "/HPS_v2.1_compressed.pt"]
    assert out["imagereward"]["files"] == [snapshot["THUDM/ImageReward"] + "/ImageReward.pt"]
    assert out["aesthetic"]["files"] == [snapshot["openai/clip-vit-large-patch14"] + "/model.safetensors",
                                         snapshot["trl-lib/ddpo-aesthetic-predictor"] + "/aesthetic-model.pth"]
    assert out["clip"]["files"][0].startswith(snapshot["laion/CLIP-ViT-H-14-laion2B-s32B-b79K"])
    assert out["pickscore"]["files"][0].startswith(snapshot["yuvalkirstain/PickScore_v1"])
    assert out["hpsv2"]["score"] != out["hpsv2.1"]["score"]  # two different files were read
    assert out["error"].startswith("HubDownloadError: could not get CLIP 'someone/not-cached' from the Hugging Face "
                                   "hub (HF_HUB_OFFLINE is set and the files are not in the local cache)")
    assert "hf download someone/not-cached --local-dir DIR" in out["error"]
