"""Triton python model ``creative`` (BLS): group + product -> K prompts from the live ``gmllm`` version, rendered.

The live version is this model's ``gmllm_version`` parameter: making a version
live (or rolling back) rewrites it and reloads ``creative`` only, a small
model with no torch, while both ``gmllm`` versions stay loaded — a switch,
not a load. Prompts are rendered concurrently through ``render`` (async BLS,
so its dynamic batcher sees them together).

Inputs: those of ``gmllm``. Outputs: ``PROMPTS`` BYTES[K], ``VALID`` BOOL[K],
``PNGS`` BYTES[K] (empty where a prompt did not parse), ``MODEL_VERSION`` INT64[1].
"""

from __future__ import annotations

import asyncio
import json

import numpy as np

INPUTS = ("GROUP_TEXT", "PRODUCT", "PRODUCT_IMAGE", "K", "SEED", "TEMPERATURE")


class TritonPythonModel:
    """Chains ``gmllm`` (live version) and ``render``."""

    def initialize(self, args):  # noqa: ANN001, ANN201
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.gmllm_version = int(params.get("gmllm_version", "-1") or -1)

    async def execute(self, requests):  # noqa: ANN001, ANN201
        import triton_python_backend_utils as pb_utils

        return list(await asyncio.gather(*(self._one(pb_utils, request) for request in requests)))

    async def _one(self, pb_utils, request):  # noqa: ANN001, ANN202
        try:
            inputs = [t for name in INPUTS if (t := pb_utils.get_input_tensor_by_name(request, name)) is not None]
            generated = await pb_utils.InferenceRequest(
                model_name="gmllm", model_version=self.gmllm_version, inputs=inputs,
                requested_output_names=["PROMPTS", "VALID", "MODEL_VERSION"],
            ).async_exec()
            if generated.has_error():
                raise RuntimeError(generated.error().message())
            prompts = pb_utils.get_output_tensor_by_name(generated, "PROMPTS").as_numpy().reshape(-1)
            valid = pb_utils.get_output_tensor_by_name(generated, "VALID").as_numpy().reshape(-1)
            version = pb_utils.get_output_tensor_by_name(generated, "MODEL_VERSION").as_numpy()
            image = pb_utils.get_input_tensor_by_name(request, "PRODUCT_IMAGE")
            image_bytes = image.as_numpy().reshape(-1)[0] if image is not None else b""
            renders = [
                pb_utils.InferenceRequest(
                    model_name="render", requested_output_names=["PNG"],
                    inputs=[pb_utils.Tensor("PROMPT", np.array([[p]], dtype=np.object_)),
                            pb_utils.Tensor("PRODUCT_IMAGE", np.array([[image_bytes]], dtype=np.object_))],
                ).async_exec()
                for p, ok in zip(prompts, valid) if ok
            ]
            rendered = iter(await asyncio.gather(*renders))
            pngs = []
            for ok in valid:
                if not ok:
                    pngs.append(b"")
                    continue
                response = next(rendered)
                if response.has_error():
                    raise RuntimeError(response.error().message())
                pngs.append(pb_utils.get_output_tensor_by_name(response, "PNG").as_numpy().reshape(-1)[0])
            return pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("PROMPTS", prompts.astype(np.object_)),
                pb_utils.Tensor("VALID", valid.astype(np.bool_)),
                pb_utils.Tensor("PNGS", np.array(pngs, dtype=np.object_)),
                pb_utils.Tensor("MODEL_VERSION", version.astype(np.int64)),
            ])
        except Exception as exc:
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(f"creative: {type(exc).__name__}: {exc}")
            )
