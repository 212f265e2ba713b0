"""Triton python model ``render``: creative prompt + product image -> PNG.

The renderer is :func:`serving.render.factory.make_renderer` of the render
settings given as the ``render`` parameter (JSON) of ``config.pbtxt``: the
template renderer by default, Stable Diffusion + ControlNet when configured.
Dynamic batching groups concurrent requests into one ``execute`` call.

Inputs (batched, per item): ``PROMPT`` BYTES[1], ``PRODUCT_IMAGE`` BYTES[1]
(PNG; empty: grey placeholder). Output: ``PNG`` BYTES[1].
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


class TritonPythonModel:
    """Renders prompts with the configured renderer."""

    def initialize(self, args):  # noqa: ANN001, ANN201
        from infra.settings import RenderSettings
        from serving.render.factory import make_renderer

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.settings = RenderSettings(**json.loads(params.get("render", "{}") or "{}"))
        self.renderer = make_renderer(self.settings)

    def execute(self, requests):  # noqa: ANN001, ANN201
        import triton_python_backend_utils as pb_utils
        from PIL import Image

        from infra.contracts.prompt import parse_prompt

        responses = []
        for request in requests:
            try:
                prompts = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)
                image_tensor = pb_utils.get_input_tensor_by_name(request, "PRODUCT_IMAGE")
                images = (
                    image_tensor.as_numpy().reshape(-1) if image_tensor is not None else np.array([b""] * len(prompts))
                )
                out = []
                for text, image_bytes in zip(prompts, images):
                    prompt = parse_prompt(text.decode("utf-8") if isinstance(text, bytes) else str(text))
                    product = (
                        Image.open(io.BytesIO(image_bytes)).convert("RGBA") if image_bytes
                        else Image.new("RGBA", (64, 64), (128, 128, 128, 255))
                    )
                    buffer = io.BytesIO()
                    self.renderer.render(prompt, product).convert("RGB").save(buffer, format="PNG")
                    out.append(buffer.getvalue())
                pngs = np.array(out, dtype=np.object_).reshape(-1, 1)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PNG", pngs)]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"render: {type(exc).__name__}: {exc}")
                ))
        return responses
