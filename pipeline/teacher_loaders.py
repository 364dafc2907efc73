"""The model libraries a teacher can come from: timm, Hugging Face ``transformers``, open_clip image towers,
and the project's own texture stand-ins.

A loader turns a spec's ``arch`` and ``kwargs`` into a module with random init, loads a checkpoint's
tensors into it strictly (every key as stored; transformers through its own mapping of the hub's key
names), runs the module on preprocessed pixels, and says what it outputs. The spec alone decides the architecture, whatever the library: a hub repo's config.json or
open_clip_config.json is never consulted, so a changed hub file cannot silently change a teacher, and every
entry builds on the meta device. No loader runs code from a model repo (no ``trust_remote_code``).

Outputs are named so the pooling rules are one table for every library: ``tokens`` [B, N, C] with
``prefix`` leading tokens (CLS + registers), and ``pooled`` [B, P], the library's own pooled embedding
(timm's pre-logits head, transformers' ``pooler_output``, the open_clip image tower's output).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import Tensor, nn

from pipeline.texture_bank import MODELS as TEXTURE_MODELS
from pipeline.weights import WeightsError, load_strict


@dataclass(frozen=True)
class Outputs:
    """What one forward pass gives the pooling rules."""

    tokens: Tensor | None
    prefix: int
    pooled: Tensor | None


@dataclass(frozen=True)
class Shape:
    """Widths of a built module's outputs, read from the module (no forward pass), to check specs at build."""

    token_width: int | None
    prefix: int
    has_cls: bool
    pooled_width: int | None


class Loader:
    """What every loader shares: the hub files it reads, and how a checkpoint's tensors reach the module."""

    hub_files = ("model.safetensors", "pytorch_model.bin")  # timm's own order: the pickle only as a fallback

    def load(self, arch: str, kwargs: dict, state: dict[str, Tensor], what: str) -> nn.Module:
        """The architecture holding ``state``: every key as stored, none missing, none left over."""
        module = self.create(arch, kwargs)
        load_strict(module, state, what)
        return module


class TimmLoader(Loader):
    """Any timm architecture by name, with the spec's kwargs; layers named in kwargs (``*_layer``) resolved."""

    def create(self, arch: str, kwargs: dict) -> nn.Module:
        resolved = {k: _layer(v) if k.endswith("_layer") and isinstance(v, str) else v for k, v in kwargs.items()}
        return timm.create_model(arch, pretrained=False, **{"num_classes": 0, **resolved})  # a feature extractor: no head

    def forward(self, module: nn.Module, pixels: Tensor) -> Outputs:
        features = module.forward_features(pixels)
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features  # a CNN map: one token per cell
        return Outputs(tokens, getattr(module, "num_prefix_tokens", 0), module.forward_head(features, pre_logits=True))

    def shape(self, module: nn.Module) -> Shape:
        has_cls = getattr(module, "cls_token", None) is not None
        return Shape(module.num_features, getattr(module, "num_prefix_tokens", 0), has_cls, module.num_features)


