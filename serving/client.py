"""The creative client for ad systems: one call returns the image to show now.

>>> client = CreativeClient(settings, catalog=products)           # doctest: +SKIP
>>> client.prepare([("mugs/g0", "mug-1")], wait=True)             # doctest: +SKIP
>>> shown = client.creative_for("u42", "mug-1")                   # doctest: +SKIP
>>> shown.png[:4], shown.creative_id, shown.model_version, shown.explores  # doctest: +SKIP

How a call is answered (never by waiting for generation, never by raising):

1. the product comes from the catalogue (a mapping or callable giving a
   :class:`learner.data.ProductRecord`); its category resolves the user to a
   group through the features API (:meth:`features.read.FeatureReader.resolve_group`);
2. the (group, product) slate of K creatives from the group's version (the
   live one, or the one a per-group promotion routes the group to) is in the
   in-memory cache (pre-generated in the background when the group's version
   changes, or on the first request for a new pair);
3. one creative of the slate is chosen by Thompson sampling on each
   candidate's Beta posterior: the group's CTR as a prior worth
   ``serving.prior_impressions`` impressions, plus the clicks and
   impressions the group's features hold for that prompt; ``explores`` is
   true when the draw is not the candidate with the best posterior mean.

Unknown product, user or group, a slate not generated yet, a server that
does not answer, any error: the product's one-size creative (generated for
no group, greedy), or a template rendering of a neutral prompt when even that
is missing, flagged ``fallback`` with the reason.
"""

from __future__ import annotations

import io
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait as wait_futures
from dataclasses import dataclass
from typing import Any

from infra.contracts.prompt import parse_prompt
from infra.settings import Settings
from learner.data import ProductRecord
from learner.publish import Routing
from serving.cache import CachedSlate, SlateCache, creative_id
from serving.metrics import ClientMetrics

log = logging.getLogger(__name__)

ONE_SIZE = "*"
"""Group id of the one-size slate (generated without group features)."""
ONE_SIZE_TEXT = "group all | 100% of all users"
NEUTRAL_PROMPT = 'background=solid; palette=white,gray; position=center; scale=0.6; copy=""; style='


@dataclass(frozen=True)
class Creative:
    """One creative to show now."""

    png: bytes
    prompt: str
    model_version: str
    creative_id: str
    group_id: str | None
    product_id: str
    explores: bool
    fallback: bool
    reason: str = ""


