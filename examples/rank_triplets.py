"""Rank the images of each triplet in a manifest with ICT, HP and ICT-HP.

Usage:
    python examples/rank_triplets.py ../shared/data/demo/triplets.jsonl              # released weights (hub)
    python examples/rank_triplets.py ../shared/data/demo/triplets.jsonl --tiny       # offline, UNTRAINED preset

Each manifest row has a prompt and three images (lose, win, high); a good reward orders them
lose < win < high. ICT-HP within a triplet is ict * softmax(hp_logit), as in the released validation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import icthp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--tiny", action="store_true", help="use the untrained tiny-random preset (offline demo)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    source = {"ict": "tiny-random", "hp": "tiny-random"} if args.tiny else {}
    scorer = icthp.load("ict-hp", device=args.device, **source)
    roles = ("lose", "win", "high")
    for line in args.manifest.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        images = [args.manifest.parent / row[r] for r in roles]
        s = scorer.score_images_all(images, row["prompt"])
        group = icthp.ict_hp_group(s.ict, s.hp_logit)
        print(f"\n{row['prompt']}")
        for role, ict, hp, g in zip(roles, s.ict, s.hp, group, strict=True):
            print(f"  {role:5s} ict={ict:.4f} hp={hp:.4f} ict_hp(triplet)={g:.4f}")
        ranking = scorer.rank(row["prompt"], images)
        print("  best to worst:", " > ".join(roles[i] for i in ranking.order))


if __name__ == "__main__":
    main()
