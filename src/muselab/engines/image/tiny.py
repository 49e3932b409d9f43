"""The tiny random-weight Stable Diffusion 1.x pipeline and TAESD decoder, built offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from muselab.testing.tiny import TINY_SEED, build_tiny_clip_tokenizer, save_atomically


def sd1_scheduler() -> Any:
    """The SD 1.x checkpoints' own scheduler: PNDM with scaled-linear betas."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def build_tiny_stable_diffusion(path: str | Path, replace: bool = True, inpainting: bool = False) -> Path:
    """Write a tiny SD 1.x-shaped pipeline (UNet, KL VAE, CLIP text, safety checker) to `path`;
    `inpainting`: an inpainting checkpoint's (a 9-channel UNet: latents, mask, masked picture)."""
    from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(TINY_SEED)
    tokenizer = build_tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    safety_config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        },
        projection_dim=32,
    )
    safety_checker = StableDiffusionSafetyChecker(safety_config)
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = (StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline)(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=sd1_scheduler(),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=True,
    )
    return save_atomically(path, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), replace)


def build_tiny_taesd(path: str | Path, replace: bool = True) -> Path:
    """Write a tiny TAESD-shaped autoencoder (AutoencoderTiny) matching the tiny SD's 2x latents."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(TINY_SEED)
    decoder = AutoencoderTiny(
        encoder_block_out_channels=(16, 16),
        decoder_block_out_channels=(16, 16),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    )
    return save_atomically(path, lambda tmp: decoder.save_pretrained(tmp, safe_serialization=True), replace)


def build_tiny_lora(
    model_folder: str | Path, path: str | Path, kohya: bool = False, rank: int = 4, seed: int = TINY_SEED
) -> Path:
    """Write a LoRA for the SD 1.x pipeline in `model_folder` to the file `path` (.safetensors):
    random low-rank updates of the UNet's attention projections and the text encoder's, strong
    enough to change the picture. `kohya` writes kohya-ss's key names (`lora_unet_..._to_q.lora_down
    .weight` with an `alpha` each), which most LoRAs shared online use; else diffusers' own."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    folder = Path(model_folder)
    parts = {
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
        "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder"),
    }
    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in parts.items():
        # peft itself, not transformers' add_adapter (which wants a newer peft than the registry has).
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets[prefix], init_lora_weights=False)
        inject_adapter_in_model(config, module)
        for key, value in get_peft_model_state_dict(module).items():
            value = value.detach().contiguous() * 0.5
            if not kohya:
                tensors[f"{prefix}.{key}"] = value
                continue
            layer, _, which = key.rpartition(".lora_")  # "down_blocks.0....to_q", "A.weight"
            name = ("lora_unet_" if prefix == "unet" else "lora_te_") + layer.replace(".", "_")
            tensors[f"{name}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def build_tiny_lcm_lora(path: str | Path, replace: bool = True) -> Path:
    """A folder shaped like latent-consistency/lcm-lora-sdv1-5 (one pytorch_lora_weights.safetensors)
    holding a LoRA for the tiny SD beside it: the fast tier's stand-in (random, like the tiny models)."""
    from muselab.engines.image.speed import LCM_LORA_FILE
    from muselab.testing.tiny import ensure_tiny_model

    path = Path(path)
    model = ensure_tiny_model(path.parent, "image")
    return save_atomically(path, lambda tmp: build_tiny_lora(model, Path(tmp) / LCM_LORA_FILE, seed=11), replace)
