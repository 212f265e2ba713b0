"""Serving on the real tritonserver (nvidia-pytriton's CPU build, .venv-triton): versions, refusal, rollback, client,
per-group versions.

One server for the module (start ~1 s, each gmllm version load ~5 s on 2 cores).
Without the Triton environment these tests skip — or fail under
``OSMF_REQUIRE_SERVICES=1`` (CI; ``make test`` builds it first).
"""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import pytest
from PIL import Image

from infra.contracts.prompt import parse_prompt
from infra.settings import ModelSettings, Settings, load_settings
from learner.data import ProductRecord
from learner.model.artifact import verify_artifact, write_manifest
from learner.publish import publish_version
from serving import server
from serving.live import VersionManager, read_state
from serving.repository import GMLLM, repository_path
from serving.triton_io import TritonCalls

TINY = ModelSettings(vocab_size=500, hidden_size=48, layers=2, heads=4, intermediate_size=96,
                     vision_hidden_size=16, vision_layers=1, image_size=16, patch_size=8)
GROUP_TEXT = "group mugs/g0 | 60% of mugs | ctr 4.0% | likes primary=pink"
OTHER_GROUP_TEXT = "group mugs/g1 | 40% of mugs | ctr 2.0% | likes primary=blue"
PRODUCT = {"id": "mug-1", "category": "mugs", "title": "Enamel mug", "price": 9.5}
SIZE = 64


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_triton(settings: Settings) -> None:
    """Skip (or fail under OSMF_REQUIRE_SERVICES=1) when the Triton environment is missing."""
    try:
        server.find_env(settings)
    except server.TritonEnvError as exc:
        if os.environ.get("OSMF_REQUIRE_SERVICES") == "1":
            pytest.fail(f"OSMF_REQUIRE_SERVICES=1 but {exc}", pytrace=False)
        pytest.skip(str(exc))


def serving_settings(data_dir: Path, **serving: object) -> Settings:
    return load_settings(
        data_dir=data_dir, render={"size": SIZE},
        serving={"http_port": _free_port(), "grpc_port": _free_port(), "metrics_port": _free_port(),
                 "slate_size": 3, "max_new_tokens": 96, "watch_interval_s": 0.5, **serving},
    )


def publish_tiny(settings: Settings, seed: int, tamper=None, groups: list[str] | None = None) -> int:  # noqa: ANN001
    """Publish a tiny model as the next version (for ``groups`` only when given, as ``learner.round`` does)."""
    from learner.model.gmllm import GMLLM as Model

    artifact = settings.data_dir / f"artifact-{seed}"
    metadata = {} if groups is None else {"groups": groups}
    Model.build(TINY, corpus=[GROUP_TEXT], seed=seed).save(artifact, extra={"published": metadata})
    published = publish_version(artifact, settings.data_dir / "models", GMLLM, verify=verify_artifact,
                                metadata=metadata)
    if tamper is not None:
        tamper(published.path)
    return published.version


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    settings = serving_settings(tmp_path_factory.mktemp("osmf-serving"))
    require_triton(settings)
    publish_tiny(settings, seed=0)
    pid = server.start_server(settings)
    try:
        manager = VersionManager(settings)
        manager.start()
        yield settings, manager
    finally:
        server.stop_server(settings)
        assert not _alive(pid), "tritonserver still running after stop"
        assert not list(Path("/dev/shm").glob(f"{server.shm_prefix(settings)}*")), "shared memory left behind"
        stubs = [p for p in Path("/proc").glob("[0-9]*") if _is_stub_of(p, settings)]
        assert not stubs, f"python backend stubs left: {stubs}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _is_stub_of(proc: Path, settings: Settings) -> bool:
    try:
        args = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(args) and args[0].endswith(b"triton_python_backend_stub") and any(
        str(repository_path(settings)).encode() in a for a in args)


def in_process(settings: Settings, version: int, seed: int, k: int) -> list[str]:
    """The same generation called in-process on the published version (one torch thread, as the backend)."""
    from learner.model.gmllm import GMLLM as Model
    from learner.pretrain import torch_threads

    with torch_threads(1):
        model = Model.load(settings.data_dir / "models" / GMLLM / str(version))
        out = model.generate(GROUP_TEXT, ProductRecord(PRODUCT["id"], PRODUCT["category"], PRODUCT["title"],
                                                       PRODUCT["price"]),
                             n=k, seed=seed, temperature=0.9, max_new_tokens=settings.serving.max_new_tokens)
    return [g.prompt.to_text() if g.prompt is not None else g.text for g in out]


def ask_creative(settings: Settings, seed: int = 7, protocol: str = "grpc", group_text: str = GROUP_TEXT):  # noqa: ANN201
    calls = TritonCalls(settings, protocol=protocol)
    try:
        return calls.creative(group_text, PRODUCT, None, k=3, seed=seed, temperature=0.9)
    finally:
        calls.close()


