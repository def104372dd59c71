"""Stop training cleanly on SIGINT (Ctrl-C) and SIGTERM (what Slurm sends before preemption).

The first signal sets `trainer.stop_signal`, so the trainer stops at the next step boundary and
the caller can save the training state and exit. A second signal raises TrainingAborted at once.
Every file is written atomically, so the last complete checkpoint stays on disk.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dml_cli.engine import DMLTrainer

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingAborted(BaseException):
    """A second stop signal arrived, so training stopped at once without saving.

    It derives from BaseException, like KeyboardInterrupt, so that no `except Exception` on the
    way up swallows it.
    """

    def __init__(self, signal_number: int):
        super().__init__(f"training aborted by a second {signal_name(signal_number)}")
        self.signal_number = signal_number


def signal_name(signal_number: int) -> str:
    try:
        return signal.Signals(signal_number).name
    except ValueError:
        return f"signal {signal_number}"


def exit_code(signal_number: int) -> int:
    """Return the shell's exit status for a process ended by `signal_number` (130 for SIGINT)."""
    return 128 + signal_number


@contextmanager
def stop_on_signals(trainer: DMLTrainer) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `trainer.stop_signal` inside the block; restore them after.

    Python runs signal handlers in the main thread only, so in any other thread the block runs
    with the handlers unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        log.debug("Not in the main thread: SIGINT and SIGTERM keep their handlers.")
        yield
        return

    def handle(signal_number: int, frame: object) -> None:
        name = signal_name(signal_number)
        if trainer.stop_signal is None:
            trainer.stop_signal = signal_number
            again = "Press Ctrl-C" if signal_number == signal.SIGINT else f"Send {name}"
            log.warning(
                f"Received {name}: stopping after the current step to save the training state. "
                f"{again} again to stop at once."
            )
            return
        raise TrainingAborted(signal_number)

    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    for number in STOP_SIGNALS:
        signal.signal(number, handle)
    try:
        yield
    finally:
        for number, handler in previous.items():
            # getsignal returns None for a handler installed outside Python.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
