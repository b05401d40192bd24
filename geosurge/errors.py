"""Errors that the command-line tools report as one clear line (exit code 2), never as a traceback."""


class GeosurgeError(Exception):
    """A user-facing error: bad input file, bad argument, mismatched bundle..."""


class InputFileError(GeosurgeError):
    """A file a user handed us is missing or malformed; the message names the file (and row)."""


def run_command(parser, argv, prog: str) -> int:
    """Parse, dispatch to ``args.func`` and turn a GeosurgeError into one line on stderr with exit code 2, Ctrl-C
    into "interrupted" (130), and a closed output pipe into a quiet stop (141, as SIGPIPE) (shared by the
    ``geosurge`` and ``geosurge-run`` command lines)."""
    import sys

    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except GeosurgeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as a Unix tool does
        import os

        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        except OSError:
            pass
        return 141
