"""User errors on the command line: one short message naming the thing, what is wrong and what to do; exit 2.

The library raises typed exceptions (FileNotFoundError, RecipeError, HandoffError, DatasetFormatError,
OutputDirError, PreflightError, ...) so Python callers can catch them; only the console script turns the
ones a user causes into `aac-lightning <command>: error: ...` and exit status 2. `--traceback` or
`AAC_LIGHTNING_TRACEBACK=1` shows the full traceback instead. jsonargparse wraps errors raised while a
config's classes are built ("Does not validate against any of the Union subtypes"): the root cause is dug
out of the exception chain.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

TRACEBACK_ENV = "AAC_LIGHTNING_TRACEBACK"
TRACEBACK_FLAG = "--traceback"
USER_ERROR_EXIT = 2
# set on exceptions raised while LightningCLI parses a config and builds its classes (lightning_cli.py)
SETUP_MARK = "aac_lightning_setup"


def traceback_requested(args: list[str]) -> tuple[bool, list[str]]:
    """`(asked, args without --traceback)`: the flag (before any `--`) or `AAC_LIGHTNING_TRACEBACK=1`."""
    end = args.index("--") if "--" in args else len(args)
    asked = TRACEBACK_FLAG in args[:end]
    rest = [a for i, a in enumerate(args) if not (i < end and a == TRACEBACK_FLAG)]
    env = os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return asked or env, rest


def _strict_types() -> tuple[type[BaseException], ...]:
    """Exceptions a user causes wherever they are raised (missing or malformed inputs)."""
    from aac_lightning.checkpoints import HandoffError
    from aac_lightning.data.audio import AudioError
    from aac_lightning.data.datasets import DatasetFormatError
    from aac_lightning.pipeline.recipe import RecipeError
    from aac_lightning.utils.preflight import OutputDirError, PreflightError

    return (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, PreflightError, OutputDirError, RecipeError, HandoffError, DatasetFormatError, AudioError)


# raised while a config is parsed and its classes built, these are bad option values or missing inputs
_SETUP_TYPES: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, ImportError, KeyError)


def _is_wrapper(err: BaseException) -> bool:
    return "Does not validate against any of the Union subtypes" in str(err) or type(err).__module__.startswith("jsonargparse")


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and err not in out and len(out) < 20:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def user_error(err: BaseException) -> BaseException | None:
    """The exception to report in one line (the root cause of a jsonargparse wrapper), or None: a bug."""
    chain = _chain(err)
    setup = any(getattr(e, SETUP_MARK, False) for e in chain)
    strict = _strict_types()
    for candidate in chain:
        if _is_wrapper(candidate):
            continue
        if isinstance(candidate, strict) or (setup and isinstance(candidate, _SETUP_TYPES)):
            return candidate
        if not setup:
            return None
    if setup and chain and all(_is_wrapper(e) for e in chain):
        return chain[0]  # the cause is only in the wrapper's text: format_user_error digs it out
    return None


def _hint(err: BaseException, text: str) -> str:
    """What to do, for the errors whose message does not say it already."""
    from aac_lightning.nn.presence import audio_weights_help

    match = re.match(r"checkpoint file not found: (.+)$", text)
    if match:  # official PANNs / AST weights (nn.audio_encoders.base.load_checkpoint_file)
        return audio_weights_help(match.group(1))
    match = re.search(r"text encoder '([^']+)' from '([^']+)'", text)
    if match:
        hub_id = match.group(2)
        return (
            f"without network access, download it beforehand where the hub is reachable: `huggingface-cli download {hub_id}` "
            "and copy the Hugging Face cache ($HF_HOME) here, or point model.init_args.text_encoder at a local folder"
        )
    if text.startswith("checkpoint not found:"):
        return "a handoff checkpoint is made by an earlier stage (e.g. the pre-training stage for init_from / extractor_ckpt): run that stage first, or check the path; add --check to list every input"
    return ""


def format_user_error(err: BaseException) -> str:
    """`<what is wrong> [-- what to do]` on as few lines as the error needs (a PreflightError's table)."""
    from aac_lightning.utils.preflight import PreflightError

    if isinstance(err, PreflightError):
        return str(err)
    text = str(err).strip() or type(err).__name__
    if _is_wrapper(err):  # "Does not validate ... Errors:\n  - <cause>\n  - Expected a <class 'NoneType'>"
        causes = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ") and "NoneType" not in line]
        text = causes[0] if causes else text.splitlines()[0]
    if isinstance(err, KeyError) and err.args:
        text = f"unknown key {err.args[0]!r}"
    hint = _hint(err, text)
    return f"{text}\n  -> {hint}" if hint else text


def run_reporting_errors(prog: str, function: Callable[[], T], show_traceback: bool) -> T:
    """Run `function` and return its result; a user error becomes `prog: error: message` on stderr and exit status 2."""
    try:
        return function()
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:
        cause = user_error(err)
        if cause is None or show_traceback:
            raise
        print(f"{prog}: error: {format_user_error(cause)}", file=sys.stderr)
        print(f"(add {TRACEBACK_FLAG} or set {TRACEBACK_ENV}=1 for the full traceback)", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
