"""The denoiser runner: batch assembly into fixed buffers, and replay of captured CUDA graphs.

Adapters describe what each request adds to a forward (``Rows``: tensors batched along dim 0 and a
key naming everything else the call depends on) and own the eager denoiser call (``forward``). The
runner groups rows by key, pads them up to a row bucket, copies them into that (key, bucket)'s
preallocated buffers and runs the call there:

- ``exact``: on CUDA the adapter's own eager call, captured once per (key, bucket) in a CUDA graph
  and replayed (the same kernels as eager, without their launch cost); on CPU the same buffers, eager.
- ``compiled``: the call through ``torch.compile`` (Inductor), captured and replayed the same way on
  CUDA. Faster for large batches, not bit-identical to diffusers. Its smallest bucket is 2 rows: a
  lone row is padded to 2, so that one graph with a dynamic batch serves every bucket up to 63 rows
  (Dynamo compiles a batch of 1 apart: the first of three UNet compiles, up to 83 s of a 290 s cold
  start on an H200).
- ``eager``: buffers without graphs (a reference, and the fallback when a capture fails).

Padding rows repeat the group's first row: every denoiser here treats rows independently, so they
change real rows only as much as a larger batch does. In ``exact`` a request alone fills a bucket of
its exact size (1 or 2 rows), so it runs the stock call's kernels.

``GraphedCall`` does the same for the other stages' calls (text encoders, the VAE decode), without
buckets: one graph per distinct call, captured on its first use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .settings import MODES, cache_folder

# Every even row count up to 32 and every 4th up to 64: requests bring 2 rows each with guidance, so a
# batch pads by at most 2 rows (coarser buckets padded a typical 29-row batch to 32, 10% of the forward).
ROW_BUCKETS = (1, *range(2, 33, 2), *range(36, 65, 4))
COMPILE_CACHE = cache_folder() / "inductor"
log = logging.getLogger(__name__)


@dataclass
class Rows:
    """What one request adds to a denoiser forward: ``tensors`` batched along dim 0 (n rows each)."""

    key: Hashable
    tensors: dict[str, torch.Tensor]

    @property
    def count(self) -> int:
        return next(iter(self.tensors.values())).shape[0]


Forward = Callable[[Hashable, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class Bucket:
    """Preallocated inputs for one (key, row count), and the graph replaying the forward on them."""

    inputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    output: torch.Tensor | None = None
    uses: int = 0


@dataclass
class RunnerStats:
    """What the runner has done: graphs captured (time, memory reserved meanwhile), padding, last run's forwards."""

    graphs: int = 0
    capture_seconds: float = 0.0
    graph_memory_bytes: int = 0
    padded_rows: int = 0
    forwards: list[int] = field(default_factory=list)  # rows per forward of the last ``run``


def compiled(function: Callable, **options: Any) -> Callable:
    """``function`` through ``torch.compile`` (Inductor; ``options`` are torch.compile's), its kernels cached
    on disk (``COMPILE_CACHE``, unless TORCHINDUCTOR_CACHE_DIR names another place): a restart loads them
    instead of compiling again."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))
    return torch.compile(function, **options)


def capture_graph(
    call: Callable[[], Any], device: torch.device, side_stream: torch.cuda.Stream, pool: Any
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``call`` captured in a CUDA graph in the memory ``pool``, after two warm-up runs on ``side_stream``
    (as capture needs); returns the graph and the output of the captured call. Raises what the warm-up
    or the capture raised; the current stream waits for the side stream either way."""
    current = torch.cuda.current_stream(device)
    side_stream.wait_stream(current)
    try:
        with torch.cuda.stream(side_stream):
            for _ in range(2):
                call()
    finally:
        current.wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with eager_branches(), torch.cuda.graph(graph, pool=pool):
        output = call()
    return graph, output


@contextlib.contextmanager
def eager_branches() -> Iterator[None]:
    """While a graph is captured, transformers is told that no stream is capturing, so that the graph
    holds the kernels of the eager call. Asked, transformers 5.x (5.17 here) takes other branches under
    capture: CLIP's text encoder gets an explicit causal mask instead of SDPA's ``is_causal``, another
    attention kernel, and other bits (0.002 apart in tiny SD's negative embeddings on an H200). A branch
    that then cannot be captured (a host sync) fails the capture, and the call runs eagerly instead."""
    module = sys.modules.get("transformers.utils.import_utils")
    asks = getattr(module, "is_cuda_stream_capturing", None)
    if asks is None:
        yield
        return
    module.is_cuda_stream_capturing = lambda: False
    try:
        yield
    finally:
        module.is_cuda_stream_capturing = asks


def bucket_size(rows: int, largest: int = ROW_BUCKETS[-1]) -> int:
    """The smallest row bucket holding ``rows`` (beyond the largest bucket: exactly ``rows``)."""
    return next((size for size in ROW_BUCKETS if size >= rows and size <= largest), rows)


