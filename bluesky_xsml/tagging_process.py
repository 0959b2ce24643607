"""The tagging process's entry point: ``python -m bluesky_xsml.tagging_process FD``.

:class:`~bluesky_xsml.inference.process.ProcessInferenceWorker` starts a fresh
interpreter on this module with one end of a private pipe (file descriptor
``FD``). It runs the loop of :mod:`bluesky_xsml.inference.child` and gives it
what that loop must not import itself (inference sits below documents and
training, ``docs/decisions/0004-layers.md``): the external-file reader of a
run (:class:`~bluesky_xsml.documents.external.ExternalFrames`) and the live
fine-tuner (:class:`~bluesky_xsml.training.live.LiveFineTuner`).

``kill -USR1 PID`` makes the process print every thread's stack.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys

from .documents.external import ExternalFrames
from .inference.child import run_from_fd

__all__ = ["main", "make_finetuner"]


def make_finetuner(tagger, directory, **options):
    """The live fine-tuner of the process's tagger (``LiveFineTuner(tagger, directory, ...)``)."""
    # imported on first use: training loads torch, numba and zarr, which a process that never
    # fine-tunes should not pay for (the one intra-package import not at the top)
    from .training.live import LiveFineTuner

    return LiveFineTuner(tagger, directory, **options)


def main(argv: list[str] | None = None) -> None:
    """Run the tagging process on the pipe whose descriptor is ``argv[0]``."""
    argv = sys.argv[1:] if argv is None else argv
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    logging.basicConfig(level=logging.WARNING,
                        format="xsml tagging process %(process)d: %(levelname)s %(message)s")
    run_from_fd(int(argv[0]), make_reader=ExternalFrames, make_finetuner=make_finetuner)


if __name__ == "__main__":
    main()
