"""Production renderer: Stable Diffusion + ControlNet (canny) from a local checkpoint directory.

The product must stay intact while the background follows the prompt, so:

1. the product cut-out is laid out where the template renderer would put it
   (``position``, ``scale``) on a blank canvas, and the canny edges of that
   layout are the ControlNet condition (the generated scene is built around
   the product's silhouette);
2. the text prompt describes the background, palette and style in words
   (:func:`describe`);
3. the product's own pixels are pasted back over the generated image at the
   same place, and the copy line is drawn as a banner exactly like the
   template renderer does (diffusion models cannot be trusted with text).

Any SD1.5-style pipeline directory (diffusers layout: ``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) and
any canny ControlNet directory work; both are read offline, safetensors only.
Select it with ``render.kind: diffusion`` and ``render.checkpoint`` in the
settings (:func:`serving.render.factory.make_renderer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serving.render.template import TemplateRenderer
from infra.contracts.prompt import CreativePrompt

NEGATIVE_PROMPT = "text, watermark, logo, blurry, distorted product, low quality"


class RendererLoadError(ValueError):
    """The diffusion checkpoint directory is missing or incomplete; the message names the directory."""


def describe(prompt: CreativePrompt) -> str:
    """The creative prompt as a text-to-image prompt.

    >>> from infra.contracts.prompt import parse_prompt
    >>> describe(parse_prompt('background=dots; palette=red,white; position=left; scale=0.5; copy="Sale"; style=bold'))
    'product advertisement photo, red and white polka dot background, bold style, product on the left, clean studio lighting'
    """
    pattern = {
        "solid": "plain {a} background",
        "gradient": "smooth gradient background from {a} to {b}",
        "stripes": "{a} and {b} diagonal striped background",
        "dots": "{a} and {b} polka dot background",
        "spotlight": "{b} spotlight on a {a} background",
        "split": "background split into {a} and {b} halves",
    }[prompt.background].format(a=prompt.palette[0], b=prompt.palette[1])
    parts = ["product advertisement photo", pattern]
    if prompt.style:
        parts.append(" ".join(prompt.style) + " style")
    parts.append("product in the center" if prompt.position == "center" else f"product on the {prompt.position}")
    parts.append("clean studio lighting")
    return ", ".join(parts)


def canny(gray: np.ndarray, low: float = 0.1, high: float = 0.2, sigma: float = 1.0) -> np.ndarray:
    """Canny edges of a grey image in [0, 1]: smoothing, Sobel, non-maximum suppression, hysteresis.

    >>> square = np.zeros((32, 32)); square[8:24, 8:24] = 1.0
    >>> edges = canny(square)
    >>> bool(edges[8:24, 7:10].any()), bool(edges[14:18, 14:18].any())
    (True, False)
    """
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(gray.astype(np.float64), sigma)
    gx = ndimage.sobel(smooth, axis=1)
    gy = ndimage.sobel(smooth, axis=0)
    magnitude = np.hypot(gx, gy)
    if magnitude.max() > 0:
        magnitude /= magnitude.max()
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    direction = (np.round(angle / 45.0).astype(int)) % 4  # 0: horizontal gradient, 1: 45°, 2: vertical, 3: 135°
    offsets = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    keep = np.zeros_like(magnitude, dtype=bool)
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape
    for d, (dy, dx) in offsets.items():
        ahead = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        behind = padded[1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        keep |= (direction == d) & (magnitude >= ahead) & (magnitude >= behind)
    thin = magnitude * keep
    strong = thin >= high
    weak = thin >= low
    labels, count = ndimage.label(weak, structure=np.ones((3, 3)))
    if count == 0:
        return np.zeros_like(strong)
    connected = np.zeros(count + 1, dtype=bool)
    connected[np.unique(labels[strong])] = True
    connected[0] = False
    return connected[labels]


class DiffusionRenderer:
    """Render creative prompts with Stable Diffusion + a canny ControlNet, keeping the product's pixels.

    Parameters
    ----------
    checkpoint
        Local SD1.5-style pipeline directory (diffusers layout).
    controlnet
        Local ControlNet directory; default ``<checkpoint>/controlnet``.
    size
        Side of the square output image (a multiple of 8 for real SD checkpoints).
    steps, guidance_scale, controlnet_scale
        Denoising steps, classifier-free guidance and weight of the control.
    device
        Torch device, e.g. ``cpu`` or ``cuda``.
    seed
        Seed of the initial noise: the same prompt, product and seed give the same image.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        controlnet: str | Path | None = None,
        *,
        size: int = 512,
        steps: int = 20,
        guidance_scale: float = 7.5,
        controlnet_scale: float = 1.0,
        device: str = "cpu",
        seed: int = 0,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.controlnet_path = Path(controlnet) if controlnet is not None else self.checkpoint / "controlnet"
        self.size = size
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.controlnet_scale = controlnet_scale
        self.device = device
        self.seed = seed
        self.layout = TemplateRenderer(size=size)
        self.pipeline = self._load()

    def _load(self) -> Any:
        import torch
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
        from diffusers.utils import logging as diffusers_logging

        if not (self.checkpoint / "model_index.json").is_file():
            raise RendererLoadError(
                f"{self.checkpoint}: no model_index.json; render.checkpoint must be a local diffusers "
                "Stable Diffusion pipeline directory"
            )
        if not (self.controlnet_path / "config.json").is_file():
            raise RendererLoadError(
                f"{self.controlnet_path}: no config.json; render.controlnet must be a local ControlNet directory"
            )
        diffusers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        controlnet = ControlNetModel.from_pretrained(
            self.controlnet_path, local_files_only=True, use_safetensors=True, torch_dtype=dtype
        )
        pipeline = StableDiffusionControlNetPipeline.from_pretrained(
            self.checkpoint,
            controlnet=controlnet,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
            use_safetensors=True,
            torch_dtype=dtype,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(self.device)

    def control_image(self, prompt: CreativePrompt, product_image: Image.Image) -> Image.Image:
        """Canny edges (white on black, RGB) of the product laid out where the prompt puts it."""
        canvas = self._product_layer(prompt, product_image)
        grey = np.asarray(canvas.convert("L"), dtype=np.float64) / 255.0
        edges = canny(grey)
        return Image.fromarray((edges * 255).astype(np.uint8), "L").convert("RGB")

    def _product_layer(self, prompt: CreativePrompt, product_image: Image.Image) -> Image.Image:
        box = self.layout.product_box(prompt, product_image)
        rgba = product_image if product_image.mode == "RGBA" else product_image.convert("RGBA")
        bbox = rgba.getchannel("A").getbbox() or (0, 0, rgba.width, rgba.height)
        product = rgba.crop(bbox).resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BICUBIC)
        layer = Image.new("RGBA", (self.size, self.size), (0, 0, 0, 0))
        layer.paste(product, box[:2], product)
        return layer

    def render(self, prompt: CreativePrompt, product_image: Image.Image) -> Image.Image:
        """The ad image (RGB, ``size`` × ``size``): generated scene, original product on top, copy banner."""
        import torch

        control = self.control_image(prompt, product_image)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        result = self.pipeline(
            prompt=describe(prompt),
            negative_prompt=NEGATIVE_PROMPT,
            image=control,
            height=self.size,
            width=self.size,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            controlnet_conditioning_scale=self.controlnet_scale,
            generator=generator,
            output_type="pil",
        )
        image = result.images[0].convert("RGB").resize((self.size, self.size))
        layer = self._product_layer(prompt, product_image)
        image.paste(layer, (0, 0), layer)
        if prompt.copy:
            self.layout._draw_banner(image, prompt)  # the template's banner, so both renderers show copy alike
        return image
