"""The periodic sweep that deletes files past their ``expires_at`` (``expires_after`` on
upload), so that an expired file nobody reads again does not stay in storage. A read deletes
an expired file at once (``service.files.store.get_file``); this catches the rest."""

from __future__ import annotations

import logging
import threading

from service.core.storage import Storage
from service.files.store import sweep_expired

log = logging.getLogger(__name__)

SWEEP_S = 60.0
"""Between sweeps; each lists only the markers of files already due."""


class ExpirySweeper:
    def __init__(self, storage: Storage, interval_s: float = SWEEP_S):
        self.storage = storage
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="file-expiry", daemon=True)

    def start(self) -> ExpirySweeper:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                deleted = sweep_expired(self.storage)
                if deleted:
                    log.info("deleted %d expired files: %s", len(deleted), ", ".join(deleted))
            except Exception:  # the loop must outlive a storage hiccup
                log.exception("file expiry sweep failed")