class CreativeClient:
    """Serves creatives for (user, product) from pre-generated slates of each group's version; see the module doc.

    Parameters
    ----------
    settings
        OSMF settings (``serving`` section: ports, protocol, K, timeouts, retries).
    catalog
        Products by id: a mapping or a callable returning a ``ProductRecord`` or None.
    reader
        Features API (default: a :class:`features.read.FeatureReader` of ``settings``).
    seed
        Seeds the Thompson draws (None: random).
    watch
        Follow the routing in the background (re-generating the slates of groups whose version changes).
    """

    def __init__(self, settings: Settings, catalog: Mapping[str, ProductRecord] | Callable[[str], ProductRecord | None],
                 *, reader: Any = None, seed: int | None = None, watch: bool = True,
                 metrics: ClientMetrics | None = None) -> None:
        self.settings = settings
        self._catalog = catalog
        if reader is None:
            from features.read import FeatureReader

            reader = FeatureReader(settings)
        self.reader = reader
        self.rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.metrics = metrics or ClientMetrics()
        cache_dir = settings.serving.cache_dir or settings.data_dir / "serving" / "cache"
        self.cache = SlateCache(cache_dir)
        self.one_size = SlateCache(None)
        self._pool = ThreadPoolExecutor(settings.serving.pregenerate_workers, thread_name_prefix="osmf-slate")
        self._local = threading.local()
        self._pending: dict[tuple[str, str], Future[Any]] = {}
        self._pending_lock = threading.Lock()
        self._all_calls: list[Any] = []
        self._group_text: dict[str, str] = {}
        self._stats: dict[str, tuple[float, dict[str, tuple[int, int]], float]] = {}  # group -> (ctr, prompts, at)
        self.live_version: int | None = None
        self.routing = Routing()
        """Which version serves each group (``creative``'s parameters); ``live_version`` is its default."""
        self._stop = threading.Event()
        self._neutral: dict[str, bytes] = {}
        if settings.serving.client_metrics_port:
            self.metrics.serve(settings.serving.client_metrics_port, settings.serving.host)
        self.refresh_live_version()
        self._watcher: threading.Thread | None = None
        if watch:
            self._watcher = threading.Thread(target=self._watch, name="osmf-live-follow", daemon=True)
            self._watcher.start()

    # ------------------------------------------------------------------ hot path

    def creative_for(self, user_id: str, product_id: str) -> Creative:
        """The creative to show ``user_id`` for ``product_id`` now (a fallback, never an exception)."""
        started = time.perf_counter()
        try:
            product = self._product(product_id)
            if product is None:
                return self._fallback(product_id, None, "unknown product")
            group = self.reader.resolve_group(str(user_id), product.category)
            if group is None:
                return self._fallback(product_id, None, "unknown user", product)
            slate = self.cache.get(group, product_id)
            expected = self.routing.version_for(group)
            if slate is None or (expected is not None and slate.version != expected):
                self.metrics.cache.labels("miss").inc()
                self._schedule(group, product)
            else:
                self.metrics.cache.labels("hit").inc()
            if slate is None:
                return self._fallback(product_id, group, "slate not generated yet", product)
            index, explores = self._thompson(group, slate)
            chosen = slate.creatives[index]
            if explores:
                self.metrics.explored.inc()
            self.metrics.requests.labels("slate").inc()
            return Creative(chosen.png, chosen.prompt, str(slate.version), chosen.creative_id, group, product_id,
                            explores, False)
        except Exception as exc:  # noqa: BLE001 - the ad system's hot path never sees an exception
            log.warning("creative_for(%r, %r) fell back: %s", user_id, product_id, exc)
            return self._fallback(product_id, None, f"error: {type(exc).__name__}: {exc}")
        finally:
            self.metrics.latency.observe(time.perf_counter() - started)

    def _product(self, product_id: str) -> ProductRecord | None:
        if callable(self._catalog):
            return self._catalog(product_id)
        return self._catalog.get(product_id)

    def _thompson(self, group: str, slate: CachedSlate) -> tuple[int, bool]:
        ctr, prompts = self._group_stats(group)
        prior = self.settings.serving.prior_impressions
        draws, means = [], []
        with self._rng_lock:
            for item in slate.creatives:
                shown, clicked = prompts.get(item.prompt, (0, 0))
                alpha = 1.0 + prior * ctr + clicked
                beta = 1.0 + prior * (1.0 - ctr) + max(0, shown - clicked)
                draws.append(self.rng.betavariate(alpha, beta))
                means.append(alpha / (alpha + beta))
        chosen = max(range(len(draws)), key=draws.__getitem__)
        return chosen, means[chosen] < max(means) or len(set(means)) == 1 and len(means) > 1

    def _group_stats(self, group: str) -> tuple[float, dict[str, tuple[int, int]]]:
        """The group's CTR and per-prompt (impressions, clicks), from its features (re-read at most every 5 s)."""
        cached = self._stats.get(group)
        now = time.monotonic()
        if cached is not None and now - cached[2] < 5.0:
            return cached[0], cached[1]
        ctr, prompts = 0.02, {}
        try:
            rows = self.reader.read_group_rows([group])
            if rows.found_preferences[0]:
                value = float(rows.ctr[0])
                ctr = value if value == value else ctr
                for top in rows.top_prompts[0] or ():
                    prompts[top.prompt] = (int(top.impressions), int(top.clicks))
        except Exception as exc:  # noqa: BLE001 - features unavailable: uniform prior
            log.debug("group features of %s unavailable: %s", group, exc)
        self._stats[group] = (ctr, prompts, now)
        return ctr, prompts

    def _fallback(self, product_id: str, group: str | None, reason: str,
                  product: ProductRecord | None = None) -> Creative:
        self.metrics.fallbacks.labels(reason.split(":")[0]).inc()
        self.metrics.requests.labels("fallback").inc()
        one = self.one_size.get(ONE_SIZE, product_id)
        if one is not None and one.creatives:
            best = one.creatives[0]
            return Creative(best.png, best.prompt, str(one.version), best.creative_id, group, product_id,
                            False, True, reason)
        if product is not None:
            self._schedule(ONE_SIZE, product)
        try:
            png = self._neutral_png(product)
        except Exception:  # noqa: BLE001
            png = b""
        return Creative(png, NEUTRAL_PROMPT, "none", creative_id(""), group, product_id, False, True, reason)

    def _neutral_png(self, product: ProductRecord | None) -> bytes:
        key = product.id if product is not None else ""
        if key not in self._neutral:
            from serving.render.template import TemplateRenderer

            image = (product.image if product is not None and product.image is not None else None)
            from PIL import Image

            canvas = TemplateRenderer(size=self.settings.render.size).render(
                parse_prompt(NEUTRAL_PROMPT), image if image is not None else Image.new("RGBA", (64, 64), (128,) * 4)
            )
            buffer = io.BytesIO()
            canvas.convert("RGB").save(buffer, format="PNG")
            self._neutral[key] = buffer.getvalue()
        return self._neutral[key]

    # ------------------------------------------------------------------ generation

    def _calls(self) -> Any:
        calls = getattr(self._local, "calls", None)
        if calls is None:
            from serving.triton_io import TritonCalls

            calls = self._local.calls = TritonCalls(self.settings)
            with self._pending_lock:
                self._all_calls.append(calls)
        return calls

    def _schedule(self, group: str, product: ProductRecord) -> Future[Any]:
        key = (group, product.id)
        with self._pending_lock:
            pending = self._pending.get(key)
            if pending is not None and not pending.done():
                return pending
            future = self._pool.submit(self._generate, group, product)
            self._pending[key] = future
            return future

    def _generate(self, group: str, product: ProductRecord) -> CachedSlate | None:
        started = time.perf_counter()
        try:
            text = ONE_SIZE_TEXT if group == ONE_SIZE else self._text_of(group)
            image_png = None
            if product.image is not None:
                buffer = io.BytesIO()
                product.image.save(buffer, format="PNG")
                image_png = buffer.getvalue()
            k = 1 if group == ONE_SIZE else self.settings.serving.slate_size
            seed = int.from_bytes(f"{group}|{product.id}".encode()[:8].ljust(8, b"\0"), "little") % (2**31)
            slate = self._calls().creative(
                text, {"id": product.id, "category": product.category, "title": product.title, "price": product.price},
                image_png, k=k, seed=seed, temperature=0.0 if group == ONE_SIZE else None,
            )
            items = [(p, png) for p, ok, png in zip(slate.prompts, slate.valid, slate.pngs) if ok and png]
            if not items:
                raise RuntimeError(f"no valid creative in the slate of ({group}, {product.id})")
            cache = self.one_size if group == ONE_SIZE else self.cache
            stored = cache.put(slate.version, group, product.id, items)
            self.metrics.generation.observe(time.perf_counter() - started)
            return stored
        except Exception as exc:  # noqa: BLE001 - background: counted and logged, retried on the next request
            self.metrics.generation_errors.inc()
            log.warning("slate generation for (%s, %s) failed: %s", group, product.id, exc)
            return None

    def _text_of(self, group: str) -> str:
        text = self._group_text.get(group)
        if text is None:
            text = f"group {group}"
            try:
                from features.group import store_group_features

                found = store_group_features(self.reader, [group])
                if group in found:
                    text = found[group].to_text()
            except Exception as exc:  # noqa: BLE001 - a bare group name still conditions the model
                log.debug("group features of %s unavailable: %s", group, exc)
            self._group_text[group] = text
        return text

    def prepare(self, pairs: Iterable[tuple[str, str]], wait: bool = False, timeout: float | None = None) -> int:
        """Pre-generate slates for (group, product) pairs and the products' one-size creatives; returns slates ready."""
        futures = []
        for group, product_id in pairs:
            product = self._product(product_id)
            if product is None:
                continue
            futures.append(self._schedule(group, product))
            futures.append(self._schedule(ONE_SIZE, product))
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for future in futures:
                future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return sum(1 for f in futures if f.done() and f.result() is not None)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no slate is being generated (at most ``timeout`` seconds); True when none is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._pending_lock:
                pending = [f for f in self._pending.values() if not f.done()]
            if not pending:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            wait_futures(pending, timeout=left)

    # ------------------------------------------------------------------ live version

    def refresh_live_version(self) -> int | None:
        """Ask Triton which version serves each group (``creative``'s parameters); on a change re-generate in the
        background every known slate whose group's version is no longer the slate's. Returns the live version."""
        try:
            routing = self._calls().routing()
        except Exception:  # noqa: BLE001
            routing = None
        if routing is not None and routing != self.routing:
            first = self.routing.default is None
            self.routing, self.live_version = routing, routing.default
            self.metrics.live_version.set(routing.default)
            if first:
                self.cache.load(routing.default, routing.groups)
            for cache in (self.cache, self.one_size):
                for group, product_id in stale_pairs(cache, routing):
                    product = self._product(product_id)
                    if product is not None:
                        self._schedule(group, product)
        return self.live_version

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.serving.watch_interval_s):
            self.refresh_live_version()

    def close(self) -> None:
        """Stop the background threads and close connections."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for calls in self._all_calls:
            calls.close()

    def __enter__(self) -> CreativeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stale_pairs(cache: SlateCache, routing: Routing) -> list[tuple[str, str]]:
    """The (group, product) pairs of ``cache`` whose slate is not from the version ``routing`` serves the group."""
    out = []
    for group, product_id in cache.pairs():
        slate = cache.get(group, product_id)
        if slate is not None and slate.version != routing.version_for(group):
            out.append((group, product_id))
    return out


def products_from_json(text: str) -> dict[str, ProductRecord]:
    """A small catalogue from JSON (``[{"id", "category", "title", "price"}]``), for the CLI and docs."""
    return {p["id"]: ProductRecord(p["id"], p["category"], p.get("title", ""), p.get("price")) for p in json.loads(text)}
