"""The dispatcher's playbook hot reload: a mixin of :class:`services.dispatcher.app.Dispatcher`
(moved out of ``app.py``). The running dispatcher polls its playbook files' mtimes every
``PLAYBOOK_RELOAD_INTERVAL`` seconds (at a tick) and loads them when one changed; an invalid
book, or one that needs a vendor route the running adapters were not built with, is logged
(``playbooks rejected``) and the running book kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from segflow.errors import ConfigError
from services.dispatcher.playbooks import Book, PlaybookError, load_book
from services.dispatcher.settings import DispatcherSettings
from services.dispatcher.vendors import check_routes, with_local_stand_ins

log = logging.getLogger("segflow.dispatcher")


class Reloading:
    """Playbook reload methods of :class:`~services.dispatcher.app.Dispatcher`."""

    if TYPE_CHECKING:  # provided by Dispatcher
        cfg: DispatcherSettings
        book: Book
        _dirty: bool
        _playbook_stamp: tuple[tuple[str, int], ...]

    def _stamp_playbooks(self) -> tuple[tuple[str, int], ...]:
        """The playbook files (``cfg.playbooks``: files or folders) and their mtimes."""
        stamp: list[tuple[str, int]] = []
        for part in filter(None, self.cfg.playbooks.split(",")):
            path = Path(part)
            for f in sorted(path.glob("*.yaml")) if path.is_dir() else [path]:
                try:
                    stamp.append((str(f), f.stat().st_mtime_ns))
                except OSError:
                    stamp.append((str(f), -1))
        return tuple(stamp)

    def reload_playbooks(self) -> bool:
        """Load the playbook files if one changed; keep the running book when the new one is
        invalid or needs a route the running adapters do not have (a restart picks that up)."""
        stamp = self._stamp_playbooks()
        if stamp == self._playbook_stamp:
            return False
        self._playbook_stamp = stamp
        try:
            book = load_book(Path(p) for p in self.cfg.playbooks.split(",") if p)
            check_routes(with_local_stand_ins(self.cfg, self.cfg, self.book), book)
        except (PlaybookError, ConfigError, OSError) as exc:
            log.error(
                "playbooks rejected",
                extra={
                    "fields": {
                        "error": str(exc),
                        "running": {p.name: str(p.version) for p in self.book.playbooks},
                    }
                },
            )
            return False
        if book == self.book:
            return False
        log.info(
            "playbooks loaded",
            extra={"fields": {"playbooks": {p.name: str(p.version) for p in book.playbooks}}},
        )
        self.book = book
        self._dirty = True
        return True
