"""Typed calls to the Triton models over ``tritonclient`` (HTTP or gRPC), with explicit timeouts and retries."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from infra.settings import Settings
from learner.publish import Routing
from serving.repository import CREATIVE, GMLLM, RENDER


@dataclass(frozen=True)
class Slate:
    """What ``creative`` returns for one (group, product): K prompts with their PNGs and the version."""

    prompts: list[str]
    valid: list[bool]
    pngs: list[bytes]
    version: int


class TritonCalls:
    """One client connection to tritonserver (not shared across threads with HTTP: make one per thread)."""

    def __init__(self, settings: Settings, protocol: str | None = None) -> None:
        self.settings = settings
        self.protocol = protocol or settings.serving.protocol
        s = settings.serving
        if self.protocol == "grpc":
            import tritonclient.grpc as module

            self._client: Any = module.InferenceServerClient(f"{s.host}:{s.grpc_port}")
        else:
            import tritonclient.http as module

            self._client = module.InferenceServerClient(
                f"{s.host}:{s.http_port}", connection_timeout=s.request_timeout_s, network_timeout=s.request_timeout_s
            )
        self._module = module

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - closing twice or a dead server is fine
            pass

    # ------------------------------------------------------------------ low level

    def _input(self, name: str, values: np.ndarray, datatype: str) -> Any:
        tensor = self._module.InferInput(name, list(values.shape), datatype)
        tensor.set_data_from_numpy(values)
        return tensor

    def _infer(self, model: str, inputs: list[Any], outputs: list[str], version: int | None = None) -> Any:
        s = self.settings.serving
        requested = [self._module.InferRequestedOutput(name) for name in outputs]
        kwargs: dict[str, Any] = {"model_version": "" if version is None else str(version), "outputs": requested}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = s.request_timeout_s
        delay = s.retry_backoff_s
        for attempt in range(s.retries + 1):
            try:
                return self._client.infer(model, inputs, **kwargs)
            except Exception:
                if attempt == s.retries:
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _generation_inputs(self, group_text: str, product: dict[str, Any], image_png: bytes | None, k: int,
                           seed: int, temperature: float | None) -> list[Any]:
        inputs = [
            self._input("GROUP_TEXT", np.array([group_text.encode()], dtype=np.object_), "BYTES"),
            self._input("PRODUCT", np.array([json.dumps(product).encode()], dtype=np.object_), "BYTES"),
            self._input("K", np.array([k], dtype=np.int32), "INT32"),
            self._input("SEED", np.array([seed], dtype=np.int64), "INT64"),
        ]
        if image_png:
            inputs.append(self._input("PRODUCT_IMAGE", np.array([image_png], dtype=np.object_), "BYTES"))
        if temperature is not None:
            inputs.append(self._input("TEMPERATURE", np.array([temperature], dtype=np.float32), "FP32"))
        return inputs

    # ------------------------------------------------------------------ models

    def generate(self, group_text: str, product: dict[str, Any], image_png: bytes | None, *, k: int, seed: int = 0,
                 temperature: float | None = None, version: int | None = None) -> tuple[list[str], list[bool], int]:
        """``gmllm`` (a given ``version``, else the newest loaded): K prompt texts, parse flags, version."""
        result = self._infer(GMLLM, self._generation_inputs(group_text, product, image_png, k, seed, temperature),
                             ["PROMPTS", "VALID", "MODEL_VERSION"], version)
        prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in result.as_numpy("PROMPTS").reshape(-1)]
        valid = [bool(v) for v in result.as_numpy("VALID").reshape(-1)]
        return prompts, valid, int(result.as_numpy("MODEL_VERSION").reshape(-1)[0])

    def render(self, prompt: str, image_png: bytes | None) -> bytes:
        """``render``: one PNG."""
        inputs = [self._input("PROMPT", np.array([[prompt.encode()]], dtype=np.object_), "BYTES")]
        if image_png:
            inputs.append(self._input("PRODUCT_IMAGE", np.array([[image_png]], dtype=np.object_), "BYTES"))
        result = self._infer(RENDER, inputs, ["PNG"])
        return bytes(result.as_numpy("PNG").reshape(-1)[0])

    def creative(self, group_text: str, product: dict[str, Any], image_png: bytes | None, *, k: int, seed: int = 0,
                 temperature: float | None = None) -> Slate:
        """``creative``: a slate of K rendered creatives from the live version."""
        result = self._infer(CREATIVE, self._generation_inputs(group_text, product, image_png, k, seed, temperature),
                             ["PROMPTS", "VALID", "PNGS", "MODEL_VERSION"])
        prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in result.as_numpy("PROMPTS").reshape(-1)]
        return Slate(
            prompts=prompts,
            valid=[bool(v) for v in result.as_numpy("VALID").reshape(-1)],
            pngs=[bytes(p) for p in result.as_numpy("PNGS").reshape(-1)],
            version=int(result.as_numpy("MODEL_VERSION").reshape(-1)[0]),
        )

    def live_version(self) -> int | None:
        """The version ``creative`` serves (its ``gmllm_version`` parameter), or None when it is not loaded."""
        routing = self.routing()
        return None if routing is None else routing.default

    def routing(self) -> Routing | None:
        """Which version ``creative`` serves each group (``gmllm_version``, ``group_versions``), or None when it is
        not loaded or serves no version yet."""
        try:
            config = self._client.get_model_config(CREATIVE)
        except Exception:  # noqa: BLE001
            return None
        if self.protocol == "grpc":
            params = {k: v.string_value for k, v in config.config.parameters.items()}
        else:
            params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        return routing_of(params)


def routing_of(params: dict[str, str]) -> Routing | None:
    """The routing in ``creative``'s parameters; None without a live version (a bad ``group_versions``: no routes,
    as ``creative`` itself reads it).

    >>> routing_of({"gmllm_version": "2", "group_versions": '{"mugs/g0": 3}'})
    Routing(default=2, groups={'mugs/g0': 3})
    >>> routing_of({"gmllm_version": "-1"}), routing_of({"gmllm_version": "2", "group_versions": "oops"})
    (None, Routing(default=2, groups={}))
    """
    from serving.triton_models.creative import group_versions_param

    value = params.get("gmllm_version", "")
    if not (value.lstrip("-").isdigit() and int(value) > 0):
        return None
    groups, _complaint = group_versions_param(params.get("group_versions", ""))
    return Routing(int(value), {g: v for g, v in sorted(groups.items()) if v != int(value)})