def check_slate(settings: Settings, slate, version: int) -> None:  # noqa: ANN001
    assert slate.version == version
    assert slate.prompts == in_process(settings, version, seed=7, k=3), "Triton output differs from in-process"
    assert any(slate.valid)
    for prompt, ok, png in zip(slate.prompts, slate.valid, slate.pngs):
        if not ok:
            assert png == b""
            continue
        parse_prompt(prompt)
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size == (SIZE, SIZE)


def test_version_1_is_live_with_correct_outputs(served) -> None:  # noqa: ANN001
    settings, _manager = served
    assert read_state(settings).live == 1
    assert server.status(settings).ready
    check_slate(settings, ask_creative(settings), 1)
    check_slate(settings, ask_creative(settings, protocol="http"), 1)
    text = "".join(p.read_text() for p in repository_path(settings).rglob("config.pbtxt"))
    text += "".join(p.read_text() for p in repository_path(settings).glob("*/*/model.py"))
    assert str(settings.data_dir) not in text, "no machine path in the model configs or code"


def test_version_2_goes_live_and_1_stays_loaded(served) -> None:  # noqa: ANN001
    settings, manager = served
    assert publish_tiny(settings, seed=1) == 2
    outcome = manager.check()
    assert outcome is not None and outcome.result == "live" and outcome.version == 2, outcome
    assert outcome.publish_to_live_s is not None
    check_slate(settings, ask_creative(settings), 2)
    assert server.ready_versions(settings, GMLLM) == [1, 2]
    state = read_state(settings)
    assert (state.live, state.previous) == (2, 1)


def _flip_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-16:] = bytes(16)
    weights.write_bytes(bytes(data))


