"""Command line: ``icthp score | bench | metrics | finetune | convert | models | preset | train | serve | data``. A thin shell over the library.

One module per command (``weights`` holds the three small checkpoint commands: ``convert``, ``models``,
``preset``; ``data`` the ``icthp data`` sub-commands); what they share (consoles, device and dtype defaults,
logging, progress) is in :mod:`._common`. This module builds the typer app from them and maps exceptions to
exit codes in :func:`main`. Heavy imports (torch, transformers) happen inside commands so ``icthp --help``
stays fast.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import typer
from rich.markup import escape

from . import _common as ui
from . import bench, data, finetune, metrics, score, serve, train, weights

app = typer.Typer(
    name="icthp",
    help="ICT and HP reward models for text-to-image generation (arXiv 2507.19002): score, benchmark, train, fine-tune diffusion models, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        from .. import __version__

        ui.out.print(f"icthp {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """ICT and HP reward models for text-to-image generation (arXiv 2507.19002)."""


# train and finetune take free ``key=value`` config overrides after their options.
_OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}

# The order here is the order of `icthp --help`.
app.command()(score.score)
app.command()(weights.convert)
app.command()(weights.models)
app.command()(weights.preset)
app.command(context_settings=_OVERRIDES)(train.train)
app.command()(bench.bench)
app.command(context_settings=_OVERRIDES)(finetune.finetune)
app.command()(metrics.metrics)
app.command()(serve.serve)
app.add_typer(data.data_app, name="data")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``icthp`` console script; returns the exit code.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        icthp 0.1.0
        0
    """
    # Recent typer vendors click (typer._click); take the exception classes from wherever typer's come from.
    click_exceptions = sys.modules[typer.BadParameter.__module__]

    from ..errors import CheckpointError, ImageLoadError, InputError, TokenizerNotFoundError

    try:
        args = list(sys.argv[1:] if argv is None else argv)
        from ..registry import COMMANDS, command_context

        # Offline errors name the flag of the command being run, not every command's.
        context = command_context(args[0]) if args and args[0] in COMMANDS else contextlib.nullcontext()
        with context:
            code = app(args=args, prog_name="icthp", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except click_exceptions.ClickException as exc:
        exc.show()
        return exc.exit_code
    except typer.Abort:
        ui.err.print("aborted")
        return 130
    except KeyboardInterrupt:
        ui.err.print("interrupted; rerun with --resume to continue")
        return 130
    except (InputError, CheckpointError, ImageLoadError, TokenizerNotFoundError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        ui.err.print(f"[red]error:[/] {escape(str(msg))}", markup=True, highlight=False)
        return 2
    except RuntimeError as exc:  # JobError and friends: the message says what happened and what to do
        ui.err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        return 1
    return int(code or 0)


__all__ = ["app", "main"]
