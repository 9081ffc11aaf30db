"""Where fastai's training output goes: progress bars and the epoch table on stderr (stdout carries a
command's results, e.g. its --json), or nowhere when quiet."""
from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator


def skip_validation():  # -> fastai Callback
    """A callback that skips every epoch's validation pass (for a learner with no validation set):
    no empty validation bar, and with the Recorder's ``valid_metrics`` off no ``valid_loss`` column."""
    from fastai.callback.core import Callback, CancelValidException

    class SkipValidation(Callback):
        order = 0  # after TrainEvalCallback (-10), before the Recorder (50) and the progress bars (60)

        def before_validate(self):
            raise CancelValidException()

    return SkipValidation()


@contextlib.contextmanager
def without_empty_validation(learn) -> Iterator[None]:  # noqa: ANN001
    """With no validation set, leave the validation pass and its ``valid_loss`` column out of the fit."""
    if len(learn.dls.valid) > 0:
        yield
        return
    recorder, before = learn.recorder, learn.recorder.valid_metrics
    recorder.valid_metrics = False
    try:
        with learn.added_cbs(skip_validation()):
            yield
    finally:
        recorder.valid_metrics = before


@contextlib.contextmanager
def training_output(learn, progress: bool) -> Iterator[None]:  # noqa: ANN001
    """Run a fastai ``learn.fit*`` inside this: with ``progress`` its bars and table go to stderr,
    without it nothing is shown. Without a validation set (training on every rating) there is no
    validation pass: no ``valid_loss`` column, no empty validation bar, no fastprogress warning."""
    with warnings.catch_warnings(), without_empty_validation(learn):
        warnings.filterwarnings("ignore", message="Your generator is empty")
        if progress:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        else:
            with learn.no_bar(), learn.no_logging():
                yield
