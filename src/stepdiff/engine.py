"""The denoise_step core: per-sequence state on the device and step-level batching, without Triton.

Triton's sequence batcher hands ``StepEngine.run`` one call per sequence. A START call creates the
request's state (with ``step`` 0 it also takes the first step, in the same forward as the other steps
of its run: under Triton those are other STARTs', since a START's inputs differ from a step call's and
Triton never batches different input sets); a step call advances it by one step (the rows of all
compatible step calls of one ``run`` share the runner's denoiser forwards); a step call can ask for its
latents (previews). END on the last step returns the final latents and frees the state; so does END on
a call after the last step, which takes no step (txt2img's way: its last step then batches like any
other); an abort frees it.
A call refused for its place in the sequence (a wrong ``step``, a step after the last) leaves the
sequence as it was; any other failed call frees it.

Nothing in an intermediate step waits for the GPU to finish that step: ``run`` queues the step's work,
then waits only for the run ``max_runahead - 1`` runs back, so the GPU always has this run queued
while the next call's round trip and batch assembly happen. Final latents asked for after the last
step are copied to the host behind the earlier runs' work and ahead of this run's, so waiting for them
costs no more than that runahead wait; only latents of a step taken in this run (END on the last step,
a preview) wait for this run's forward.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .adapters.base import RequestState, StepAdapter, lora_key, mixed_lora_key
from .adapters.mixed_lora import LORA_SCALES
from .admission import ServerBusy
from .params import GenerationParams, InvalidInput
from .runner import DenoiserRunner, Rows


class StepRefused(InvalidInput):
    """A step call that does not fit its sequence's position; the sequence stays as it was."""


@dataclass
class StepCall:
    """One Triton request to denoise_step, already decoded from tensors."""

    correlation_id: int
    start: bool = False
    end: bool = False
    abort: bool = False
    step: int | None = None
    wants_latents: bool = False  # the latents after this step, to the caller (StepResult has them once done)
    params: GenerationParams | None = None
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepResult:
    """What goes back for one call: progress, final latents once done, or the error."""

    step_index: int = 0
    num_steps: int = 0
    done: bool = False
    latents: torch.Tensor | None = None  # after this call's step, when wanted, and once ``done`` (on the
    # device unless fetched by END after the last step: reading them back waits for the step's forward)
    error: Exception | None = None


