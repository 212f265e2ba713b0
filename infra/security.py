"""Security defaults every room calls: Kafka client security options and a bearer token on HTTP endpoints.

Kafka: :class:`infra.settings.KafkaSecurity` (``security.kafka``, env
``OSMF_SECURITY__KAFKA__*``) becomes the options of each client library the
project uses — :func:`aiokafka_options` (infra/kafka.py, infra/producer.py,
the learner's follower), :func:`faust_credentials` (the stream worker's
``faust.App(broker_credentials=...)``), :func:`confluent_options`
(librdkafka clients of ad systems and tools). The password stays a
``SecretStr`` until the moment a client is built.

HTTP: every endpoint of the project (worker, learner and client metrics, the
dashboard) binds 127.0.0.1 by default and, when ``security.http_token`` is
set, answers only requests carrying ``Authorization: Bearer <token>``
(401 otherwise). :func:`require_bearer` wraps any WSGI app (Flask/Dash:
``app.server.wsgi_app = require_bearer(app.server.wsgi_app, token)``);
:func:`serve_metrics` replaces ``prometheus_client.start_http_server``.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from infra.settings import KafkaSecurity, SecuritySettings, get_settings

LOOPBACK = "127.0.0.1"

# --------------------------------------------------------------------------- Kafka


def _secret(value: Any) -> str | None:
    return None if value is None else value.get_secret_value()


def aiokafka_options(sec: KafkaSecurity) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient / AIOKafkaClient."""
    if sec.protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": sec.protocol}
    if sec.protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        context = create_ssl_context(
            cafile=str(sec.ssl_cafile) if sec.ssl_cafile else None,
            certfile=str(sec.ssl_certfile) if sec.ssl_certfile else None,
            keyfile=str(sec.ssl_keyfile) if sec.ssl_keyfile else None,
        )
        context.check_hostname = sec.ssl_check_hostname
        options["ssl_context"] = context
    if sec.protocol.startswith("SASL_"):
        options.update(
            sasl_mechanism=sec.sasl_mechanism,
            sasl_plain_username=sec.sasl_username,
            sasl_plain_password=_secret(sec.sasl_password),
        )
    return options


def client_options() -> dict[str, Any]:
    """:func:`aiokafka_options` of this process's settings (``infra.settings.get_settings()``)."""
    return aiokafka_options(get_settings().security.kafka)


def faust_credentials(sec: KafkaSecurity) -> Any:
    """``broker_credentials`` for ``faust.App`` (None for PLAINTEXT)."""
    if sec.protocol == "PLAINTEXT":
        return None
    import faust

    ssl_context = aiokafka_options(sec).get("ssl_context")
    if sec.protocol == "SSL":
        return faust.SSLCredentials(ssl_context)
    return faust.SASLCredentials(
        username=sec.sasl_username, password=_secret(sec.sasl_password), mechanism=sec.sasl_mechanism,
        ssl_context=ssl_context,
    )


def confluent_options(sec: KafkaSecurity) -> dict[str, str]:
    """librdkafka configuration keys (confluent-kafka) for the same settings."""
    options = {"security.protocol": sec.protocol.lower()}
    if sec.protocol.startswith("SASL_"):
        options.update({"sasl.mechanism": sec.sasl_mechanism, "sasl.username": sec.sasl_username or "",
                        "sasl.password": _secret(sec.sasl_password) or ""})
    if sec.protocol in ("SSL", "SASL_SSL"):
        if sec.ssl_cafile:
            options["ssl.ca.location"] = str(sec.ssl_cafile)
        if sec.ssl_certfile:
            options["ssl.certificate.location"] = str(sec.ssl_certfile)
            options["ssl.key.location"] = str(sec.ssl_keyfile)
        options["ssl.endpoint.identification.algorithm"] = "https" if sec.ssl_check_hostname else "none"
    return options


# --------------------------------------------------------------------------- HTTP


def bearer_ok(authorization: str | None, token: str | None) -> bool:
    """True when no token is required, or ``authorization`` is ``Bearer <token>`` (constant-time compare)."""
    if not token:
        return True
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def http_token(security: SecuritySettings | None = None) -> str | None:
    """The configured bearer token as text (None: endpoints are open)."""
    sec = security if security is not None else get_settings().security
    return _secret(sec.http_token)


def require_bearer(app: Callable[..., Iterable[bytes]], token: str | None) -> Callable[..., Iterable[bytes]]:
    """Wrap a WSGI app so that it answers 401 unless the request carries the bearer token (no-op without one)."""
    if not token:
        return app

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if bearer_ok(environ.get("HTTP_AUTHORIZATION"), token):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                              ("WWW-Authenticate", 'Bearer realm="osmf"')])
        return [b"401: send the header 'Authorization: Bearer <security.http_token>'\n"]

    return guarded


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - wsgiref's name
        logging.getLogger(__name__).debug(format, *args)


def serve_metrics(port: int, host: str = LOOPBACK, registry: Any = None, token: str | None = None) -> WSGIServer:
    """Serve ``/metrics`` of ``registry`` (default: the global one) on ``host:port`` in a daemon thread.

    Like ``prometheus_client.start_http_server``, plus the optional bearer
    token. Returns the server (``server.shutdown()`` stops it; ``server.server_port``
    is the bound port, useful with ``port=0``). Raises OSError when the port is taken.
    """
    from prometheus_client import REGISTRY, make_wsgi_app

    app = require_bearer(make_wsgi_app(registry if registry is not None else REGISTRY), token)
    server = make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name=f"osmf-metrics-{port}", daemon=True).start()
    return server