class DenoiserRunner:
    """Runs adapters' denoiser forwards on bucketed, preallocated batches (CUDA graphs on the GPU)."""

    def __init__(self, forward: Forward, device: torch.device, mode: str = "exact", max_rows: int = ROW_BUCKETS[-1]):
        if mode not in MODES:
            raise ValueError(f"denoiser={mode!r}: allowed {', '.join(MODES)}")
        self.device = device
        self.mode = mode
        self.max_rows = max_rows
        self.forward = compiled(forward) if mode == "compiled" else forward
        self.min_rows = 2 if mode == "compiled" and max_rows >= 2 else 1
        self.use_graphs = device.type == "cuda" and mode != "eager"
        self.buckets: dict[tuple[Hashable, int], Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # one side stream for every capture's warm-up: the caching allocator keeps each stream's blocks
        # apart, so a stream per capture would hold one batch's activations per bucket
        self.side_stream = torch.cuda.Stream(device) if self.use_graphs else None
        self.stats = RunnerStats()

    @torch.no_grad()  # callers may be outside inference mode (a warm-up at start): no autograd graphs kept
    def run(self, rows: Sequence[Rows], separate: bool = False) -> list[torch.Tensor]:
        """The forward's output rows for each ``Rows``, in order ([n, ...] each, owned by the caller).

        Rows of equal key share forwards (at most ``max_rows`` rows each); with ``separate`` each runs
        alone, as a lone request's stock calls do.
        """
        self.stats.forwards = []
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for index, item in enumerate(rows):
            groups[(index,) if separate else item.key].append(index)
        outputs: list[torch.Tensor | None] = [None] * len(rows)
        for members in groups.values():
            for chunk in self._chunks(members, rows):
                result = self._forward([rows[index] for index in chunk])
                start = 0
                for index in chunk:
                    outputs[index] = result[start : start + rows[index].count]
                    start += rows[index].count
        return outputs  # type: ignore[return-value]

    def _chunks(self, members: list[int], rows: Sequence[Rows]) -> list[list[int]]:
        """Consecutive runs of ``members`` with at most ``max_rows`` rows (a request is never split)."""
        chunks: list[list[int]] = [[]]
        filled = 0
        for index in members:
            if chunks[-1] and filled + rows[index].count > self.max_rows:
                chunks.append([])
                filled = 0
            chunks[-1].append(index)
            filled += rows[index].count
        return chunks

    def _forward(self, group: list[Rows]) -> torch.Tensor:
        """One forward over ``group`` (equal keys): fill a bucket, replay (or run) it, copy the output out."""
        key, real = group[0].key, sum(item.count for item in group)
        size = bucket_size(max(real, self.min_rows), self.max_rows)
        bucket = self.buckets.get((key, size))
        if bucket is None:
            bucket = self.buckets[(key, size)] = Bucket(self._allocate(group[0], size))
        self._fill(bucket, group, real)
        self.stats.padded_rows += size - real
        self.stats.forwards.append(real)
        bucket.uses += 1
        if self.use_graphs and bucket.graph is None:
            self._capture(key, bucket)
        if bucket.graph is not None:
            bucket.graph.replay()
            output = bucket.output
        else:
            output = self.forward(key, bucket.inputs)
        return output[:real].clone()  # the buffer is overwritten by the next replay

    def _allocate(self, example: Rows, size: int) -> dict[str, torch.Tensor]:
        with torch.inference_mode(False):  # plain tensors: writable under inference mode and no_grad alike
            buffers = {
                name: torch.empty((size, *value.shape[1:]), dtype=value.dtype, device=value.device)
                for name, value in example.tensors.items()
            }
        if self.mode == "compiled" and size > 1:  # one compiled graph serves every bucket of a key
            for buffer in buffers.values():
                torch._dynamo.mark_dynamic(buffer, 0)
        return buffers

    @staticmethod
    def _fill(bucket: Bucket, group: list[Rows], real: int) -> None:
        """Copy the group's rows in; padding rows repeat the first row (always a valid input)."""
        for name, buffer in bucket.inputs.items():
            start = 0
            for item in group:
                value = item.tensors[name]
                if value.shape[1:] != buffer.shape[1:]:
                    raise ValueError(f"rows of one key disagree on {name}: {list(value.shape)} vs {list(buffer.shape)}")
                buffer[start : start + value.shape[0]].copy_(value)
                start += value.shape[0]
            if real < buffer.shape[0]:
                buffer[real:].copy_(buffer[:1].expand_as(buffer[real:]))

    def _capture(self, key: Hashable, bucket: Bucket) -> None:
        """Capture the forward on the bucket's buffers (after a warm-up on a side stream, as CUDA graphs
        need); when capture fails the bucket stays eager and says why once."""
        began, reserved = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        try:
            graph, bucket.output = capture_graph(
                lambda: self.forward(key, bucket.inputs), self.device, self.side_stream, self.pool
            )
        except Exception as error:  # noqa: BLE001 - the call stays correct eagerly; say why once
            rows = next(iter(bucket.inputs.values())).shape[0]
            log.warning("denoiser: CUDA graph capture failed for %s x %d rows, running eagerly: %s", key, rows, error)
            self.use_graphs = False
            return
        bucket.graph = graph
        self.stats.graphs += 1
        self.stats.capture_seconds += time.perf_counter() - began
        self.stats.graph_memory_bytes += torch.cuda.memory_reserved(self.device) - reserved

    @torch.no_grad()
    def warm_up(self, rows: Rows, sizes: Sequence[int] = ROW_BUCKETS) -> None:
        """Prepare (and on CUDA capture) the buckets ``sizes`` for ``rows``' key, from copies of its first row."""
        for size in sizes:
            if not self.min_rows <= size <= self.max_rows:  # (compiled: 1 row is padded to the bucket of 2)
                continue
            tensors = {
                name: value[:1].expand(size, *value.shape[1:]).contiguous() for name, value in rows.tensors.items()
            }
            self._forward([Rows(rows.key, tensors)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Capture:
    """One distinct call's tensor arguments, copied (the graph's inputs), and its graph and output."""

    inputs: list[torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    output: Any = None


class GraphedCall:
    """``function`` (a text encoder's forward, the VAE's decode) replayed from CUDA graphs, one per distinct
    call: the shapes, dtypes and devices of its tensor arguments, its other arguments, and ``context()``
    (e.g. the LoRA setting, which changes the kernels' arguments). Each is captured on its first use, on
    copies of the tensor arguments that later calls copy into: the eager kernels without their launch
    cost, so the same bits. Returns copies of the outputs (tensors in tuples, dicts or ModelOutputs).

    Off CUDA the copies run eagerly. Past ``max_graphs`` distinct calls (a text encoder that sees every
    prompt length), or once a capture has failed (said once), ``function`` runs eagerly as called.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        device: torch.device,
        name: str,
        context: Callable[[], Hashable] = lambda: None,
        max_graphs: int = 64,
    ):
        self.function = function
        self.device = device
        self.name = name
        self.context = context
        self.max_graphs = max_graphs
        self.use_graphs = device.type == "cuda"  # False off CUDA, and once a capture has failed
        self.captures: dict[Hashable, Capture] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.side_stream = torch.cuda.Stream(device) if self.use_graphs else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [index for index, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        key = (spec, self.context(), tuple(describe(leaf) for leaf in leaves))
        capture = self._capture_for(key, tensors, leaves, spec)
        if capture is None:
            return self.function(*args, **kwargs)
        for buffer, index in zip(capture.inputs, tensors, strict=True):
            buffer.copy_(leaves[index])
        if capture.graph is None:
            output = self._call_on(capture.inputs, tensors, leaves, spec)
        else:
            capture.graph.replay()
            output = capture.output
        return tree_map(lambda value: value.clone() if isinstance(value, torch.Tensor) else value, output)

    def _capture_for(self, key: Hashable, tensors: list[int], leaves: list[Any], spec: Any) -> Capture | None:
        """The call's capture, made on its first use; None where the call runs eagerly as called."""
        if not hashable(key):
            return None
        capture = self.captures.get(key)
        if capture is not None:
            return capture
        if len(self.captures) >= self.max_graphs or (self.device.type == "cuda" and not self.use_graphs):
            return None
        with torch.inference_mode(False):  # plain tensors: writable under inference mode and no_grad alike
            capture = Capture([leaves[index].clone() for index in tensors])
        if self.use_graphs and not self._capture(capture, tensors, leaves, spec):
            return None
        self.captures[key] = capture
        return capture

    def _call_on(self, inputs: list[torch.Tensor], tensors: list[int], leaves: list[Any], spec: Any) -> Any:
        """``function`` called with ``inputs`` in place of its tensor arguments."""
        substituted = list(leaves)
        for buffer, index in zip(inputs, tensors, strict=True):
            substituted[index] = buffer
        args, kwargs = tree_unflatten(substituted, spec)
        return self.function(*args, **kwargs)

    def _capture(self, capture: Capture, tensors: list[int], leaves: list[Any], spec: Any) -> bool:
        """Capture ``function`` on the capture's inputs (after a warm-up on a side stream); False, and
        eager from now on, when it fails."""
        try:
            graph, capture.output = capture_graph(
                lambda: self._call_on(capture.inputs, tensors, leaves, spec), self.device, self.side_stream, self.pool
            )
        except Exception as error:  # noqa: BLE001 - the call stays correct eagerly; say why once
            log.warning("%s: CUDA graph capture failed, running eagerly from now on: %s", self.name, error)
            self.use_graphs = False
            return False
        capture.graph = graph
        return True


def describe(leaf: Any) -> Hashable:
    """What a call's argument contributes to its graph's key: a tensor its shape, dtype and device."""
    if isinstance(leaf, torch.Tensor):
        return (tuple(leaf.shape), leaf.dtype, leaf.device)
    return leaf


def hashable(key: Hashable) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True
