"""docs/offline.md's journey, run as written: every command offline on tiny-random weights, in order.

The block under "## The whole journey" is parsed and executed: `mkdir -p`, `cat > FILE <<'EOF'` here-documents,
`icthp ...` commands (in this process, through `icthp.cli.main`; a trailing `&` starts one in the
background), and `python -c ...`. Each must succeed, so the docs cannot drift from the commands and keys
that work.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from icthp.cli import main
from icthp.files import read_rows

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "offline.md"


def journey_lines() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## The whole journey", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "docs/offline.md lost its journey block"
    return block.group(1).splitlines()


def _run(lines: list[str], cwd: Path) -> list[subprocess.Popen]:
    background: list[subprocess.Popen] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        heredoc = re.fullmatch(r"cat > (\S+) <<'EOF'", line)
        if heredoc:
            body = []
            while lines[i] != "EOF":
                body.append(lines[i])
                i += 1
            i += 1
            (cwd / heredoc.group(1)).write_text("\n".join(body) + "\n", encoding="utf-8")
            continue
        args = shlex.split(line)
        if args[:2] == ["mkdir", "-p"]:
            (cwd / args[2]).mkdir(parents=True, exist_ok=True)
        elif args[0] == "icthp" and args[-1] == "&":
            exe = str(Path(sys.executable).with_name("icthp"))
            background.append(subprocess.Popen([exe, *args[1:-1]], cwd=cwd, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE, text=True))
        elif args[0] == "icthp":
            code = main(args[1:])
            assert code == 0, f"`{line}` exited {code}"
        elif args[:2] == ["python", "-c"]:
            res = subprocess.run([sys.executable, "-c", args[2]], cwd=cwd, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, f"`{line}` failed:\n{res.stderr[-3000:]}"
            background_out = res.stdout
            assert "untrained" in background_out and "[" in background_out, background_out
        else:
            raise AssertionError(f"docs/offline.md: the test cannot run `{line}`; teach tests/test_journey.py")
    return background


@pytest.mark.slow
def test_the_offline_journey_in_the_docs_runs_as_written(demo_dir, tmp_path, monkeypatch):
    # Lay out a checkout: the repository (configs/) with shared/ beside it, as the docs assume.
    repo = tmp_path / "main"
    repo.mkdir()
    (repo / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "shared").symlink_to(demo_dir.parents[1])
    monkeypatch.chdir(repo)
    background = []
    try:
        background = _run(journey_lines(), repo)
    finally:
        for proc in background:
            proc.terminate()
            proc.wait(timeout=30)
    tour = repo / "tour"
    # Each step left what the doc says, flagged untrained.
    assert json.loads((tour / "scores.csv.meta.json").read_text())["untrained"] is True
    assert all(r["E1"] is not None for r in read_rows(tour / "labelled.parquet"))
    trained = json.loads((tour / "trained-scores.jsonl.meta.json").read_text())
    assert trained["untrained"] is True  # exports trained from untrained weights say so
    bench = json.loads((tour / "bench" / "results.json").read_text())
    assert {s["name"] for s in bench["scorers"]} == {"ict-hp", "clip", "pickscore", "hpsv2", "hpsv2.1",
                                                    "imagereward", "aesthetic"}
    assert json.loads((tour / "metrics.csv.meta.json").read_text())["untrained"] is True
    assert (tour / "finetune" / "lora").is_dir()
    assert json.loads((tour / "finetune" / "summary.json").read_text())["untrained"] is True
    assert os.path.isdir(tour / "weights" / "pickscore")
