"""What every segmenter instance shares with the others, as functions of the running
:class:`~services.segmenter.app.Segmenter`: definition reloads, the lookup tables (read whole
from ``segflow.lookups``) and the deployment-wide percentile thresholds (summaries exchanged on
``segflow.segmenter.population``). Split out of ``app.py`` (issue #14); the segmenter's
methods of the same names call these.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segflow.errors import BrokerError
from segflow.runtime.loop import Output
from segflow.runtime.tables import GlobalTable
from segflow.runtime.topics import TOPICS
from services.segmenter import core
from services.segmenter.dsl import DefinitionError, Definitions, parse
from services.segmenter.metrics import DEFINITIONS, LOOKUP_LOADS
from services.segmenter.population import Summary, merged_rank, summarize

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
    for st in seg.states.values():
        seg._index(st)
    seg._refresh_thresholds()
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


def refresh_thresholds(seg: Segmenter) -> None:
    old = seg.thresholds
    if seg.follow_population and seg.defs.percentiles:
        seg.thresholds = seg._deployment_thresholds()
    else:
        seg.thresholds = core.percentile_thresholds(seg.defs, seg.population)
    # A threshold that moved can cross a customer's value with no new score for it (issue
    # #17's oracle: "clv >= p80" held on days the segmenter did not have the customer):
    # the customers between the old and the new value are re-evaluated, in the tick's
    # bounded chunks (all of them when there was no threshold before).
    for (feature, pct), new in seg.thresholds.items():
        before = old.get((feature, pct))
        if before == new:
            continue
        lo, hi = (-math.inf, math.inf) if before is None else sorted((before, new))
        column = seg.population.get(feature)
        if column is not None:
            seg._reeval.extend(column.between(lo, hi))


def deployment_thresholds(seg: Segmenter) -> dict[tuple[str, float], float]:
    """``pNN`` over every partition: this instance's owned partitions summarised now (and
    queued for publication in the next tick's transaction), the others' latest summaries
    from segflow.segmenter.population (one refresh old at most, plus the commit)."""
    owned = seg.store.assigned or set()
    part_of = seg.store.partition_of
    features = sorted({feature for feature, _ in seg.defs.percentiles})
    now_ms = int(seg.clock() * 1000)
    own: dict[str, list[Summary]] = {}
    for feature in features:
        column = seg.population.get(feature)
        by_part: dict[int, list[float]] = {p: [] for p in owned}
        for cid, value in column.items() if column is not None else ():
            values = by_part.get(part_of(cid))
            if values is not None:
                values.append(value)
        for part, values in sorted(by_part.items()):
            summary = summarize(np.asarray(values, dtype=np.float64))
            own.setdefault(feature, []).append(summary)
            record = summary.to_record(feature, part, seg.instance_name, now_ms)
            seg._population_out.append(
                Output(TOPICS.segmenter_population, f"{feature}@{part}", record)
            )
    others: dict[str, list[Summary]] = {}
    for key, record in seg._read_population().items():
        feature, _, digits = key.rpartition("@")
        if digits.isdigit() and int(digits) not in owned and feature in features:
            others.setdefault(feature, []).append(Summary.from_record(record))
    thresholds: dict[tuple[str, float], float] = {}
    for feature, pct in seg.defs.percentiles:
        merged = merged_rank([*own.get(feature, []), *others.get(feature, [])], pct)
        if merged is not None:
            thresholds[(feature, pct)] = merged
    return thresholds


def read_population(seg: Segmenter) -> dict[str, dict[str, Any]]:
    """The latest SegmentPopulation record per ``<feature>@<partition>``."""
    if seg.clock() >= seg._population_retry_at:
        try:
            if seg._population_reader is None:
                table = GlobalTable(seg.settings, TOPICS.segmenter_population, seg.serde)
                table.catch_up()
                seg._population_reader = table
            else:
                for _ in range(100):  # everything fetched so far, in bounded polls
                    if not seg._population_reader.poll(0.0):
                        break
        except BrokerError as exc:  # thresholds from what was read; retried in 5 s
            seg._population_retry_at = seg.clock() + 5.0
            log.warning("population summaries unreadable", extra={"fields": {"error": str(exc)}})
    reader = seg._population_reader
    return dict(reader.table) if reader is not None else {}
