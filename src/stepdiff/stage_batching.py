"""Batching of the text_encoder and vae_decode stages: the requests that Triton's dynamic batcher hands
over together share forwards, grouped by a key (``text_batch_key``; the latents' shape). A group whose
forward fails is run request by request, so that an error stays with the request that caused it.
A request alone runs exactly the call it ran before batching."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import numpy as np
import torch

from .adapters import GenerationParams, StepAdapter

Item = TypeVar("Item")
Result = TypeVar("Result")
Conditioning = dict[str, torch.Tensor]


def run_in_groups(
    items: Sequence[Item], key: Callable[[Item], Hashable], run: Callable[[Sequence[Item]], list[Result]]
) -> list[Result | Exception]:
    """Each item's result, or the error it met, in the items' order: one ``run`` per group of equal
    ``key``; a group whose ``run`` fails is run item by item."""
    groups: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(key(item), []).append(index)
    results: dict[int, Result | Exception] = {}
    for indices in groups.values():
        group = [items[index] for index in indices]
        try:
            done: list[Result | Exception] = list(run(group))
        except Exception as error:  # noqa: BLE001 - this item's own error, or retried alone below
            done = [error] if len(group) == 1 else [run_alone(run, item) for item in group]
        results.update(zip(indices, done, strict=True))
    return [results[index] for index in range(len(items))]


def run_alone(run: Callable[[Sequence[Item]], list[Result]], item: Item) -> Result | Exception:
    """One item's result, or its error."""
    try:
        return run([item])[0]
    except Exception as error:  # noqa: BLE001 - the error goes back to this item alone
        return error


def encode_batch(adapter: StepAdapter, batch: Sequence[GenerationParams]) -> list[Conditioning | Exception]:
    """Each request's conditioning, or its error: one ``encode_prompts`` call per ``text_batch_key``
    (which includes the LoRA setting, activated for the group)."""

    def encode_group(group: Sequence[GenerationParams]) -> list[Conditioning]:
        adapter.activate_loras(group[0].loras)
        return adapter.encode_prompts(group)

    return run_in_groups(batch, adapter.text_batch_key, encode_group)


def decode_batch(adapter: StepAdapter, batch: Sequence[torch.Tensor]) -> list[np.ndarray | Exception]:
    """Each request's image [1, height, width, 3], or its error: one ``decode`` of the concatenated
    latents per latent shape (each request's latents are [1, ...], checked by ``check_latents``)."""

    def decode_group(group: Sequence[torch.Tensor]) -> list[np.ndarray]:
        images = adapter.decode(torch.cat(list(group)))
        return [images[index : index + 1] for index in range(len(group))]

    return run_in_groups(batch, lambda latents: tuple(latents.shape), decode_group)


def warm_up_encode(adapter: StepAdapter, max_count: int) -> None:
    """Encode every batch the stage can form of the pipeline's default request (``max_count`` prompts
    down to 1), as served: graphed text encoders (``encoder=graphs``) capture their graph of each batch
    size before the first request instead of during it."""
    info = adapter.info
    params = GenerationParams(
        prompt="",
        negative_prompt=None,
        seed=0,
        num_inference_steps=info.default_steps,
        guidance_scale=info.default_guidance_scale,
        height=info.default_height,
        width=info.default_width,
        scheduler=info.default_scheduler,
        true_cfg_scale=info.default_true_cfg_scale,
    )
    with torch.inference_mode():
        for count in range(max_count, 0, -1):
            for result in encode_batch(adapter, [params] * count):
                if isinstance(result, Exception):
                    raise result


def warm_up_decode(
    adapter: StepAdapter, sizes: Sequence[tuple[int, int]], max_count: int
) -> tuple[list[tuple[int, ...]], list[tuple[int, int, int]]]:
    """Decode every batch the stage can form of each (height, width): ``max_count`` zero latents down to
    1, the largest size first, so that PyTorch's caching allocator reserves the decode's peak memory, and
    the libraries their per-shape plans, before the first request (on an H200 soak over three sizes,
    ``vae_decode`` otherwise took 1.3 GiB more after 4.5 minutes of load).

    Returns the decoded images' shapes, in order, and the batches (height, width, count) that ran out of
    GPU memory: those are skipped (served, such a batch fails and is decoded request by request)."""
    shapes: list[tuple[int, ...]] = []
    too_large: list[tuple[int, int, int]] = []
    with torch.inference_mode():
        for height, width in sorted(sizes, key=lambda size: size[0] * size[1], reverse=True):
            for count in range(max_count, 0, -1):
                try:
                    shapes.append(adapter.decode(adapter.warmup_latents(height, width, count)).shape)
                except torch.cuda.OutOfMemoryError:
                    if count == 1:  # one request of this size cannot be served: the start fails, saying so
                        raise
                    too_large.append((height, width, count))
                    torch.cuda.empty_cache()
    return shapes, too_large
