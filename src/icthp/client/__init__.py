"""Python clients of ``icthp serve``, with retries, timeouts and the reward-function shapes RL trainers call.

:class:`RewardClient` is synchronous and talks to one server; :class:`AsyncRewardClient` (asyncio) spreads
requests over one or several servers with back-pressure, and retries a failed request on another server.

Needs ``httpx`` (``pip install "icthp[client]"``); no torch import unless you pass tensors.

Images can be file paths (read here, sent as bytes), encoded bytes, PIL images, numpy arrays (channels-last
``[H, W, C]`` / ``[B, H, W, C]``, uint8 or float in [0, 1]) or torch tensors (channels-first ``[C, H, W]`` /
``[B, C, H, W]``, float in [0, 1] or uint8). Arrays and tensors of one shape travel as one raw uint8 array
(no encoding); float pixels are quantised to uint8 (``round(x * 255)``), exactly what saving them as PNG does.

Rewards: a service started with ``--reward`` (one column, or a weighted sum such as ``ict_hp:1,pickscore:0.5``)
returns that reward beside the score columns; :attr:`ScoreResult.reward` holds it (the main column, e.g.
``ict_hp``, from a service that predates ``--reward``). ``score(..., advantages=True)`` adds per-prompt
z-scores of the reward, ``(r - mean_prompt) / (std_prompt + 1e-4)`` (:func:`group_advantages`).

Example:
    >>> from icthp.client import RewardClient
    >>> with RewardClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     result = client.score(["I1.jpg", "I2.jpg", "I3.png"], "a wooden Ferrari")
    ...     result["ict_hp"], result.ranking["order"]
"""

from __future__ import annotations

from ..advantages import ADVANTAGE_EPS, group_advantages
from ._common import REWARD_FN_SHAPES, TOKEN_ENV, ScoreResult, ServiceError
from .aio import AsyncRewardClient
from .sync import RewardClient

__all__ = ["ADVANTAGE_EPS", "REWARD_FN_SHAPES", "TOKEN_ENV", "AsyncRewardClient", "RewardClient", "ScoreResult",
           "ServiceError", "group_advantages"]
