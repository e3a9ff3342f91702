"""README.md's install and test commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = _bash_blocks(readme)
    install = next(line for b in blocks for line in b.splitlines() if line.startswith("pip install"))
    test = next(line for b in blocks for line in b.splitlines() if "pytest" in line)
    assert install in ci, f"README install command {install!r} is not what .ci/run runs"
    assert test in ci, f"README test command {test!r} is not what .ci/run runs"
    assert "python3 -m venv" in ci


def test_readme_main_job_uses_existing_commands():
    readme = (ROOT / "README.md").read_text()
    assert "icthp score ../shared/data/demo/triplets.jsonl" in readme
