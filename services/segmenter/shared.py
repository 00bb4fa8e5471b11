"""Definitions, lookup tables and percentile tables, as functions of the running
:class:`~services.segmenter.app.Segmenter`: definition reloads and the lookup tables (read
whole from ``segflow.lookups``), which every instance shares, and each partition's ``pNN``
table on its event-time grid (:mod:`services.segmenter.population`). Split out of ``app.py``
(issue #14); the segmenter's methods of the same names call these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segflow.errors import BrokerError
from segflow.runtime.loop import Output
from segflow.runtime.tables import GlobalTable
from segflow.runtime.topics import TOPICS
from services.segmenter import core
from services.segmenter.dsl import DefinitionError, Definitions, parse
from services.segmenter.metrics import DEFINITIONS, LOOKUP_LOADS
from services.segmenter.population import Table, crossed, grid_floor, percentile_thresholds
from services.segmenter.quantiles import Column

if TYPE_CHECKING:
    from services.segmenter.app import Segmenter

log = logging.getLogger("segflow.segmenter")


def load_definitions(path: Path) -> Definitions:
    """Parse a definitions file (raises DefinitionError with every problem)."""
    return parse(path.read_text())


def reload(seg: Segmenter) -> bool:
    """Load the definitions file if it changed; keep the running version if invalid."""
    path = seg.config.definitions
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        log.warning("definitions unreadable", extra={"fields": {"error": str(exc)}})
        return False
    if mtime == seg._mtime:
        return False
    seg._mtime = mtime
    try:
        defs = load_definitions(path)
    except DefinitionError as exc:
        DEFINITIONS.labels("rejected").inc()
        for p in exc.problems:
            log.error(
                "definition rejected",
                extra={
                    "fields": {
                        "file": str(path),
                        "line": p.line,
                        "field": p.field,
                        "error": p.message,
                        "running_version": seg.defs.version,
                    }
                },
            )
        return False
    if defs.version == seg.defs.version:
        return False
    DEFINITIONS.labels("loaded").inc()
    log.info(
        "definitions loaded",
        extra={
            "fields": {
                "version": defs.version,
                "previous": seg.defs.version,
                "segments": len(defs.segments),
            }
        },
    )
    seg.defs = defs
    seg.score_decoder.keys = defs.features
    seg.population.clear()
    for cid, st in seg.states.items():
        seg._index(st, seg.store.partition_of(cid))
    recompute_tables(seg)
    seg._reeval.extend(seg.states)
    return True


def follow_lookups(seg: Segmenter) -> None:
    """Take new lookup table versions; queue the customers whose looked-up value changed
    (an attribute whose key was added, removed or changed) for re-evaluation."""
    if not seg.defs.lookups or not seg.follow_lookups:
        return
    if seg.clock() < seg._lookup_retry_at:
        return
    try:
        if seg._lookup_reader is None:
            reader = GlobalTable(seg.settings, TOPICS.lookups, serde=seg.serde)
            changed = reader.catch_up()
            seg._lookup_reader = reader
        else:
            changed = seg._lookup_reader.poll()
    except BrokerError as exc:  # the loop keeps running; tables follow when it is back
        seg._lookup_retry_at = seg.clock() + 5.0
        log.warning("lookup tables unreadable", extra={"fields": {"error": str(exc)}})
        return
    seg.apply_lookups(changed)


def apply_lookups(seg: Segmenter, changed: dict[str, dict[str, Any] | None]) -> None:
    """Take changed LookupTable records (None: removed) and queue the customers whose
    looked-up value changed."""
    if not changed:
        return
    touched: dict[str, set[str]] = {}  # table -> keys whose value changed
    for name, record in changed.items():
        before = seg.lookups.get(name, {})
        after = dict(record.get("entries") or {}) if record is not None else {}
        keys = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        if record is None:
            seg.lookups.pop(name, None)
            seg.lookup_versions.pop(name, None)
        else:
            seg.lookups[name] = after
            seg.lookup_versions[name] = int(record.get("version") or 0)
        touched[name] = keys
        log.info(
            "lookup table loaded" if record is not None else "lookup table removed",
            extra={
                "fields": {
                    "table": name,
                    "version": seg.lookup_versions.get(name),
                    "entries": len(after),
                    "changed_keys": len(keys),
                }
            },
        )
    args = [(table, arg) for _, table, arg in seg.defs.lookups if touched.get(table)]
    if not args:
        return
    queued = 0
    for cid, st in seg.states.items():
        for table, arg in args:
            v = st.values.get(arg)
            if isinstance(v, str) and v.strip() in touched[table]:
                seg._reeval.append(cid)
                queued += 1
                break
    for table in touched:
        LOOKUP_LOADS.labels(table).inc()
    log.info("lookup change re-evaluates customers", extra={"fields": {"customers": queued}})


def advance_grid(seg: Segmenter, part: int, as_of: int) -> Iterator[Output]:
    """Before a score of instant ``as_of`` on partition ``part``: when it reaches the grid
    instant after the partition's table (``percentile_refresh`` seconds of event time), the
    partition's timers due before that instant fire with the table they fall in, a new table
    is computed from the partition's customers' latest values, and the customers between an
    old and a new threshold are re-evaluated at the grid instant — all before the score, so
    the result depends only on the partition's records in order (README.md). A score that
    jumps several grid instants computes one table: nothing on the partition changed between
    them. The partition's first table (no committed one: a new partition, or a changelog
    written before tables existed) is computed at the first score, at its grid instant."""
    step = int(seg.config.percentile_refresh * 1000)
    old = seg.tables.get(part)
    if old is not None and not old.due(as_of, step):
        return
    if old is None:
        instant = grid_floor(as_of, step)
    else:
        instant = old.at + max(step, 1)
        out: list[Output] = []
        seg._fire_timers(out, 1 << 62, before=(part, instant))
        yield from out
    population = seg.population.get(part, {})
    leaving = seg.leaving.get(part, {})
    for cid in [c for c, until in leaving.items() if until < instant]:  # merged before it
        del leaving[cid]
        if cid not in seg.states:
            for column in population.values():
                column.discard(cid)
    new = Table(part, grid_floor(as_of, step), percentile_thresholds(seg.defs, population))
    seg.tables[part] = new
    seg._unwritten_tables.add(part)
    yield from _reevaluate(seg, part, old.values if old is not None else {}, new, instant)


def _reevaluate(
    seg: Segmenter, part: int, old: dict[tuple[str, float], float], new: Table, instant: int
) -> Iterator[Output]:
    """Re-evaluate at ``instant`` the partition's customers whose value lies between an old
    and a new threshold (a moved threshold can cross a customer's value with no new score for
    it: issue #17's oracle); nobody else's rule can change."""
    population = seg.population.get(part, {})
    todo: set[str] = set()
    for feature, lo, hi in crossed(old, new.values):
        column = population.get(feature)
        if column is not None:
            todo.update(column.between(lo, hi))
    for cid in sorted(todo):
        st = seg.states.get(cid)
        if st is not None:
            now = max(instant, st.as_of)
            changed, changes = core.advance(st, now, seg.defs, new.values, seg.lookups)
            yield from seg._apply(st, changed, changes, part)


def recompute_tables(seg: Segmenter) -> None:
    """New definitions (an operator's action, at processing time): each owned partition's
    table over its current customers for the new definitions' ``pNN``, at the same grid
    instant (every customer is re-evaluated after a reload anyway)."""
    for part, table in list(seg.tables.items()):
        values = percentile_thresholds(seg.defs, seg.population.get(part, {}))
        seg.tables[part] = Table(part, table.at, values)
        seg._unwritten_tables.add(part)


def linger(
    seg: Segmenter, cid: str, part: int, values: dict[str, float], until: int | None
) -> None:
    """A merged-away id's values stay in ``part``'s population for the tables of grid
    instants up to ``until`` (None: not any more, unless the id is a customer again)."""
    leaving = seg.leaving.setdefault(part, {})
    population = seg.population.setdefault(part, {})
    if until is None:
        if leaving.pop(cid, None) is not None and cid not in seg.states:
            for column in population.values():
                column.discard(cid)
        return
    leaving[cid] = until
    for feature, value in values.items():
        population.setdefault(feature, Column()).set(cid, float(value))
