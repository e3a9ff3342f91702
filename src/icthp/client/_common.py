"""What both clients share: errors, results, encoding images, building requests, joining answers."""

from __future__ import annotations

import io
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..advantages import ADVANTAGE_EPS, group_advantages  # noqa: F401 (part of the client's API)

TOKEN_ENV = "ICTHP_SERVE_TOKEN"
_RETRY_STATUS = {429, 502, 503, 504}
REWARD_FN_SHAPES = ("ddpo", "flow_grpo")


class ServiceError(RuntimeError):
    """The service answered with an error (``status``, machine-readable ``code``, ``message``)."""

    def __init__(self, status: int, code: str, message: str, index: int | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.index = status, code, message, index


@dataclass
class ScoreResult:
    """Scores of one ``score`` call, in input order.

    ``result["ict"]`` is a float32 array; ``result.main`` names the model's main column (``ict_hp``...).
    ``result.reward`` (float32) is the reward the service was configured to return (``reward_name``: a column,
    or a weighted sum such as ``ict_hp:1,pickscore:0.5``); the main column when the service does not say.
    ``result.advantages`` (float32) are per-prompt z-scores of the reward when ``advantages=True`` was asked.
    """

    scores: dict[str, list[float]]
    main: str
    untrained: bool = False
    ranking: dict | None = None
    timing_ms: list[dict] = field(default_factory=list)
    reward: np.ndarray | None = None
    reward_name: str | None = None
    advantages: np.ndarray | None = None

    def __post_init__(self):
        if self.reward is None:
            self.reward = np.asarray(self.scores[self.main], dtype=np.float32)
            self.reward_name = self.reward_name or self.main
        else:
            self.reward = np.asarray(self.reward, dtype=np.float32)
            self.reward_name = self.reward_name or self.main
        if self.advantages is not None:
            self.advantages = np.asarray(self.advantages, dtype=np.float32)

    def __getitem__(self, column: str) -> np.ndarray:
        try:
            return np.asarray(self.scores[column], dtype=np.float32)
        except KeyError:
            raise KeyError(f"no score column {column!r}; the service returned {sorted(self.scores)}") from None

    def __len__(self) -> int:
        return len(self.scores[self.main])

    @property
    def columns(self) -> list[str]:
        return list(self.scores)


# ------------------------------------------------------------------------------------------------ encoding


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_hwc_uint8(x: Any) -> np.ndarray:
    """One image or a batch as channels-last uint8 numpy."""
    if _is_tensor(x):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        arr = x.numpy()
        arr = np.moveaxis(arr, -3, -1)  # [.., C, H, W] -> [.., H, W, C]
    else:
        arr = np.asarray(x)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"image array: expected uint8 or float pixels in [0, 1], got dtype {arr.dtype}")
        if arr.size and (np.nanmin(arr) < -1e-3 or np.nanmax(arr) > 1 + 1e-3):
            raise ValueError(f"float image array: expected pixels in [0, 1], got range "
                             f"[{np.nanmin(arr):.3f}, {np.nanmax(arr):.3f}] (scale [-1, 1] images with (x + 1) / 2)")
        arr = np.rint(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array of shape {arr.shape}: expected channels-last numpy [..., H, W, C] or "
                         "channels-first torch [..., C, H, W] with C in 1, 3, 4")
    return np.ascontiguousarray(arr)


