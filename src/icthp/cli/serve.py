"""``icthp serve``: the reward over HTTP; the service is :mod:`icthp.serve`."""

from __future__ import annotations

from typing import Annotated

import typer

from . import _common as ui


def serve(
    model: Annotated[ui.ModelName, typer.Option(help="Which reward to serve.")] = ui.ModelName.ict_hp,
    ict: ui.IctWeights = None,
    hp: ui.HpWeights = None,
    baseline: Annotated[list[str] | None, typer.Option("--baseline", "-b", help="Also serve a baseline, repeatable: pickscore, clip, hpsv2.1, imagereward, aesthetic, ... optionally name=DIR.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback requires a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    token: Annotated[str | None, typer.Option(envvar="ICTHP_SERVE_TOKEN", show_envvar=True,
                                              help="Bearer token required on /v1/* and /metrics.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (bf16 on CUDA).")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Most images per model forward (requests are packed).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests to join.")] = 5.0,
    max_images: Annotated[int, typer.Option(help="Most images per request.")] = 64,
    max_image_pixels: Annotated[int, typer.Option(help="Largest width*height per image (checked before decoding).")] = 4096 * 4096,
    max_request_mb: Annotated[float, typer.Option(help="Largest request body, in MiB.")] = 64.0,
    max_prompt_chars: Annotated[int, typer.Option(help="Longest prompt, in characters.")] = 2000,
    max_queue_images: Annotated[int, typer.Option(help="Images waiting before new requests get 503.")] = 1024,
    max_connections: Annotated[int, typer.Option(help="Open connections beyond which new requests get 503.")] = 512,
    header_timeout: Annotated[float, typer.Option(help="Seconds a connection has to send a whole request head.")] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds a request has to send its whole body (408 after).")] = 60.0,
    keep_alive: Annotated[float, typer.Option(help="Seconds an idle keep-alive connection is kept.")] = 5.0,
    compile_towers: Annotated[bool, typer.Option("--compile", help="torch.compile the image towers.")] = False,
    reward: Annotated[str | None, typer.Option(help="The reward RL trainers receive: a score column or a weighted sum, e.g. ict_hp or 'ict_hp:1,pickscore:0.5' (default: the model's main score).")] = None,
    advantages: Annotated[bool, typer.Option(help="Return per-prompt normalised rewards (GRPO advantages) by default; requests can ask either way.")] = False,
    pickle_path: Annotated[str, typer.Option(help="Where the pickle protocol of ddpo / flow_grpo / reward-server clients is answered (POST); 'off' to disable.")] = "/",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> int:
    """Serve the reward over HTTP (POST /v1/score, GET /v1/models, /health, /metrics, a web page at /), and to RL
    trainers in their pickle protocol (POST /, as ddpo / flow_grpo remote rewards post).

    Example: icthp serve --ict tiny-random --hp tiny-random --port 8000   (then open http://127.0.0.1:8000/)
    """
    try:
        from ..serve import ServeConfig
        from ..serve.app import run
    except ImportError as exc:
        ui.err.print(f"[red]error:[/] icthp serve needs the serve extra: pip install \"icthp[serve]\" ({exc})")
        return 2
    cfg = ServeConfig(model=model.value, ict=ict, hp=hp, baselines=list(baseline or []), device=device, dtype=dtype, host=host, port=port,
                      token=token or None, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                      max_images_per_request=max_images, max_image_pixels=max_image_pixels,
                      max_request_bytes=int(max_request_mb * 1024 * 1024), max_prompt_chars=max_prompt_chars,
                      max_queue_images=max_queue_images, max_connections=max_connections,
                      header_timeout_s=header_timeout, body_timeout_s=body_timeout, keep_alive_s=keep_alive,
                      compile=compile_towers, reward=reward, advantages=advantages,
                      pickle_path=None if pickle_path.lower() in ("off", "none", "") else pickle_path)
    try:
        cfg.validate()
    except ValueError as exc:
        ui.err.print(f"[red]error:[/] {exc}")
        return 2
    ui.setup_logging(True)
    ui.err.print(f"icthp serve: http://{host}:{port}/  ({model.value}; auth {'on' if cfg.token else 'off'})",
                 highlight=False)
    run(cfg, log_level=log_level)
    return 0
