"""``recsys run``'s warm-up: a daemon thread that runs a few start-up steps (the Spark session, MLflow's store)
one after the other while earlier stages run, so the stage that needs one finds it ready. Which steps a run
warms up is the stage list's business (``stages.warm_up``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

WARM_UP_WAIT_S = 60  # how long a run that failed waits for its warm-up (a remote MLflow server may not answer)


class WarmUp(threading.Thread):
    """``stages.warm_up``'s thread: its steps one after the other, each given the settings, until ``finish``."""

    def __init__(self, steps: list[Callable], settings):
        super().__init__(name="warm-up", daemon=True)
        self.steps, self.settings, self.cancelled = steps, settings, threading.Event()

    def run(self) -> None:
        for step in self.steps:
            if self.cancelled.is_set():  # the run has ended (a stage failed): nothing left to warm up for
                return
            try:
                step(self.settings)
            except Exception:  # noqa: BLE001  (raised again, with its traceback, by the stage that needs it)
                log.debug("warm-up: %s failed; the stage that needs it will retry", step.__name__, exc_info=True)

    def finish(self, timeout: float) -> None:
        """No further step; wait up to ``timeout`` seconds for the one under way."""
        self.cancelled.set()
        self.join(timeout)

