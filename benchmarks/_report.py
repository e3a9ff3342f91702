"""What every benchmark result records about where it ran, and how results are written."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def environment(device: str) -> dict:
    """Machine, library versions and git commit, for a result's JSON."""
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "machine": {"cpu": cpu, "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "commit": commit,
    }


def emit(result: dict, save: Path | None) -> None:
    """Write the result to ``save`` (if given) and print it as the last line."""
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
