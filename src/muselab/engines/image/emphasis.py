"""AUTOMATIC1111's prompt syntax for Stable Diffusion: emphasis and prompts over 75 tokens.

`(word)` multiplies the word's attention by 1.1, `((word))` by 1.21, `[word]` divides it by 1.1,
`(word:1.3)` sets 1.3; `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters; `BREAK` starts a new
chunk. CLIP reads 75 tokens at a time, so a longer prompt is cut into chunks of 75 (back to the
last comma when one is within 20 tokens of the cut), each encoded on its own between its start and
end tokens, and their hidden states are laid end to end: the UNet's cross-attention takes any
length. Each token's hidden state is then multiplied by its weight, and each chunk's mean restored
("Original" emphasis), as A1111 does, so that prompts written for A1111 mean the same here.

The parser follows `parse_prompt_attention` in diffusers' community pipeline
examples/community/lpw_stable_diffusion.py (Apache-2.0), with A1111's later additions as its wiki
("Features: Attention/emphasis") describes them: spaces around a weight, and BREAK.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from muselab.schemas import RequestError

_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|     # escaped brackets and backslash; a lone backslash is dropped
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|         # the end of (text:1.3)
\)|]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
CHUNK = 75  # tokens of prompt in each of CLIP's 77 positions, between its start and end tokens
BACKTRACK = 20  # A1111's default "comma padding backtrack"
BREAK = ("BREAK", -1.0)

Chunk = tuple[list[int], list[float]]


def parse(text: str) -> list[tuple[str, float]]:
    """A1111's pieces of `text` with their weights, runs of equal weight merged, each BREAK a piece
    ("BREAK", -1). Brackets left open apply to the end of the prompt; stray closing ones are text."""
    pieces: list[list[Any]] = []
    breaks: set[int] = set()
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for index in range(start, len(pieces)):
            if index not in breaks:  # A1111 would scale BREAK's -1 too, and then read "BREAK" as text
                pieces[index][1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            try:
                multiply(rounds.pop(), float(weight))
            except ValueError:
                raise RequestError(f"prompt: '{token}' does not end with a number, as in (word:1.3)") from None
        elif token == ")" and rounds:
            multiply(rounds.pop(), 1.1)
        elif token == "]" and squares:
            multiply(squares.pop(), 1 / 1.1)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    breaks.add(len(pieces))
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in rounds:
        multiply(start, 1.1)
    for start in squares:
        multiply(start, 1 / 1.1)

    merged: list[tuple[str, float]] = []
    for index, (part, weight) in enumerate(pieces or [["", 1.0]]):
        if merged and index not in breaks and index - 1 not in breaks and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + part, weight)
        else:
            merged.append((part, weight))
    return merged


def plain(text: str) -> str | None:
    """`text` with its syntax removed (`(word:1.0)` -> `word`, `\\(` -> `(`) when every weight is
    exactly 1 and there is no BREAK, so the pipeline may encode it as it is; else None."""
    pieces = parse(text)
    return None if any(weight != 1.0 for _, weight in pieces) else "".join(part for part, _ in pieces)


def weights_record(prompt: str, negative_prompt: str | None) -> dict[str, list[tuple[str, float]]]:
    """For the recipe: the parse of each prompt whose weights are not all 1 (or that has a BREAK)."""
    texts = {"prompt": prompt, "negative_prompt": negative_prompt or ""}
    return {name: parse(text) for name, text in texts.items() if plain(text) is None}


def pipeline_inputs(pipe: Any, prompt: str, negative_prompt: str | None) -> dict[str, Any]:
    """What a diffusers SD pipeline call takes in place of `prompt=`/`negative_prompt=`: the plain
    prompts when neither has emphasis, a BREAK or over 75 tokens (so the pipeline encodes them
    exactly as it always has); else `prompt_embeds` and `negative_prompt_embeds`, the same length."""
    negative_prompt = negative_prompt or ""
    texts = (plain(prompt), plain(negative_prompt))
    if all(text is not None and len(_token_ids(pipe.tokenizer, text)) <= CHUNK for text in texts):
        return {"prompt": texts[0], "negative_prompt": texts[1] or None}
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise RequestError(
            "prompt: emphasis and prompts over 75 tokens work with SD 1.x/2.x models; this model has two "
            "text encoders (SDXL-style). Remove the brackets, weights and BREAKs, or shorten the prompts."
        )
    chunks = [chunked(pipe.tokenizer, parse(text)) for text in (prompt, negative_prompt)]
    # Both sides of classifier-free guidance must be as long: pad with empty chunks, as A1111 does.
    count = max(len(side) for side in chunks)
    embeds = [encode(pipe, side + [([], [])] * (count - len(side))) for side in chunks]
    return {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


def chunked(tokenizer: Any, pieces: list[tuple[str, float]]) -> list[Chunk]:
    """The pieces' tokens and weights in chunks of at most 75, cut where A1111 cuts them."""
    comma = tokenizer.get_vocab().get(",</w>")
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for part, weight in pieces:
        if (part, weight) == BREAK:
            chunks.append((tokens, weights))
            tokens, weights, last_comma = [], [], -1
            continue
        for token in _token_ids(tokenizer, part):
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= BACKTRACK:
                # Words after a comma near the cut move to the next chunk whole, not split across two.
                cut = last_comma + 1
                chunks.append((tokens[:cut], weights[:cut]))
                tokens, weights, last_comma = tokens[cut:], weights[cut:], -1
            if len(tokens) == CHUNK:
                chunks.append((tokens, weights))
                tokens, weights, last_comma = [], [], -1
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        chunks.append((tokens, weights))
    return chunks


def encode(pipe: Any, chunks: list[Chunk]) -> torch.Tensor:
    """The chunks' weighted hidden states, end to end: shape (1, 77 * len(chunks), hidden)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    # Laid out as diffusers' own tokenizer call pads (start, tokens, end, then pad), so an unweighted
    # chunk encodes bit for bit as the pipeline would. SD 1.x pads with the end token, as A1111 does.
    ids = [
        [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (CHUNK - len(tokens))
        for tokens, _ in chunks
    ]
    weights = torch.tensor([[1.0, *w] + [1.0] * (CHUNK + 1 - len(w)) for _, w in chunks])
    device = getattr(pipe, "_execution_device", encoder.device)  # where a CPU-offloaded encoder runs
    with torch.inference_mode():
        hidden = encoder(torch.tensor(ids, device=device))[0]
        if (weights != 1.0).any():
            # A1111's "Original" emphasis, chunk by chunk: weight each token, then restore the mean.
            z = hidden.float()
            mean = z.mean(dim=(1, 2), keepdim=True)
            z = z * weights.to(z.device)[..., None]
            new_mean = z.mean(dim=(1, 2), keepdim=True)
            # CLIP's final layer norm gives real models a clearly nonzero mean; one whose states average
            # to about 0 (a random model's unbiased norm) would be blown to inf by the division, and
            # there the mean has nothing to restore.
            negligible = 1e-3 * z.abs().mean(dim=(1, 2), keepdim=True)
            restorable = (mean.abs() > negligible) & (new_mean.abs() > negligible)
            hidden = torch.where(restorable, z * (mean / new_mean), z)
        return hidden.reshape(1, -1, hidden.shape[-1]).to(dtype=encoder.dtype, device=device)
