"""Hub ids resolve through huggingface_hub's cache, offline (HF_HUB_OFFLINE=1), with no download."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _hub import fake_hub_cache
from icthp.presets import write_tiny_preset


def test_default_hub_ids_load_offline_from_the_cache(tmp_path):
    weights = write_tiny_preset(tmp_path / "weights", seed=3)
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "8y/ICT", weights / "ict", "a" * 40)
    fake_hub_cache(cache, "8y/HP", weights / "hp", "b" * 40)
    code = (
        "import json, icthp;"
        "s = icthp.load('ict-hp');"  # default sources: 8y/ICT and 8y/HP
        "r = s.score_images_all([__import__('PIL.Image', fromlist=['x']).new('RGB', (64, 48), 'red')], 'a red square');"
        "print(json.dumps({'ict': s.ict.info.path, 'hp': s.hp.info.path, 'untrained': s.ict.info.untrained,"
        " 'score': float(r.ict_hp[0])}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["ict"].endswith("a" * 40) and out["hp"].endswith("b" * 40)
    assert out["untrained"] is True  # the preset marker travels with the files

    # The same files loaded from the directory give the same score: the hub path adds nothing.
    import icthp

    direct = icthp.load("ict-hp", ict=weights / "ict", hp=weights / "hp")
    from PIL import Image

    ref = direct.score_images_all([Image.new("RGB", (64, 48), "red")], "a red square")
    assert abs(float(ref.ict_hp[0]) - out["score"]) < 1e-6
