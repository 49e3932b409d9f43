"""muselab: text to music (MusicGen) and text to image (Stable Diffusion) on your own machine."""

__version__ = "0.1.0"