def _encode(item: Any) -> bytes:
    """One image item as encoded bytes (paths read here; the server never opens paths)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"image {path}: no such file")
        return path.read_bytes()
    from PIL import Image

    if isinstance(item, Image.Image):
        image = item
    else:
        arr = _to_hwc_uint8(item)
        if arr.ndim != 3:
            raise ValueError(f"image of shape {arr.shape}: expected one image [H, W, C]")
        image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # lossless; fast compression: the network is local
    return buf.getvalue()


def _as_items(images: Any) -> list | np.ndarray:
    """A uint8 ``[B, H, W, C]`` array when every image is an array of one shape, else a list of items."""
    if _is_tensor(images) or isinstance(images, np.ndarray):
        dims = images.dim() if _is_tensor(images) else images.ndim
        arr = _to_hwc_uint8(images)
        return arr if dims == 4 else arr[None]
    if isinstance(images, (str, os.PathLike, bytes, bytearray)) or not isinstance(images, Sequence):
        images = [images]
    images = list(images)
    if images and all(_is_tensor(x) or isinstance(x, np.ndarray) for x in images):
        arrays = [_to_hwc_uint8(x) for x in images]
        if all(a.ndim == 3 for a in arrays) and len({a.shape for a in arrays}) == 1:
            return np.stack(arrays)
    return images


def _check_call(images: Any, prompts: str | Sequence[str] | None) -> tuple[list | np.ndarray, int, Any]:
    """Validated ``(items, n, prompts)`` of a ``score`` call (prompts: None, one string or a list of n)."""
    items = _as_items(images)
    n = len(items) if isinstance(items, list) else items.shape[0]
    if n == 0:
        raise ValueError("images: expected at least one image")
    if prompts is not None and not isinstance(prompts, str):
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(f"prompts: expected one prompt or {n} (one per image), got {len(prompts)}")
    return items, n, prompts


def _spans(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + chunk_size)) for start in range(0, n, chunk_size)]


def _chunk_prompts(prompts: Any, start: int, stop: int) -> Any:
    return prompts if prompts is None or isinstance(prompts, str) else prompts[start:stop]


def _request_parts(items: list | np.ndarray, prompts: str | list[str] | None, advantages: bool = False) -> dict:
    """``httpx`` keyword arguments (``data``, ``files``) of one multipart ``POST /v1/score``."""
    data: dict[str, Any] = {}
    if isinstance(prompts, str):
        data["prompt"] = prompts
    elif prompts is not None:
        data["prompts"] = prompts
    if advantages:
        data["advantages"] = "true"
    if isinstance(items, np.ndarray):
        data["shape"] = ",".join(str(s) for s in items.shape)
        files = [("array", ("array.u8", items.tobytes(), "application/octet-stream"))]
    else:
        files = [("images", (f"image{i}", _encode(x), "application/octet-stream")) for i, x in enumerate(items)]
    return {"data": data, "files": files}


def _without_advantages(parts: dict) -> dict:
    return {**parts, "data": {k: v for k, v in parts["data"].items() if k != "advantages"}}


def _rejects_advantages(exc: ServiceError) -> bool:
    """A service that predates ``advantages`` refuses the field as unknown (400 invalid_form)."""
    return exc.status == 400 and "advantages" in exc.message


def _error_of(response) -> ServiceError:
    try:
        err = response.json().get("error", {})
        return ServiceError(response.status_code, err.get("code", "error"), err.get("message", response.text),
                            err.get("index"))
    except Exception:
        return ServiceError(response.status_code, "error", response.text[:500])


def _retry_after(response) -> float | None:
    after = response.headers.get("retry-after")
    if after and after.replace(".", "", 1).isdigit():
        return float(after)
    return None


def _backoff(attempt: int, backoff_s: float, max_backoff_s: float) -> float:
    return min(max_backoff_s, backoff_s * 2**attempt) * (0.5 + random.random() / 2)


def _callers_error(exc: ServiceError, start: int, stop: int) -> ServiceError:
    """The service numbers images within the request; name the caller's index instead."""
    if exc.index is None or start == 0:
        return exc
    return ServiceError(exc.status, exc.code, f"image {start + exc.index} (request of images "
                        f"{start}..{stop - 1}): {exc.message}", start + exc.index)


def _join(results: list[dict], prompts: Any, advantages: bool) -> ScoreResult:
    """The responses of a call's requests (in input order) -> one :class:`ScoreResult`."""
    first = results[0]
    columns = list(first["scores"])
    for r in results[1:]:
        if list(r["scores"]) != columns or r["main"] != first["main"]:
            raise RuntimeError(f"the services answered with different models: columns {columns} (main "
                               f"{first['main']}) and {list(r['scores'])} (main {r['main']}); serve one model")
    scores = {k: [v for r in results for v in r["scores"][k]] for k in columns}

    def reward_of(r: dict) -> dict:
        reward = r.get("reward")
        return reward if isinstance(reward, dict) else {"name": r["main"], "values": r["scores"][r["main"]]}

    rewards = [reward_of(r) for r in results]
    names = list(dict.fromkeys(str(w["name"]) for w in rewards))
    if len(names) > 1:
        raise RuntimeError(f"the services return different rewards ({', '.join(names)}); start them with one --reward")
    values = [v for w in rewards for v in w["values"]]
    served = [w.get("advantages") for w in rewards]
    adv = None
    if advantages or all(a is not None for a in served):  # asked for, or sent by default (serve --advantages)
        # The service normalises within one request: over several, the groups are the whole call's.
        adv = served[0] if len(results) == 1 and served[0] is not None else group_advantages(values, prompts).astype(np.float32)
    # A ranking across requests would mix groups normalised separately: only one request's is kept.
    ranking = first.get("ranking") if len(results) == 1 else None
    return ScoreResult(scores, first["main"], bool(first.get("untrained")), ranking,
                       [r.get("timing_ms", {}) for r in results], values, names[0], adv)


def _reward_fn_output(result: ScoreResult, column: str | None, shape: str, advantages: bool, prompts: Any):
    """What ``reward_fn`` returns for ``shape`` (see :meth:`RewardClient.reward_fn`)."""
    if column is None:
        name, values, adv = result.reward_name, result.reward, result.advantages
    else:
        name, values, adv = column, result[column], None
    if advantages and adv is None:
        adv = group_advantages(values, prompts).astype(np.float32)
    if shape == "flow_grpo":
        details: dict[str, list[float]] = {k: result[k].tolist() for k in result.columns}
        if advantages:
            details["reward"] = values.tolist()
        details["avg"] = (adv if advantages else values).tolist()
        return details, {}
    info = {k: result[k] for k in result.columns if k != name}
    if advantages:
        info[name] = values
        return adv, info
    return values, info


def _check_reward_fn_args(shape: str) -> None:
    if shape not in REWARD_FN_SHAPES:
        raise ValueError(f"shape: expected one of {', '.join(REWARD_FN_SHAPES)}, got {shape!r}")


def _auth_headers(token: str | None) -> dict[str, str]:
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


# ------------------------------------------------------------------------------------------------ sync client
