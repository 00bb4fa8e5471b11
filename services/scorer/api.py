"""The scorer's internal read-only endpoints (for the API gateway).

* ``GET /health`` — the service answers; customers, event-time watermark, model quality;
* ``GET /customers/<customer_id>`` — the customer's features, churn probability, engagement,
  CLV, cluster, lifecycle stage and the top features contributing to the churn score, computed
  on request from its state as of its partition's watermark with the model in use (the
  ``CustomerScore`` shape), plus what was last emitted to ``segflow.scores``.

Served by :func:`segflow.runtime.internal_api.serve` on ``SEGFLOW_SCORER_HTTP_PORT`` (127.0.0.1).

The routes read what the scorer published at its last commit (:class:`ScorerPublisher`,
:mod:`segflow.runtime.snapshot`): copies of the committed states of the customers each commit
changed, and a :class:`FrozenModel` (the arrays scoring reads, copied from the model in use
when its version, clusters or BG/NBD fit change), with the watermarks of that commit. A request
scores one committed state with the model of that same commit: never a batch half applied,
never a model the loop is learning into, and the loop never waits for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from segflow.runtime.internal_api import InternalServer, NotFound, Params, Query, Routes, serve
from segflow.runtime.snapshot import Published
from services.scorer.app import MARKERS, ScorerService
from services.scorer.core import Scorer
from services.scorer.explain import explain_rows
from services.scorer.features import Buckets, State
from services.scorer.model import CLUSTER_DIMS, ChurnModel
from services.scorer.view import _MI_NAMES

#: The model quality ``/health`` reports.
HEALTH_QUALITY = ("roc_auc", "log_loss", "n_learned", "drifts")


@dataclass(frozen=True, eq=False)
class FrozenModel:
    """What scoring reads of a :class:`~services.scorer.model.ChurnModel`, copied: the
    blended churn log-odds as ``x * scale - offset`` summed plus ``intercept`` (its
    ``_blended`` arrays), the k-means centres, the BG/NBD fit, the version and the labels
    learned. Answers :meth:`predict_explain_matrix`, :meth:`cluster_rows` and
    :meth:`prior_share` with the same arithmetic as the model, for a
    :class:`~services.scorer.core.Scorer` that only scores (:meth:`scorer`)."""

    names: Sequence[str]
    scale: npt.NDArray[np.float64]
    offset: npt.NDArray[np.float64]
    intercept: float
    center_ids: npt.NDArray[np.int64]
    centers: npt.NDArray[np.float64]
    bgnbd: Any
    n_learned: int
    share: float
    version: str
    descriptions: dict[int, str]
    quality: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def of(cls, model: ChurnModel, descriptions: dict[int, str]) -> FrozenModel:
        """Copy what scoring reads (on the loop thread, which owns ``model``)."""
        model.cluster_rows(np.zeros((1, len(CLUSTER_DIMS))))  # the centre matrix, up to date
        _, _, scale, offset, intercept = model._blended(_MI_NAMES)
        quality = model.quality()
        return cls(
            names=_MI_NAMES,
            scale=_read_only(scale),
            offset=_read_only(offset),
            intercept=float(intercept),
            center_ids=_read_only(np.asarray(model._center_ids, dtype=np.int64)),
            centers=_read_only(model._centers),
            bgnbd=model.bgnbd,  # replaced by a refit, never changed in place
            n_learned=model.n_learned,
            share=model.prior_share(),
            version=model.version,
            descriptions=dict(descriptions),
            quality={k: quality[k] for k in HEALTH_QUALITY},
        )

    def predict_explain_matrix(
        self, names: Sequence[str], x: npt.NDArray[np.float64], k: int = 5
    ) -> tuple[npt.NDArray[np.float64], list[list[tuple[str, float]]]]:
        """As :meth:`ChurnModel.predict_explain_matrix` (for the scorer's model inputs)."""
        if names is not self.names and tuple(names) != tuple(self.names):
            raise ValueError("a frozen churn model scores the scorer's model inputs only")
        return explain_rows(x * self.scale - self.offset, self.intercept, self.names, k)

    def cluster_rows(self, v: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """As :meth:`ChurnModel.cluster_rows`: the nearest centre of each row."""
        d2 = ((v[:, None, :] - self.centers[None, :, :]) ** 2).sum(axis=2)
        nearest: npt.NDArray[np.int64] = self.center_ids[d2.argmin(axis=1)]
        return nearest

    def prior_share(self) -> float:
        return self.share

    def describe_clusters(self) -> dict[int, str]:
        return dict(self.descriptions)

    def scorer(self, like: Scorer) -> Scorer:
        """A scorer with ``like``'s configuration that scores with this model only (its
        ``score`` and ``record``; it has no clock, timers or cache of the loop's)."""
        model = cast(ChurnModel, self)
        return Scorer(like.config, model=model, _descriptions=dict(self.descriptions))


def _read_only(a: Any) -> Any:
    out = np.array(a, copy=True)
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class Committed:
    """What a request reads beside the customers' states, as of one commit."""

    model: FrozenModel
    scorer: Scorer  # scores with ``model``; used by request threads only
    watermark: int | None  # the instance's (the smallest of its partitions')
    #: Each input partition's watermark, and the partition of a customer id.
    watermarks: dict[Any, int | None] = field(default_factory=dict)
    part: Callable[[str], Any] = lambda _cid: 0


class ScorerPublisher:
    """Publishes the scorer's committed customer states (copies: the loop goes on changing its
    own) and :class:`Committed` each time its state store commits, restores or drops
    partitions (on the loop thread, through ``ChangelogStore.on_committed``; the service also
    calls it when it adopts the model at an assignment). A commit costs a copy of each state
    it changed; the model is copied again only when what scoring reads of it changed."""

    def __init__(self, service: ScorerService) -> None:
        self.service = service
        self._key: tuple[Any, ...] = ()
        self._frozen: tuple[FrozenModel, Scorer] | None = None
        self.table: Published[State, Committed] = Published(self._customers(), self._committed())
        service.states.on_committed = self.committed

    def _customers(self) -> Iterator[tuple[str, State]]:
        states = self.service.states.table  # the scorer's store holds decoded dicts
        return ((k, dict(v)) for k, v in states.items() if not k.startswith(MARKERS))

    def _committed(self) -> Committed:
        sc = self.service.scorer
        model = sc.model
        # Learning changes n_learned; a k-means step n_clustered; adopting or restoring a
        # version, a BG/NBD refit or new cluster descriptions replace objects.
        key = (model, model.n_learned, model.n_clustered, model.bgnbd, sc._descriptions)
        if self._frozen is None or not _same(key, self._key):
            frozen = FrozenModel.of(model, sc._descriptions)
            self._frozen, self._key = (frozen, frozen.scorer(sc)), key
        frozen, scorer = self._frozen
        marks = {p: sc.watermark_of(p) for p in sc.clocks}
        return Committed(frozen, scorer, sc.watermark, marks, sc.part)

    def committed(self, keys: Iterable[str] | None) -> None:
        """``keys``: the state keys the commit wrote (empty: only the model or the clock
        moved); None: any customer may have changed (a restore, an assignment, a revocation)."""
        if keys is None:
            self.table.rebuild(self._customers(), self._committed())
            return
        table = self.service.states.table
        changes: dict[str, State | None] = {}
        for k in keys:
            if not k.startswith(MARKERS):
                st = table.get(k)
                changes[k] = None if st is None else dict(st)
        self.table.publish(changes, self._committed())


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(x is y or x == y for x, y in zip(a, b, strict=True))


def routes(service: ScorerService) -> Routes:
    """The routes over what the running service last committed."""
    r = Routes("scorer")
    table = ScorerPublisher(service).table

    @r.get("/health")
    def health(_p: Params, _q: Query) -> dict[str, Any]:
        with table.read() as view:
            c = view.extra
            return {
                "service": "scorer",
                "status": "ok",
                "customers": len(view),
                "watermark": c.watermark,
                "model_version": c.model.version,
                "model": dict(c.model.quality),
            }

    @r.get("/customers/{customer_id}")
    def customer(p: Params, _q: Query) -> dict[str, Any]:
        cid = p["customer_id"]
        with table.read() as view:
            st, c = view.get(cid), view.extra
        if st is None:  # never seen, merged away, or forgotten
            raise NotFound(f"scorer has no state for {cid!r}")
        wm = c.watermarks.get(c.part(cid)) or 0  # the customer's own partition's time
        as_of = max(int(st["last_event_ms"]), int(st["scored_as_of"] or 0), wm)
        # Buckets.of: a state restored with the former 120-day ring is converted here
        scored = c.scorer.score(st, as_of, Buckets.of(st))
        record = c.scorer.record(cid, scored, 0)
        record.pop("scored_at", None)
        emitted = None
        if st["emitted_as_of"] is not None:
            emitted = {
                "as_of": st["emitted_as_of"],
                "churn_probability": round(float(st["emitted_churn"]), 4),
                "engagement_score": round(float(st["emitted_engagement"]), 2),
                "lifecycle_stage": st["emitted_stage"],
                "cluster": st["emitted_cluster"],
            }
        return {**record, "last_event_at": st["last_event_ms"], "last_emitted": emitted}

    return r


def start(service: ScorerService, port: int, host: str = "127.0.0.1") -> InternalServer:
    """Serve the routes from a background thread (port 0: a free port). Call it before the
    loop runs (the first view is taken on the calling thread)."""
    return serve(routes(service), port, host)
