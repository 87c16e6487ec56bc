"""The ``sb3-rlhf`` command: one module per sub-command, each with its ``add_parser(subparsers)`` and the
function it runs (``set_defaults(func=...)``); the options several share are in :mod:`sb3_rlhf.cli.common`."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import pickle
import sys
import warnings
from collections.abc import Sequence

from sb3_rlhf.cli import demo, dpo, evaluate, generate, reward_model, sft, tasks, train
from sb3_rlhf.cli.common import launch_processes
from sb3_rlhf.common.memory import DeviceMemoryError
from sb3_rlhf.common.progress import LIBRARY_LOGGER, show_progress_lines

#: the sub-commands, in the order ``sb3-rlhf --help`` lists them
COMMANDS = (demo, tasks, reward_model, sft, dpo, train, evaluate, generate)

#: errors that come from what the user gave (or a run that stopped for a reason it names, such as a device out of
#: memory with the setting to lower), printed without a traceback
USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FloatingPointError,
    ImportError,
    pickle.UnpicklingError,
    DeviceMemoryError,
)


#: what a file system error says, and the fix: a full disk, a read-only one, a path without permission
FILE_SYSTEM_ERRORS = {
    errno.ENOSPC: "no space left on the device: free some, or write elsewhere (--out; HF_HOME for the model cache)",
    errno.EDQUOT: "the disk quota is used up: free some space, or write elsewhere (--out)",
    errno.EROFS: "the file system is read-only: write elsewhere (--out)",
    errno.EACCES: "permission denied: choose a path you may use (--out), or change its permissions",
    errno.EPERM: "permission denied: choose a path you may use (--out), or change its permissions",
    errno.EFBIG: "a file outgrew the size this process may write (ulimit -f): raise the limit, or write elsewhere",
}
#: how those read where a library reports them without an errno (safetensors, torch.save)
FILE_SYSTEM_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "os error 28": errno.ENOSPC,
    "File too large": errno.EFBIG,
    "os error 27": errno.EFBIG,
}
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_parser() -> argparse.ArgumentParser:
    """The ``sb3-rlhf`` parser with every sub-command; ``args.func(args)`` runs the one parsed."""
    parser = argparse.ArgumentParser(prog="sb3-rlhf", description="RLHF for language models with Stable-Baselines3")
    parser.add_argument("--traceback", action="store_true", help="on an error, show the whole Python traceback")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no stage announcements or progress lines on standard error (warnings and errors still print)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the sub-command.

    :return: the exit status: 0, 2 for an error in what the user gave (printed in one line unless ``--traceback``),
        or torchrun's status for ``train --nproc N``.
    """
    args = make_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "nproc", 1) > 1 and not args.dry_run and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        try:
            return launch_processes(args.nproc, args.argv)
        except KeyboardInterrupt:  # each rank has said where its run stands
            return 130
    show_warning = warnings.showwarning

    def one_line_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if filename.startswith(PACKAGE_DIR):  # ours: a sentence meant for the user, not a code location
            print(f"sb3-rlhf {args.command}: warning: {message}", file=sys.stderr)
        else:
            show_warning(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line_warning
    # each stage announces itself and, off a terminal, training prints a line per rollout (sb3_rlhf.progress);
    # under torchrun, rank 0 speaks for every rank
    show_progress_lines()
    quiet = args.quiet or os.environ.get("RANK", "0").strip() not in ("", "0")
    LIBRARY_LOGGER.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        args.func(args)
    except KeyboardInterrupt:
        # one line, not a traceback through torch; train says where its checkpoints are
        print(f"sb3-rlhf {args.command}: interrupted{getattr(args, 'on_interrupt', '')}", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if args.traceback:
            raise
        # bad input, a missing file, a run that cannot go on: the message names the fix; a traceback adds nothing
        print(f"sb3-rlhf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a file system error, from our code or a library's: one line if it is a known one
        code = getattr(error, "errno", None)
        code = next((c for text, c in FILE_SYSTEM_TEXTS.items() if text in str(error)), code)
        if code not in FILE_SYSTEM_ERRORS or args.traceback:
            raise
        filename = getattr(error, "filename", None)
        where = f"{filename}: " if filename else ""
        print(f"sb3-rlhf {args.command}: error: {where}{FILE_SYSTEM_ERRORS[code]}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = show_warning
    return 0


__all__ = ["USER_ERRORS", "main", "make_parser"]
