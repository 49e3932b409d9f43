"""Step caching for the balanced tier, in the manner of DeepCache (Ma, Fang and Wang, "DeepCache:
Accelerating Diffusion Models for Free", CVPR 2024): neighbouring denoising steps compute nearly
the same deep UNet features, so every `interval`-th step runs the whole UNet and keeps the
features that enter its last layer, and the steps between run only a shallow path: the input
convolution, that last layer (fed the kept features and the fresh skip connection) and the output
convolution. This is DeepCache's uniform schedule at its shallowest branch (branch 0), the setting
its SD 1.5 results use.

The deep and shallow paths are two plain modules over the UNet's own layers, so the same split runs
on PyTorch (sharing the weights) and on OpenVINO (two converted graphs: the UNet with the features
as a second output, and the small shallow graph).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

#: Full UNet every third step: 9 of the quality tier's 25 steps, the rest shallow. DeepCache's SD
#: 1.5 figures (2.3x at 0.05 CLIP score) use the same uniform schedule.
CACHE_INTERVAL = 3


def full_calls(steps: int, interval: int = CACHE_INTERVAL) -> int:
    """How many of `steps` UNet calls run the whole UNet (the first, then every `interval`-th)."""
    return -(-steps // interval)


def unsupported_reason(config: Any) -> str | None:
    """None if a UNet with this config can be split into deep and shallow paths, else why not."""
    if getattr(config, "addition_embed_type", None) is not None or getattr(config, "class_embed_type", None):
        return "its UNet takes extra conditioning (SDXL-style)"
    if getattr(config, "time_cond_proj_dim", None) is not None:
        return "its UNet takes a guidance embedding (LCM-style)"
    if getattr(config, "center_input_sample", False):
        return "its UNet centres its input"
    return None


def _last_layer(unet: Any) -> Any:
    return unet.up_blocks[-1].resnets[-1]


class DeepUNet(torch.nn.Module):
    """The whole UNet, float32 in and out, returning also the features that enter its last layer
    (before the skip connection is joined to them): what the shallow steps reuse."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kept: list[torch.Tensor] = []
        skip_channels = int(self.unet.conv_in.out_channels)

        def keep(module: Any, inputs: tuple[Any, ...]) -> None:
            joined = inputs[0]
            kept.append(joined[:, : joined.shape[1] - skip_channels])

        hook = _last_layer(self.unet).register_forward_pre_hook(keep)
        try:
            dtype = self.unet.dtype
            output = self.unet(sample.to(dtype), timestep, encoder_hidden_states.to(dtype), return_dict=False)[0]
        finally:
            hook.remove()
        return output.float(), kept[-1].float()


class ShallowUNet(torch.nn.Module):
    """The UNet's shallow path: time embedding, input convolution, the last up block's last layer
    (the kept deep features joined with the fresh skip connection) and the output convolution."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        features: torch.Tensor,
    ) -> torch.Tensor:
        unet = self.unet
        dtype = unet.dtype
        sample, features = sample.to(dtype), features.to(dtype)
        embedding = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if unet.time_embed_act is not None:
            embedding = unet.time_embed_act(embedding)
        skip = unet.conv_in(sample)
        block = unet.up_blocks[-1]
        hidden = block.resnets[-1](torch.cat([features, skip], dim=1), embedding)
        attentions = getattr(block, "attentions", None)
        if attentions:
            hidden = attentions[-1](hidden, encoder_hidden_states=encoder_hidden_states.to(dtype), return_dict=False)[0]
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden).float()


class SplitUNet(Protocol):
    """A UNet that can run its deep and shallow paths apart (PyTorch's or OpenVINO's)."""

    config: Any

    def deep(self, sample: torch.Tensor, timestep: Any, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole UNet's output and the deep features to keep."""

    def shallow(self, sample: torch.Tensor, timestep: Any, text: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The output from the shallow path over kept `features`."""


class TorchSplitUNet:
    """PyTorch's UNet run as its deep and shallow paths, sharing its weights."""

    def __init__(self, unet: torch.nn.Module):
        self.unet, self.config = unet, unet.config
        self._deep, self._shallow = DeepUNet(unet), ShallowUNet(unet)

    def deep(self, sample: torch.Tensor, timestep: Any, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._deep(sample, timestep, text)

    def shallow(self, sample: torch.Tensor, timestep: Any, text: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self._shallow(sample, timestep, text, features)


class StepCachedUNet(torch.nn.Module):
    """Stands in for the pipeline's UNet for one image: the first call and every `interval`-th one
    after it run the deep path and keep its features, the others the shallow path on them.
    Counts `full_calls` and `shallow_calls` (the benchmark reports them)."""

    def __init__(self, unet: Any, split: SplitUNet, interval: int = CACHE_INTERVAL):
        super().__init__()
        self._unet = [unet]  # a list: not registered as a submodule (an OpenVINO stand-in has no weights)
        self.split, self.interval, self.config = split, interval, unet.config
        self.full_calls = self.shallow_calls = 0
        self._features: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self._unet[0].dtype

    @property
    def device(self) -> torch.device:
        return self._unet[0].device

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        extra = [name for name, value in kwargs.items() if value is not None and value != {}]
        if args or extra:
            raise NotImplementedError(f"Step caching takes no extra UNet conditioning ({', '.join(extra) or 'args'}).")
        calls = self.full_calls + self.shallow_calls
        fits = self._features is not None and self._features.shape[0] == sample.shape[0]
        if calls % self.interval == 0 or not fits:
            output, self._features = self.split.deep(sample, timestep, encoder_hidden_states)
            self.full_calls += 1
        else:
            assert self._features is not None
            output = self.split.shallow(sample, timestep, encoder_hidden_states, self._features)
            self.shallow_calls += 1
        output = output.to(sample.dtype)
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)
