"""OpenAPI descriptions of the service's bodies (documentation only: requests are parsed by hand in
``inputs.py`` because one endpoint takes JSON and multipart alike)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Ranking(BaseModel):
    score: str = Field(description="the score the order follows: ict_hp_group (ict * softmax(hp_logit) over the "
                                   "request's images) or the model's main score")
    values: list[float]
    order: list[int] = Field(description="image indices, best first")


class Reward(BaseModel):
    name: str = Field(description="what the server was told to return (icthp serve --reward): a score column or a "
                                  "weighted sum, e.g. 'ict_hp' or 'ict_hp + 0.5*pickscore'")
    values: list[float] = Field(description="the reward of each image, in request order")
    advantages: list[float] | None = Field(description="when asked for (request field advantages, or icthp serve "
                                                       "--advantages): per prompt within the request, (r - mean) / "
                                                       "(std + 1e-4), population std")


class ScoreResponse(BaseModel):
    n: int = Field(description="number of images scored")
    model: str
    main: str = Field(description="name of the main score column (e.g. ict_hp)")
    untrained: bool = Field(description="true for random preset weights, whose scores mean nothing")
    scores: dict[str, list[float]] = Field(description="one list per score column (ict, hp, hp_logit, ict_hp, and "
                                                       "each served baseline's, e.g. pickscore), in request order")
    ranking: Ranking | None = Field(description="present when all images share one prompt")
    reward: Reward
    timing_ms: dict[str, float]


class HealthResponse(BaseModel):
    status: str = Field(description="ready | loading | failed")
    version: str
    uptime_s: float
    error: str | None = None


class ModelsResponse(BaseModel):
    model: str
    columns: list[str]
    main: str
    needs_prompt: bool
    untrained: bool
    device: str
    dtype: str
    image_size: int
    tokenization: str | None = Field(None, description="how prompts become token ids: open_clip (the released "
                                     "evaluation's text cleaning) or transformers; null: the model reads no prompt")
    reward: dict = Field(description="the reward returned to RL trainers: name, terms [[column, weight]], whether "
                                     "advantages are returned by default, and their rule")
    components: list[dict]
    baselines: list[dict] = Field(default_factory=list, description="baselines served beside the model")
    limits: dict[str, int | float]
    version: str


_PROMPTS = {
    "prompt": {"type": "string", "description": "one prompt for every image"},
    "prompts": {"type": "array", "items": {"type": "string"}, "description": "one prompt per image"},
    "advantages": {"type": "boolean", "description": "also return per-prompt advantages of the reward (default: "
                                                     "the service's --advantages)"},
}

SCORE_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                               "description": "encoded images (PNG, JPEG, WebP, GIF, BMP, TIFF)"},
                    "array": {"type": "string", "format": "binary",
                              "description": "raw uint8 pixels, B*H*W*C bytes, row-major (instead of images)"},
                    "shape": {"type": "string", "description": "shape of 'array' as 'B,H,W,C' (C = 1, 3 or 4)",
                              "example": "4,512,512,3"},
                    **_PROMPTS,
                },
            },
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "byte"},
                               "description": "base64-encoded images (data URLs accepted)"},
                    "array": {"type": "object", "properties": {
                        "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4},
                        "dtype": {"type": "string", "enum": ["uint8"]},
                        "data": {"type": "string", "format": "byte"}}, "required": ["shape", "data"]},
                    **_PROMPTS,
                },
            },
            "example": {"prompt": "a tiny dragon taking a bath in a teacup", "images": ["<base64 PNG>"]},
        },
    },
}
