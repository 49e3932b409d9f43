"""Stable Diffusion (diffusers): the image family."""
