"""MusicGen (transformers): the music family."""