class StepEngine:
    """Owns every active request's state and runs batched steps for the calls Triton delivers."""

    def __init__(
        self,
        adapter: StepAdapter,
        max_batch_size: int,
        max_active_sequences: int,
        idle_seconds: float,
        runner: DenoiserRunner | None = None,
        max_runahead: int = 2,
    ):
        self.adapter = adapter
        self.max_batch_size = max_batch_size
        self.max_active_sequences = max_active_sequences
        self.idle_seconds = idle_seconds
        self.runner = runner or DenoiserRunner(adapter.denoise, adapter.device)
        self.max_runahead = max_runahead
        self.queued: deque[torch.cuda.Event] = deque()  # one per run whose GPU work may still be running
        self.states: dict[int, RequestState] = {}
        self.forward_batch_sizes: list[int] = []
        self.steps_done = 0
        self.gpu_wait_seconds = 0.0  # of the last run: blocked on the GPU (runahead, final latents)

    @torch.inference_mode()
    def run(self, calls: Sequence[StepCall]) -> list[StepResult]:
        """Handle one batch of calls; errors stay with their own call.

        Calls of one sequence in the same batch (Triton's ``oldest`` batcher should never form one, but
        a sequence's calls are interchangeable "next step" calls and must not share a state's step)
        run one after the other, in separate passes, in the order they came.
        """
        self.forward_batch_sizes = []
        self.steps_done = 0
        self.gpu_wait_seconds = 0.0
        passes: list[list[int]] = []
        seen: dict[int, int] = defaultdict(int)
        for index, call in enumerate(calls):
            occurrence = seen[call.correlation_id]
            seen[call.correlation_id] += 1
            if occurrence == len(passes):
                passes.append([])
            passes[occurrence].append(index)
        results: list[StepResult] = [StepResult() for _ in calls]
        for members in passes:
            for index, result in zip(members, self._run_pass([calls[index] for index in members]), strict=True):
                results[index] = result
        return results

    def _run_pass(self, calls: Sequence[StepCall]) -> list[StepResult]:
        """Calls of distinct sequences: one step each, compatible ones sharing forwards."""
        results = [StepResult() for _ in calls]
        stepping: list[tuple[int, RequestState]] = []
        finished: dict[int, torch.Tensor] = {}  # final latents of END calls after the last step, on the host
        for index, call in enumerate(calls):
            try:
                state = self._accept(call)
            except Exception as error:  # noqa: BLE001 - reported to this caller only
                results[index].error = error
                continue
            if state is not None:
                stepping.append((index, state))
            elif call.end and not call.abort and (done := self.states.get(call.correlation_id)) is not None:
                finished[index] = self._copy_out(done)
        copied = self._record() if finished else None
        if stepping:
            self._step(stepping, results)
            if self.runner.device.type == "cuda":
                self.queued.append(self._record())
                # Wait after queueing, not before: meanwhile every generation's next call reaches Triton,
                # so the next batch forms full when this returns (waiting first made Triton form a batch
                # of whoever had arrived, and generations split into groups taking turns).
                self._wait_for_gpu(self.max_runahead - 1)
        if copied is not None:
            self._wait(copied)
        for index, call in enumerate(calls):
            state = self.states.get(call.correlation_id)
            result = results[index]
            if state is not None and result.error is None:
                result.step_index, result.num_steps, result.done = state.step_index, state.num_steps, state.done
                if index in finished:
                    result.latents = finished[index]
                elif (not call.start or call.step == 0) and (call.wants_latents or state.done):
                    result.latents = self.adapter.output_latents(state)
            # a finished request waits for its END (or the sweep), a refused call's sequence for its next
            if call.end or (result.error is not None and not isinstance(result.error, StepRefused)):
                self._finish(call.correlation_id)
        return results

    def _accept(self, call: StepCall) -> RequestState | None:
        """Create, look up or drop the call's state; return it when the call should take a step."""
        if call.abort:
            self._finish(call.correlation_id)
            return None
        if call.start:
            if call.params is None:
                raise InvalidInput("START: the sequence's first call must carry the generation inputs")
            if call.step not in (None, 0):
                raise InvalidInput(f"step={call.step} on START: allowed 0 (take the first step now) or none")
            self._finish(call.correlation_id)  # a reused id restarts cleanly
            if len(self.states) >= self.max_active_sequences:
                raise ServerBusy(
                    f"server busy: {len(self.states)} active sequences (limit {self.max_active_sequences}); retry later"
                )
            state = self.adapter.prepare(call.correlation_id, call.params, call.conditioning)
            self.states[call.correlation_id] = state
            return state if call.step == 0 else None
        state = self.states.get(call.correlation_id)
        if state is None:
            raise InvalidInput(f"sequence {call.correlation_id}: unknown or already finished (send START first)")
        state.last_active = time.monotonic()
        if call.step is not None and call.step != state.step_index:
            raise StepRefused(
                f"step={call.step} but sequence {call.correlation_id} is at step {state.step_index} of "
                f"{state.num_steps} (unchanged: send step={state.step_index} next)"
            )
        if state.done:
            if call.end:  # the final latents, after the last step
                return None
            raise StepRefused(
                f"sequence {call.correlation_id} already took all {state.num_steps} steps (send END for its latents)"
            )
        return state

    def _copy_out(self, state: RequestState) -> torch.Tensor:
        """A finished request's final latents as float32 on the host; on the GPU a copy queued behind the
        work already queued (``_record`` then marks when it is done)."""
        latents = self.adapter.output_latents(state).float()
        if latents.device.type != "cuda":
            return latents
        host = torch.empty(latents.shape, dtype=latents.dtype, pin_memory=True)
        return host.copy_(latents, non_blocking=True)

    def _record(self) -> torch.cuda.Event | None:
        """An event after the GPU work queued so far (None off the GPU)."""
        if self.runner.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _wait_for_gpu(self, pending: int) -> None:
        """Wait until at most ``pending`` earlier runs may still have GPU work queued."""
        while len(self.queued) > pending:
            self._wait(self.queued.popleft())

    def _wait(self, event: torch.cuda.Event) -> None:
        """Block until the GPU reaches ``event``; the time counts in ``gpu_wait_seconds``."""
        began = time.perf_counter()
        event.synchronize()
        self.gpu_wait_seconds += time.perf_counter() - began

    def _step(self, stepping: list[tuple[int, RequestState]], results: list[StepResult]) -> None:
        """The runner's forwards per compatible group (at most ``max_batch_size`` requests), then each
        request's guidance and scheduler step. A lone request runs its own stock calls, unbatched.
        Requests with different LoRA settings share a forward when the adapter stacks its LoRAs
        (``mixed_lora``); otherwise forwards are grouped by setting. Requests of one setting run
        diffusers' own LoRA path (``set_adapters``), except with ``compiled``: there every forward with
        adapters takes the stacked path, whose scales are a tensor input, since PEFT's are Python floats
        that Dynamo guards on (each new setting or scale would compile again)."""
        mixes = self.adapter.mixed_lora is not None
        compiled = self.runner.mode == "compiled"
        groups: dict[object, list[tuple[int, RequestState]]] = defaultdict(list)
        for item in stepping:
            groups[(self.adapter.batch_key(item[1]), () if mixes else item[1].params.loras)].append(item)
        for members in groups.values():
            for first in range(0, len(members), self.max_batch_size):
                chunk = members[first : first + self.max_batch_size]
                # one setting for all (a lone request too): diffusers' own path, exactly as stock
                settings = {state.params.loras for _, state in chunk}
                mixed = mixes and (len(settings) > 1 or (compiled and settings != {()}))
                try:
                    rows = [self._rows(state, mixed) for _, state in chunk]
                    outputs = self.runner.run([item for request in rows for item in request], separate=len(chunk) == 1)
                except Exception as error:  # noqa: BLE001 - the whole forward failed: fail its requests
                    for index, _ in chunk:
                        results[index].error = error
                    continue
                self.forward_batch_sizes.append(len(chunk))
                for (index, state), request in zip(chunk, rows, strict=True):
                    mine, outputs = outputs[: len(request)], outputs[len(request) :]
                    try:
                        self.adapter.step(state, self.adapter.guide(state, mine))
                        self.steps_done += 1
                    except Exception as error:  # noqa: BLE001 - one request's scheduler failed
                        results[index].error = error

    def _rows(self, state: RequestState, mixed: bool = False) -> list[Rows]:
        """The request's denoiser rows, keyed with its LoRA setting; ``mixed``: keyed for any setting,
        with the request's adapter scales as an input of each row."""
        rows = self.adapter.denoiser_rows(state)
        if not mixed:
            return [Rows(lora_key(state.params.loras, item.key), item.tensors) for item in rows]
        if state.lora_scales is None:
            state.lora_scales = self.adapter.mixed_lora.scale_row(state.params.loras, self.adapter.device)
        return [
            Rows(mixed_lora_key(item.key), {**item.tensors, LORA_SCALES: state.lora_scales.expand(item.count, -1)})
            for item in rows
        ]

    def _finish(self, correlation_id: int) -> None:
        self.states.pop(correlation_id, None)

    def sweep(self, now: float | None = None) -> int:
        """Drop sequences idle for longer than ``idle_seconds`` (callers that never sent END)."""
        now = time.monotonic() if now is None else now
        stale = [cid for cid, state in self.states.items() if now - state.last_active > self.idle_seconds]
        for cid in stale:
            self._finish(cid)
        return len(stale)
