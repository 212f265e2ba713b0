"""Security defaults, one test each: artifacts, loopback binds, bearer token, Kafka security, no pickles, no secrets."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra.security import (
    aiokafka_options, bearer_ok, confluent_options, faust_credentials, http_token, require_bearer, serve_metrics,
)
from infra.settings import KafkaSecurity, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["infra", "features", "streams", "learner", "serving", "sim", "bench", "cli"]
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]


# --------------------------------------------------------------------------- artifacts


def test_artifacts_are_safetensors_and_json_only_and_every_load_verifies_the_manifest(tmp_path: Path) -> None:
    from learner.model.artifact import ArtifactError
    from learner.model.gmllm import GMLLM
    from infra.settings import ModelSettings

    tiny = ModelSettings(vocab_size=500, hidden_size=32, layers=1, heads=4, intermediate_size=64,
                         vision_hidden_size=16, vision_layers=1, image_size=16, patch_size=8)
    path = tmp_path / "model"
    GMLLM.build(tiny, corpus=["group a | likes primary=pink"], seed=0).save(path)
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".jinja", ".txt"}, suffixes
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {str(p.relative_to(path)) for p in path.rglob("*")
                                      if p.is_file() and p.name != "manifest.json"}
    GMLLM.load(path)  # verifies, then loads
    (path / "extra.pt").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ArtifactError, match="pickle"):
        GMLLM.load(path)
    (path / "extra.pt").unlink()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ArtifactError, match="sha256"):
        GMLLM.load(path)
    # The Triton backend loads through the same verifying loader, never from_pretrained or torch.load directly.
    backend = (REPO / "serving" / "triton_models" / "gmllm.py").read_text()
    calls = {ast.unparse(n.func) for n in ast.walk(ast.parse(backend)) if isinstance(n, ast.Call)}
    assert "GMLLM.load" in calls
    assert not {c for c in calls if c.endswith(("from_pretrained", "torch.load", "from_checkpoint"))}


# --------------------------------------------------------------------------- loopback


def test_every_service_binds_127_0_0_1_unless_configured() -> None:
    settings = load_settings(data_dir=Path("/nonexistent"))
    assert settings.broker.host == settings.serving.host == settings.dashboard.host == "127.0.0.1"
    assert settings.streams.metrics_host == settings.learner.metrics_host == "127.0.0.1"
    from infra import s3store
    from learner.metrics import start_learner_metrics
    import inspect

    assert s3store.HOST == "127.0.0.1"
    assert inspect.signature(start_learner_metrics).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve_metrics).parameters["host"].default == "127.0.0.1"
    worker = (REPO / "streams" / "worker.py").read_text()
    assert 'addr="127.0.0.1"' in worker or "streams.metrics_host" in worker  # before / after wiring serve_metrics
    # No wildcard address as a value anywhere in the code: binding everything is configured, never a default.
    wildcard = [str(p.relative_to(REPO)) for p in _sources() for n in ast.walk(ast.parse(p.read_text()))
                if isinstance(n, ast.Constant) and n.value in ("0.0.0.0", "::")]
    assert wildcard == []
    # The fault tests check the real processes too: worker, Tansu, SeaweedFS and tritonserver listen on
    # 127.0.0.1 only (tests/faults/test_worker_kill.py, test_broker_kill.py, test_serving_faults.py).


# --------------------------------------------------------------------------- bearer token


def _get(port: int, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers or {})
    try:
        with _HTTP.open(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_endpoint_asks_for_the_bearer_token_when_one_is_set() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("osmf_probe", "probe", registry=registry).inc(3)
    guarded = serve_metrics(0, registry=registry, token="s3cret-t0ken")
    open_ = serve_metrics(0, registry=registry)
    try:
        port = guarded.server_port
        assert guarded.server_address[0] == "127.0.0.1"
        assert _get(port)[0] == 401
        assert _get(port, {"Authorization": "Bearer wrong"})[0] == 401
        assert _get(port, {"Authorization": "Basic s3cret-t0ken"})[0] == 401
        status, body = _get(port, {"Authorization": "Bearer s3cret-t0ken"})
        assert status == 200 and "osmf_probe_total 3.0" in body
        status, body = _get(open_.server_port)
        assert status == 200 and "osmf_probe_total 3.0" in body  # no token configured: open (on loopback)
    finally:
        guarded.shutdown()
        open_.shutdown()


def test_require_bearer_guards_a_flask_app_like_the_dashboard() -> None:
    from flask import Flask

    app = Flask("probe")
    app.add_url_rule("/", "index", lambda: "page")
    app.wsgi_app = require_bearer(app.wsgi_app, "tok")  # the one line the dashboard adds
    client = app.test_client()
    assert client.get("/").status_code == 401
    assert client.get("/").headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/", headers={"Authorization": "Bearer tok"}).get_data(as_text=True) == "page"
    assert bearer_ok(None, None) and bearer_ok("anything", "") and not bearer_ok("Bearer to", "tok")


def test_http_token_comes_from_settings_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSMF_SECURITY__HTTP_TOKEN", "from-env")
    assert http_token(load_settings().security) == "from-env"
    monkeypatch.delenv("OSMF_SECURITY__HTTP_TOKEN")
    assert http_token(load_settings().security) is None


# --------------------------------------------------------------------------- Kafka security


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_kafka_sasl_and_tls_settings_reach_every_client_library(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    sec = KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="osmf",
                        sasl_password="pw-123", ssl_cafile=cert, ssl_certfile=cert, ssl_keyfile=key)
    options = aiokafka_options(sec)
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "osmf" and options["sasl_plain_password"] == "pw-123"
    assert options["ssl_context"].check_hostname is True
    import asyncio

    from aiokafka import AIOKafkaProducer

    async def build() -> None:
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", **options)  # aiokafka accepts every option
        assert producer.client._security_protocol == "SASL_SSL"  # noqa: SLF001

    asyncio.run(build())
    creds = faust_credentials(sec)
    assert type(creds).__name__ == "SASLCredentials" and creds.username == "osmf" and creds.password == "pw-123"
    assert creds.mechanism.value == "SCRAM-SHA-512" and creds.ssl_context is not None
    conf = confluent_options(sec)
    assert conf["security.protocol"] == "sasl_ssl" and conf["sasl.password"] == "pw-123"
    assert conf["ssl.ca.location"] == str(cert) and conf["ssl.key.location"] == str(key)
    assert aiokafka_options(KafkaSecurity()) == {} and faust_credentials(KafkaSecurity()) is None
    with pytest.raises(Exception, match="sasl_username"):
        load_settings(security={"kafka": {"protocol": "SASL_PLAINTEXT"}})
    # infra/kafka.py builds every client with the settings' options.
    tree = ast.parse((REPO / "infra" / "kafka.py").read_text())
    built = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).startswith("AIOKafka")]
    assert len(built) == 4
    assert all(any(kw.arg is None and ast.unparse(kw.value) == "client_options()" for kw in n.keywords) for n in built)


@pytest.mark.broker
def test_tls_setting_changes_what_the_project_client_does_against_a_real_broker(broker_settings: Settings) -> None:
    """Against the plaintext test broker: PLAINTEXT answers; with protocol SSL from the environment the same
    helper speaks TLS and gets no answer — the setting reached the client."""
    code = ("from infra.kafka import kafka_reachable; import sys; "
            f"print(kafka_reachable({broker_settings.bootstrap_servers!r}, timeout_s=3))")
    def run(protocol: str) -> str:
        env = {**os.environ, "OSMF_SECURITY__KAFKA__PROTOCOL": protocol, "PYTHONPATH": str(REPO)}
        env.pop("OSMF_CONFIG", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    assert run("PLAINTEXT") == "True"
    assert run("SSL") == "False"


# --------------------------------------------------------------------------- no pickles


#: Deserialisation of pickles the project tolerates, with why. Anything new fails this test.
PICKLE_ALLOWED = {
    # The worker's grouping snapshot in its own changelog topic (written by the worker itself). Reported in
    # docs/reliability.md: anyone who can write that topic can run code in the worker; protect it with Kafka ACLs.
    ("streams/aggregate.py", "pickle.loads"),
}


def test_no_pickle_or_torch_load_of_outside_files() -> None:
    risky = ("torch.load", "pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.load",
             "np.load", "numpy.load", "pd.read_pickle", "pandas.read_pickle")
    found: set[tuple[str, str]] = set()
    remote_code: list[str] = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            rel = str(path.relative_to(REPO))
            if name in risky:
                found.add((rel, name))
            for kw in node.keywords:
                if kw.arg == "trust_remote_code" and ast.unparse(kw.value) != "False":
                    remote_code.append(rel)
                if kw.arg == "weights_only" and ast.unparse(kw.value) == "False":
                    remote_code.append(rel)
    assert found == PICKLE_ALLOWED
    assert remote_code == []


# --------------------------------------------------------------------------- secrets


def test_secrets_are_never_printed_or_logged(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("OSMF_SECURITY__HTTP_TOKEN", "tok-SECRET-1")
    monkeypatch.setenv("OSMF_SECURITY__KAFKA__PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("OSMF_SECURITY__KAFKA__SASL_USERNAME", "osmf")
    monkeypatch.setenv("OSMF_SECURITY__KAFKA__SASL_PASSWORD", "pw-SECRET-2")
    settings = load_settings()
    texts = [repr(settings), str(settings), settings.model_dump_json(), json.dumps(settings.model_dump(), default=str)]
    for text in texts:
        assert "SECRET" not in text
    # A configuration error message does not echo the password either.
    monkeypatch.setenv("OSMF_SECURITY__KAFKA__SASL_USERNAME", "")
    with pytest.raises(Exception) as caught:
        load_settings(security={"kafka": {"protocol": "SASL_PLAINTEXT", "sasl_password": "pw-SECRET-3"}})
    assert "SECRET" not in str(caught.value)
    # The CLI's settings/error paths: `osmf broker status` with these settings prints nothing secret.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OSMF_DATA_DIR": "/tmp/osmf-nonexistent-sec"}
    env["OSMF_SECURITY__KAFKA__SASL_USERNAME"] = "osmf"
    out = subprocess.run([sys.executable, "-m", "cli.main", "broker", "status"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert "SECRET" not in out.stdout + out.stderr
