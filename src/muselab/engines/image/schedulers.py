"""Samplers by their A1111 names, built on a model's own scheduler config (diffusers)."""

from __future__ import annotations

import functools
from typing import Any

import torch


def make_scheduler(name: str, base_config: Any) -> Any:
    """A diffusers scheduler for an A1111 sampler name, built on the model's own scheduler config."""
    import diffusers

    config = dict(base_config)
    if name in ("DPM++ 2M Karras", "DPM++ 2M"):
        return diffusers.DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            use_karras_sigmas=name.endswith("Karras"),
            final_sigmas_type="zero",
        )
    classes = {
        "Euler a": diffusers.EulerAncestralDiscreteScheduler,
        "Euler": diffusers.EulerDiscreteScheduler,
        "DDIM": diffusers.DDIMScheduler,
        "PNDM": diffusers.PNDMScheduler,
        "LCM": diffusers.LCMScheduler,
    }
    return classes[name].from_config(config)


def steps_in_float32(scheduler: Any) -> Any:
    """Make the scheduler's `step` work on float32 model outputs and hand back latents in their own
    dtype. So the noise that ancestral samplers (`Euler a`, `LCM`) add between steps is drawn in
    float32 whatever the engine's dtype, as the starting noise is (`ImageEngine.initial_noise`),
    and the sampler's arithmetic runs in float32. On a float32 engine nothing changes."""
    step = scheduler.step

    # functools.wraps keeps `step`'s signature visible: diffusers passes `generator` and `eta`
    # only to a step whose signature names them.
    @functools.wraps(step)
    def float32_step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = step(model_output.float(), timestep, sample, *args, **kwargs)
        if isinstance(result, tuple):
            return (result[0].to(sample.dtype), *result[1:])
        result.prev_sample = result.prev_sample.to(sample.dtype)
        return result

    scheduler.step = float32_step
    return scheduler
