"""VitcliError -> one ``Error: ...`` line on stderr and a stable exit code (1 job, 2 usage).

Set VITCLI_DEBUG=1 to get the full traceback instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import typer

from vitcli.cli.render import escape

DEBUG_ENV = "VITCLI_DEBUG"


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``Error: message`` to stderr and return the Exit to raise.

    Under torchrun, ranks other than 0 keep their progress quiet but still print their errors,
    prefixed with the rank, so a failure on rank 1 alone says why.
    """
    from vitcli.console import err
    from vitcli.distributed import torchrun_rank

    rank = torchrun_rank().rank
    where = f"rank {rank}: " if rank else ""
    quiet, err.quiet = err.quiet, False
    try:
        err.print(f"[bold red]Error:[/] {where}{message}", highlight=False, markup=True)
    finally:
        err.quiet = quiet
    return typer.Exit(code)


def _stdout_closed() -> typer.Exit:
    """The reader of our stdout went away (``vitcli predict --json | head``): stop quietly, as Unix tools
    do (exit 141 = 128 + SIGPIPE), and keep Python's exit-time flush from complaining about the pipe."""
    import sys

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return typer.Exit(141)


@contextlib.contextmanager
def handled_errors() -> Iterator[None]:
    """Wrap a command body: typed errors become one line; Ctrl-C exits 130; bugs say how to debug."""
    import warnings

    from vitcli.errors import VitcliError, VitcliNote

    show = warnings.showwarning

    def show_notes(message, category, *args, **kwargs) -> None:  # warnings.showwarning's signature
        if issubclass(category, VitcliNote):
            from vitcli.console import err

            err.print(f"[bold]Note:[/] {escape(message)}", highlight=False)
        else:
            show(message, category, *args, **kwargs)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", VitcliNote)
            warnings.showwarning = show_notes
            yield
    except typer.Exit:
        raise
    except VitcliError as e:
        if debug():
            raise
        raise fail(escape(str(e)), e.exit_code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    except BrokenPipeError:
        raise _stdout_closed() from None
    except OSError as e:  # a full disk, a read-only folder, a file we may not write: the machine's problem
        import errno

        if debug():
            raise
        if not (e.filename or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)):
            raise _internal(e) from None
        from vitcli.io.fileio import describe_os_error

        raise fail(escape(describe_os_error(e)), 1) from None
    except Exception as e:
        if debug():
            raise
        raise _internal(e) from None


def _internal(e: BaseException) -> typer.Exit:
    return fail(f"{escape(f'{type(e).__name__}: {e}'.splitlines()[0])} (an internal error; "
                f"rerun with {DEBUG_ENV}=1 for the traceback and report it)", 1)
