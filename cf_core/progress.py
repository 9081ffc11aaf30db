"""Where fastai's training output goes: progress bars and the epoch table on stderr (stdout carries a
command's results, e.g. its --json), or nowhere when quiet."""
from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def training_output(learn, progress: bool) -> Iterator[None]:  # noqa: ANN001
    """Run a fastai ``learn.fit*`` inside this: with ``progress`` its bars and table go to stderr,
    without it nothing is shown. fastprogress's warning about an empty validation set (training on
    every rating) is not shown either way."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your generator is empty")
        if progress:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        else:
            with learn.no_bar(), learn.no_logging():
                yield
