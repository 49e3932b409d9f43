"""Keep the libraries' internal warnings and loading bars out of what users see."""

from __future__ import annotations

import functools
import logging
import os
import warnings


@functools.cache
def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|diffusers|torch)\b.*")
    warnings.filterwarnings("ignore", message=r".*(deprecated|torchvision|NSFW|safety).*")
    for name in ("transformers", "diffusers", "torchao", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
