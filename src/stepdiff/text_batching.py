"""The text_encoder stage's batching: requests that Triton's dynamic batcher hands over together share
text-encoder forwards, grouped by the adapter's ``text_batch_key``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapters import GenerationParams, StepAdapter

Conditioning = dict[str, torch.Tensor]


def encode_batch(adapter: StepAdapter, batch: Sequence[GenerationParams]) -> list[Conditioning | Exception]:
    """Each request's conditioning, or the error that request met, in the batch's order.

    One ``encode_prompts`` call per group of equal ``text_batch_key`` (which includes the LoRA setting,
    activated for the group). A group whose call fails is encoded request by request, so that an error
    stays with the request that caused it.
    """
    groups: dict[object, list[int]] = {}
    for index, params in enumerate(batch):
        groups.setdefault(adapter.text_batch_key(params), []).append(index)
    results: dict[int, Conditioning | Exception] = {}
    for indices in groups.values():
        group = [batch[index] for index in indices]
        try:
            encoded: list[Conditioning | Exception] = list(encode_group(adapter, group))
        except Exception as error:  # noqa: BLE001 - this request's own error, or retried alone below
            encoded = [error] if len(group) == 1 else [encode_alone(adapter, params) for params in group]
        results.update(zip(indices, encoded, strict=True))
    return [results[index] for index in range(len(batch))]


def encode_group(adapter: StepAdapter, group: Sequence[GenerationParams]) -> list[Conditioning]:
    """One text-encoder forward for requests of one ``text_batch_key``."""
    adapter.activate_loras(group[0].loras)
    return adapter.encode_prompts(group)


def encode_alone(adapter: StepAdapter, params: GenerationParams) -> Conditioning | Exception:
    """One request's conditioning, or its error."""
    try:
        return encode_group(adapter, [params])[0]
    except Exception as error:  # noqa: BLE001 - the error goes back to this request alone
        return error