class TransformersLoader(Loader):
    """A ``transformers`` vision backbone: ``arch`` is the config's ``model_type`` (``vit``, ``dinov2``,
    ``dinov2_with_registers``), ``kwargs`` its config values; built with ``AutoModel.from_config``.
    Checkpoints are read as safetensors only."""

    hub_files = ("model.safetensors",)
    model_arguments = ("add_pooling_layer",)  # kwargs of the model class, not of its config

    def create(self, arch: str, kwargs: dict) -> nn.Module:
        from transformers import AutoModel

        config, model_kwargs = self._config(arch, kwargs)
        return AutoModel.from_config(config, **model_kwargs)

    def load(self, arch: str, kwargs: dict, state: dict[str, Tensor], what: str) -> nn.Module:
        """Through the library's own loading, which maps the hub's stored key names onto the module's (they differ
        in transformers 5), in float32 whatever the stored dtype, refusing any key missing, left over or misshapen."""
        from transformers import MODEL_MAPPING

        config, model_kwargs = self._config(arch, kwargs)
        module, info = MODEL_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=state, dtype=torch.float32, output_loading_info=True, **model_kwargs)
        problems = {kind: sorted(map(str, info[kind]))[:5] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[kind]}
        if problems:
            raise WeightsError(f"{what}: the checkpoint does not fit the spec's architecture: {problems}")
        return module

    def _config(self, arch: str, kwargs: dict):
        from transformers import AutoConfig

        model_kwargs = {k: v for k, v in kwargs.items() if k in self.model_arguments}
        return AutoConfig.for_model(arch, **{k: v for k, v in kwargs.items() if k not in model_kwargs}), model_kwargs

    def forward(self, module: nn.Module, pixels: Tensor) -> Outputs:
        out = module(pixel_values=pixels)
        return Outputs(out.last_hidden_state, self.shape(module).prefix, getattr(out, "pooler_output", None))

    def shape(self, module: nn.Module) -> Shape:
        config = module.config
        # DINOv2 models pool by layer-normed CLS and have no pooler module; ViTModel's is None without add_pooling_layer.
        pooled = getattr(config, "pooler_output_size", None) or config.hidden_size if getattr(module, "pooler", True) is not None else None
        return Shape(config.hidden_size, 1 + getattr(config, "num_register_tokens", 0), True, pooled)


class OpenClipLoader(Loader):
    """An open_clip model's image tower: ``arch`` is a built-in open_clip model name, ``kwargs`` override its
    model config (a CONCH-style repo's ``model_cfg`` given whole: ``embed_dim``, ``vision_cfg``, ``text_cfg``).
    The checkpoint holds the whole CLIP model; the teacher is ``visual`` and its ``visual.*`` keys, loaded strictly."""

    hub_files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # the .bin through weights_only only

    def create(self, arch: str, kwargs: dict) -> nn.Module:
        import open_clip

        # open_clip moves the model to ``device`` at the end: the ambient one, so a meta-device build stays free.
        model = open_clip.create_model(arch, pretrained=None, load_weights=False, pretrained_text=False, device=torch.get_default_device(), **kwargs)
        return model.visual

    def load(self, arch: str, kwargs: dict, state: dict[str, Tensor], what: str) -> nn.Module:
        tower = {key.removeprefix("visual."): value for key, value in state.items() if key.startswith("visual.")}
        return super().load(arch, kwargs, tower, what)

    def forward(self, module: nn.Module, pixels: Tensor) -> Outputs:
        return Outputs(None, 0, module(pixels))  # encode_image without normalisation (CONCH's proj_contrast=False is a tower setting)

    def shape(self, module: nn.Module) -> Shape:
        return Shape(None, 0, False, module.output_dim)


class TextureLoader(Loader):
    """The project's own texture stand-ins (pipeline/texture_bank.py): ``arch`` names one, ``kwargs`` its sizes.
    Its tokens are cells of a square grid with no prefix tokens; it has no pooled output of its own."""

    hub_files = ("model.safetensors",)

    def create(self, arch: str, kwargs: dict) -> nn.Module:
        if arch not in TEXTURE_MODELS:
            raise ValueError(f"unknown texture stand-in {arch!r}: choose one of {list(TEXTURE_MODELS)}")
        return TEXTURE_MODELS[arch](**kwargs)

    def forward(self, module: nn.Module, pixels: Tensor) -> Outputs:
        return Outputs(module(pixels), 0, None)

    def shape(self, module: nn.Module) -> Shape:
        return Shape(module.num_features, 0, False, None)


LOADERS = {"timm": TimmLoader(), "transformers": TransformersLoader(), "open_clip": OpenClipLoader(), "texture": TextureLoader()}


def _layer(name: str) -> type[nn.Module]:
    for namespace in (torch.nn, timm.layers):
        if hasattr(namespace, name):
            return getattr(namespace, name)
    raise ValueError(f"unknown layer {name!r}: neither torch.nn nor timm.layers has it")
