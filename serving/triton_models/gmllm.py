"""Triton python model ``gmllm``: group features text + product -> K creative prompts.

One Triton version per published G-MLLM version; the version directory holds
``model.py`` (this file) and ``artifact/`` (the published files, hard-linked).
:meth:`GMLLM.load` checks every file against the manifest before anything is
deserialised, so a tampered version fails to load and Triton reports why.

Inputs (no batch dimension): ``GROUP_TEXT`` BYTES[1], ``PRODUCT`` BYTES[1]
(JSON: id, category, title, price), optional ``PRODUCT_IMAGE`` BYTES[1]
(PNG/RGBA), ``K`` INT32[1], ``SEED`` INT64[1], ``TEMPERATURE`` FP32[1].
Outputs: ``PROMPTS`` BYTES[K] (canonical prompt text), ``VALID`` BOOL[K],
``MODEL_VERSION`` INT64[1].
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

_MODEL_DIR = Path(__file__).resolve().parents[1]
if str(_MODEL_DIR / "osmf_code") not in sys.path:
    sys.path.insert(0, str(_MODEL_DIR / "osmf_code"))


def _scalar(request, name, default):  # noqa: ANN001, ANN202
    import triton_python_backend_utils as pb_utils

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    return default if value.size == 0 else value[0]


def _text(request, name, default=None):  # noqa: ANN001, ANN202
    value = _scalar(request, name, default)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


class TritonPythonModel:
    """Loads one published G-MLLM version and samples prompts with it."""

    def initialize(self, args):  # noqa: ANN001, ANN201
        import torch

        from learner.model.gmllm import GMLLM

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("threads", "1") or 1))
        self.version = int(args["model_version"])
        self.max_new_tokens = int(params.get("max_new_tokens", "64") or 64)
        self.default_k = int(params.get("slate_size", "4") or 4)
        self.default_temperature = float(params.get("temperature", "0.9") or 0.9)
        self.gmllm = GMLLM.load(Path(__file__).resolve().parent / "artifact")

    def execute(self, requests):  # noqa: ANN001, ANN201
        import triton_python_backend_utils as pb_utils
        from PIL import Image

        from learner.data import ProductRecord

        responses = []
        for request in requests:
            try:
                group = _text(request, "GROUP_TEXT", "")
                product = json.loads(_text(request, "PRODUCT", "{}"))
                image_bytes = _scalar(request, "PRODUCT_IMAGE", b"")
                image = Image.open(io.BytesIO(image_bytes)).convert("RGBA") if image_bytes else None
                record = ProductRecord(
                    str(product["id"]), str(product.get("category", "")), str(product.get("title", "")),
                    None if product.get("price") is None else float(product["price"]), image,
                )
                k = int(_scalar(request, "K", self.default_k))
                if not 1 <= k <= 256:
                    raise ValueError(f"K must be in 1..256, got {k}")
                generations = self.gmllm.generate(
                    group, record, n=k, seed=int(_scalar(request, "SEED", 0)),
                    temperature=float(_scalar(request, "TEMPERATURE", self.default_temperature)),
                    max_new_tokens=self.max_new_tokens,
                )
                prompts = np.array(
                    [(g.prompt.to_text() if g.prompt is not None else g.text).encode("utf-8") for g in generations],
                    dtype=np.object_,
                )
                valid = np.array([g.prompt is not None for g in generations], dtype=np.bool_)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("PROMPTS", prompts),
                    pb_utils.Tensor("VALID", valid),
                    pb_utils.Tensor("MODEL_VERSION", np.array([self.version], dtype=np.int64)),
                ]))
            except Exception as exc:  # one bad request must not fail the others of the batch
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"gmllm v{self.version}: {type(exc).__name__}: {exc}")
                ))
        return responses
