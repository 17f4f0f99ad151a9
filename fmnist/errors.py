"""The exceptions of this project, in one module every other can import without pulling in torch or mlflow.

UserError and its kinds are errors a user can fix: each message names the option, file or URI and what was
expected; the command line prints it on one line and exits with status 2."""
from __future__ import annotations

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input or an unusable environment: reported in one line, exit status 2, never a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message names the option and what was expected."""


class DataError(UserError):
    """The dataset is missing or malformed; the message names the file and what is wrong."""


class WeightsError(UserError):
    """Pretrained weights are not available; the message names the backbone and how to get them."""


class InputError(UserError, ValueError):
    """Images of the wrong shape, dtype or format; the message names the input and what was expected."""


class SearchError(UserError):
    """A search cannot go on (no trial completed, a study that cannot be resumed); the message says why."""


class TrackingError(UserError):
    """The tracking store cannot take the run (unreachable server, unwritable artifacts); the message says where
    what the run produced was kept, if anything."""


class Diverged(UserError):
    """The training loss became NaN or infinite: the run ends FAILED and nothing is registered."""


class Pruned(Exception):
    """Raised by an epoch callback to end training on purpose (a search pruned the trial): not an error."""


class GivenUp(Exception):
    """Raised by an epoch callback when another worker has failed this search trial (this one sent no heartbeat
    for the grace period: suspended, stopped or stalled) and queued its retry: training it further is wasted."""


def one_line(error: BaseException) -> str:
    """The message on one line, as the command line and the scripts print it."""
    return " ".join(str(error).split())


@contextmanager
def reported(program: str):
    """For a script: a UserError inside ends it with `program: error: <one line>` and exit status 2, Ctrl-C with
    `program: interrupted` and 130, as the command line does; neither prints a traceback."""
    try:
        yield
    except UserError as e:
        print(f"{program}: error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