def _truncate_and_rewrite_manifest(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    write_manifest(path)  # the manifest matches: only loading the weights can find the fault


def test_tampered_version_is_refused_and_2_keeps_serving(served) -> None:  # noqa: ANN001
    settings, manager = served
    version = publish_tiny(settings, seed=2, tamper=_flip_weights)
    outcome = manager.check()
    assert outcome is not None and outcome.result == "refused" and outcome.version == version
    assert "sha256" in outcome.reason
    assert read_state(settings).live == 2 and ask_creative(settings).version == 2


def test_version_that_fails_to_load_is_refused_quoting_triton(served) -> None:  # noqa: ANN001
    settings, manager = served
    version = publish_tiny(settings, seed=3, tamper=_truncate_and_rewrite_manifest)
    outcome = manager.check()
    assert outcome is not None and outcome.result == "refused" and outcome.version == version, outcome
    assert "failed to load" in outcome.reason and "gmllm" in outcome.reason, outcome.reason
    assert read_state(settings).live == 2 and ask_creative(settings).version == 2
    assert server.ready_versions(settings, GMLLM) == [1, 2]
    assert not (repository_path(settings) / GMLLM / str(version)).exists()
    assert manager.check() is None, "a refused version is not tried again"


def test_rollback_switches_back_to_1(served) -> None:  # noqa: ANN001
    settings, manager = served
    outcome = manager.rollback()
    assert outcome.version == 1 and outcome.result == "live"
    check_slate(settings, ask_creative(settings), 1)
    state = read_state(settings)
    assert state.live == 1 and 2 in state.rolled_back
    assert manager.check() is None, "the rolled-back version is not promoted again"
    from serving.live import versions_table

    rows = {row["version"]: row["state"] for row in versions_table(settings)}
    assert rows[1] == "live" and rows[2] == "rolled back" and rows[3] == rows[4] == "refused"


def test_creative_for_user_explores_the_slate(served, tmp_path: Path) -> None:  # noqa: ANN001
    from features.push import FeaturePusher, PushConfig
    from features.rows import user_group_row
    from features.sink import FeastSink
    from features.store import apply
    from serving.client import CreativeClient

    settings, _manager = served
    settings = settings.model_copy(update={"features": settings.features.model_copy(update={"embed_titles": False})})
    apply(settings)
    pusher = FeaturePusher(FeastSink(settings), PushConfig(flush_s=0.02))
    pusher.start()
    try:
        pusher.submit("user_group", [user_group_row("u1", "mugs", "mugs/g0")], 1_767_225_600_000_000)
        assert pusher.flush(30), pusher.counters
    finally:
        pusher.close()
    catalog = {"mug-1": ProductRecord("mug-1", "mugs", "Enamel mug", 9.5,
                                      Image.new("RGBA", (24, 24), (200, 40, 40, 255)))}
    with CreativeClient(settings, catalog, seed=0, watch=False) as client:
        assert client.live_version == 1
        assert client.prepare([("mugs/g0", "mug-1")], wait=True, timeout=120) == 2
        shown = [client.creative_for("u1", "mug-1") for _ in range(40)]
        first = shown[0]
        assert not first.fallback and first.group_id == "mugs/g0" and first.model_version == "1"
        assert Image.open(io.BytesIO(first.png)).size == (SIZE, SIZE)
        parse_prompt(first.prompt)
        assert len({c.creative_id for c in shown}) > 1, "Thompson sampling explores the slate"
        assert any(c.explores for c in shown)
        unknown_user = client.creative_for("nobody", "mug-1")
        assert unknown_user.fallback and unknown_user.reason == "unknown user" and unknown_user.png
        assert Image.open(io.BytesIO(unknown_user.png)).size == (SIZE, SIZE)
        unknown_product = client.creative_for("u1", "no-such-product")
        assert unknown_product.fallback and unknown_product.reason == "unknown product"
        text = json.dumps([c.creative_id for c in shown])
        assert "cr-" in text


class _Groups:
    """A features reader that knows two users' groups and nothing else (the client falls back to ``group <id>``)."""

    users = {"u0": "mugs/g0", "u1": "mugs/g1"}

    def resolve_group(self, user_id: str, category: str) -> str | None:
        return self.users.get(user_id)

    def read_group_rows(self, groups: list[str]) -> object:
        raise LookupError("no group features in this test")


def _versions_served(settings: Settings) -> tuple[int, int, int]:
    """The versions ``creative`` answers mugs/g0, mugs/g1 and the one-size text with."""
    from serving.client import ONE_SIZE_TEXT

    return tuple(ask_creative(settings, group_text=t).version  # type: ignore[return-value]
                 for t in (GROUP_TEXT, OTHER_GROUP_TEXT, ONE_SIZE_TEXT))


def test_per_group_versions_route_switch_and_roll_back(served) -> None:  # noqa: ANN001
    """Version 5 goes live for mugs/g0 only, 6 for everyone (routes cleared), then two rollbacks undo them."""
    from serving.client import CreativeClient
    from serving.live import versions_table

    settings, manager = served
    assert read_state(settings).live == 1
    catalog = {"mug-1": ProductRecord("mug-1", "mugs", "Enamel mug", 9.5)}
    with CreativeClient(settings, catalog, reader=_Groups(), seed=0, watch=False) as client:
        client.prepare([("mugs/g0", "mug-1"), ("mugs/g1", "mug-1")], wait=True, timeout=120)

        def shown() -> tuple[str, str]:
            assert client.refresh_live_version() is not None and client.wait(120)
            first, second = client.creative_for("u0", "mug-1"), client.creative_for("u1", "mug-1")
            assert not first.fallback and not second.fallback, (first.reason, second.reason)
            return first.model_version, second.model_version

        assert shown() == ("1", "1")
        version = publish_tiny(settings, seed=5, groups=["mugs/g0"])
        outcome = manager.check()
        assert outcome is not None and (outcome.version, outcome.result) == (version, "live"), outcome
        state = read_state(settings)
        assert (state.live, state.groups) == (1, {"mugs/g0": version})
        check_slate(settings, ask_creative(settings), version)  # the group's text gets the group's version
        assert _versions_served(settings) == (version, 1, 1)
        assert {1, version} <= set(server.ready_versions(settings, GMLLM))
        assert {r["version"]: r["state"] for r in versions_table(settings)}[version] == "live for 1 group"
        untouched = client.cache.get("mugs/g1", "mug-1")
        assert shown() == (str(version), "1")
        assert client.cache.get("mugs/g1", "mug-1") is untouched, "only the routed group's slate is re-generated"

        everyone = publish_tiny(settings, seed=6)
        outcome = manager.check()
        assert outcome is not None and (outcome.version, outcome.result) == (everyone, "live"), outcome
        state = read_state(settings)
        assert (state.live, state.previous, state.groups) == (everyone, 1, {})
        assert _versions_served(settings) == (everyone,) * 3
        assert {1, version, everyone} <= set(server.ready_versions(settings, GMLLM)), "rollback stays a switch"
        assert shown() == (str(everyone), str(everyone))

        outcome = manager.rollback()
        assert (outcome.version, outcome.reason) == (1, f"rolled back from {everyone}")
        assert read_state(settings).groups == {"mugs/g0": version}
        assert _versions_served(settings) == (version, 1, 1)
        assert shown() == (str(version), "1")

        untouched = client.cache.get("mugs/g1", "mug-1")
        outcome = manager.rollback()
        assert outcome.version == 1 and "mugs/g0" in outcome.reason, outcome
        state = read_state(settings)
        assert (state.live, state.groups) == (1, {}) and {version, everyone} <= set(state.rolled_back)
        assert state.events[-1]["event"] == "rolled_back" and state.events[-1]["groups"] == {"mugs/g0": 1}
        assert _versions_served(settings) == (1, 1, 1)
        assert shown() == ("1", "1")
        assert client.cache.get("mugs/g1", "mug-1") is untouched
        assert manager.check() is None
