"""The fixed sets of string options icthp's functions accept, each listed once, importable without torch.

The functions that check one of these values take its list from here, and the command line builds its
choices (``--layout``, ``--on-error``, ``--score-ties`` ...) from the same lists: ``icthp --help`` must list
them without importing torch, which every module using the values imports.

Example:
    >>> from icthp.choices import SCORE_TIES
    >>> SCORE_TIES
    ('error', 'half')
"""

from __future__ import annotations

#: Checkpoint layouts written by :func:`icthp.checkpoints.save_ict` / ``save_hp`` / ``convert``: icthp's own
#: (``model.safetensors`` + ``config.json`` + ``icthp.json``) and the released one (``pytorch_model.bin``;
#: ``hp_backbone/`` + ``hp_scorer/`` for HP).
CHECKPOINT_LAYOUTS = ("icthp", "released")

#: What a batch job does with an unreadable image (:func:`icthp.jobs.run_score_job`): record it and go on,
#: or stop.
ON_ERROR = ("skip", "fail")

#: Benchmark protocol (:mod:`icthp.bench.accuracy`, docs/bench.md): a scorer's exact tie on a strict
#: preference counts as an error or as half right.
SCORE_TIES = ("error", "half")
#: Pairs people judged a tie: dropped, credited 0.5, or counted as errors.
LABEL_TIES = ("drop", "half", "error")
#: Accuracy pooled over items, or the mean of per-prompt accuracies.
AGGREGATES = ("pooled", "per_prompt")
#: Dataset kinds of a benchmark (:class:`icthp.bench.evaluate.Protocol`); ``auto`` reads it from the columns.
DATA_KINDS = ("auto", "triplet", "pair", "ranked")
#: How a benchmark counts (:data:`icthp.bench.metrics.METRICS`): icthp's generic metrics, then the official
#: metrics of the benchmarks they are named after.
METRIC_NAMES = ("triplet", "pair", "ranked", "pick-a-pic", "hpdv2", "imagereward", "genai-bench")
