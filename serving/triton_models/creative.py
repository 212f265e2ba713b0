"""Triton python model ``creative`` (BLS): group + product -> K prompts from the group's ``gmllm`` version, rendered.

The live version is this model's ``gmllm_version`` parameter; ``group_versions``
(JSON ``{group id: version}``) routes some groups to another version
(per-group promotion). The group id is read from ``GROUP_TEXT``
(``group <id> | ...``). Making a version live (or rolling back) rewrites
these parameters and reloads ``creative`` only, a small model with no torch,
while the ``gmllm`` versions stay loaded — a switch, not a load. Prompts are rendered concurrently through ``render`` (async BLS,
so its dynamic batcher sees them together).

Inputs: those of ``gmllm``. Outputs: ``PROMPTS`` BYTES[K], ``VALID`` BOOL[K],
``PNGS`` BYTES[K] (empty where a prompt did not parse), ``MODEL_VERSION`` INT64[1].
"""

from __future__ import annotations

import asyncio
import json

import numpy as np

INPUTS = ("GROUP_TEXT", "PRODUCT", "PRODUCT_IMAGE", "K", "SEED", "TEMPERATURE")


def group_of(text: str | bytes) -> str | None:
    """The group id of a ``GROUP_TEXT`` (``group <id> | ...``), or None when it does not start with ``group``.

    >>> group_of("group lipstick/g0 | 60% of lipstick | ctr 4.0%"), group_of(b"group mugs/g1"), group_of("hello")
    ('lipstick/g0', 'mugs/g1', None)
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    head = text.split("|", 1)[0].strip()
    if not head.startswith("group "):
        return None
    return head[len("group "):].strip() or None


def version_param(value: str) -> int:
    """``gmllm_version``: a version number, -1 (Triton's newest) when missing or not a number."""
    try:
        return int(value or -1)
    except ValueError:
        return -1


def group_versions_param(value: str) -> tuple[dict[str, int], str]:
    """``group_versions`` (JSON ``{group id: version}``) and a complaint ("" when fine); a bad value routes no group.

    >>> group_versions_param('{"mugs/g0": 2}'), group_versions_param(""), group_versions_param("[1]")[0]
    (({'mugs/g0': 2}, ''), ({}, ''), {})
    """
    if not value.strip():
        return {}, ""
    try:
        raw = json.loads(value)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return {str(g): int(v) for g, v in raw.items()}, ""
    except (ValueError, TypeError) as exc:
        return {}, (f"parameter group_versions {value[:80]!r} is not a JSON object of group id -> version ({exc}); "
                    "every group gets gmllm_version; rewrite it with serving.repository.creative_config")


class TritonPythonModel:
    """Chains ``gmllm`` (the group's version) and ``render``."""

    def initialize(self, args):  # noqa: ANN001, ANN201
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.gmllm_version = version_param(params.get("gmllm_version", ""))
        self.group_versions, complaint = group_versions_param(params.get("group_versions", ""))
        if complaint:
            try:
                import triton_python_backend_utils as pb_utils

                pb_utils.Logger.log_warn(f"creative: {complaint}")
            except Exception:  # noqa: BLE001 - no logger outside Triton
                pass

    def version_for(self, group_text: str | bytes) -> int:
        """The ``gmllm`` version that serves the group of ``group_text``."""
        group = group_of(group_text)
        return self.group_versions.get(group, self.gmllm_version) if group is not None else self.gmllm_version

    async def execute(self, requests):  # noqa: ANN001, ANN201
        import triton_python_backend_utils as pb_utils

        return list(await asyncio.gather(*(self._one(pb_utils, request) for request in requests)))

    async def _one(self, pb_utils, request):  # noqa: ANN001, ANN202
        try:
            inputs = [t for name in INPUTS if (t := pb_utils.get_input_tensor_by_name(request, name)) is not None]
            text = pb_utils.get_input_tensor_by_name(request, "GROUP_TEXT").as_numpy().reshape(-1)[0]
            generated = await pb_utils.InferenceRequest(
                model_name="gmllm", model_version=self.version_for(text), inputs=inputs,
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
