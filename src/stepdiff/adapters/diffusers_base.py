"""What every diffusers adapter repeats: loading a stage's components, a request's state, the scheduler step.

A family subclasses ``DiffusersAdapter``, names its pipeline class, the components each stage loads
and the conditioning tensors its text encoders produce, and writes the slices of its pipeline's
``__call__`` that differ (encoding, latents, denoiser rows, guidance, decoding).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from ..runner import GraphedCall, compiled
from .base import (
    GenerationParams,
    PipelineInfo,
    RequestState,
    TensorSpec,
    check_latents,
    host_schedule,
    require_conditioning,
    scheduler_step_kwargs,
    split_lora_key,
    stall_free_step,
    to_device,
)
from .loading import Stage, load_component_config, load_stage_pipeline, new_scheduler
from .mixed_lora import LORA_SCALES, MixedLoRA

log = logging.getLogger(__name__)

SCHEDULES_KEPT = 256  # set-up schedulers kept for copying (per scheduler, step count and image size)


class Schedule(NamedTuple):
    """A request's scheduler with its timesteps set, and those timesteps on the device and the host."""

    scheduler: Any
    timesteps: torch.Tensor  # what the denoiser takes
    host_timesteps: torch.Tensor  # what the scheduler's arithmetic takes


class DiffusersAdapter:
    """The shared half of a step adapter over one diffusers pipeline class."""

    family: ClassVar[str]
    pipeline_class: ClassVar[Any]  # the diffusers pipeline class the adapter slices
    stage_components: ClassVar[dict[Stage, tuple[str, ...]]]  # what each Triton model loads
    conditioning: ClassVar[tuple[TensorSpec, ...]]
    # Whether the pipeline passes eta/generator to scheduler.step (SD-style pipelines do, flow ones not)
    step_takes_generator: ClassVar[bool] = True
    load_kwargs: ClassVar[dict[str, Any]] = {}
    # The family's linear latent -> RGB map for previews ([channels, 3], ComfyUI's factors), and its bias
    latent_rgb_factors: ClassVar[np.ndarray | None] = None
    latent_rgb_bias: ClassVar[np.ndarray | None] = None
    vae_scale_factor: int  # pixels per latent, set by each family before this __init__ runs

    def __init__(self, path: Path, stage: Stage, device: torch.device, dtype: torch.dtype):
        self.path = path
        self.stage = stage
        self.device = device
        self.dtype = dtype
        self.pipe = load_stage_pipeline(
            self.pipeline_class, path, self.stage_components[stage], device, dtype, **self.load_kwargs
        )
        self.scheduler_config = load_component_config(path, "scheduler")
        self.info = self.pipeline_info()
        # the adapters in effect (None: not set yet: loading leaves the last loaded adapter active)
        self.active_loras: tuple[tuple[str, float], ...] | None = None
        self.loaded_loras: frozenset[str] = frozenset()  # adapters with weights in this stage's components
        self.mixed_lora: MixedLoRA | None = None
        self.schedules: OrderedDict[Hashable, Schedule] = OrderedDict()  # least recently used first

    def compile_decode(self) -> None:
        """Run the VAE's decode through ``torch.compile`` from now on (``decoder=compiled``): faster, not
        byte-identical to the eager decode."""
        self.pipe.vae.decode = compiled(self.pipe.vae.decode)

    def graph_decode(self) -> None:
        """Replay the VAE's decode from CUDA graphs from now on (``decoder=graphs``), one per latents
        shape: the eager kernels without their launch cost, so the same image."""
        self.pipe.vae.decode = GraphedCall(self.pipe.vae.decode, self.device, "vae_decode")

    def graph_text_encoders(self) -> bool:
        """Replay this stage's text encoders from CUDA graphs from now on (``encoder=graphs``), one per
        batch size and LoRA setting: prompts are padded to the tokenizer's length, so a shape recurs."""
        graphed = False
        for name in self.stage_components[Stage.TEXT_ENCODER]:
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.forward = GraphedCall(module.forward, self.device, name, lambda: self.active_loras)
                graphed = True
        return graphed

    def load_loras(self, loras: Mapping[str, str]) -> None:
        """Load the LoRA adapters ``loras`` (name -> path) into the stages that run them (text encoder,
        denoiser), all inactive until a request names them."""
        if loras and self.stage in (Stage.TEXT_ENCODER, Stage.DENOISE):
            for name, lora_path in loras.items():
                self.load_lora(name, lora_path)
            self.loaded_loras = frozenset(name for names in self.pipe.get_list_adapters().values() for name in names)
            self.activate_loras(())
            if self.stage == Stage.DENOISE:
                self.mixed_lora = self.stack_loras()

    def stack_loras(self) -> MixedLoRA | None:
        """The denoiser's adapters stacked for mixed-setting forwards; None (forwards grouped by setting)
        when its LoRA layers cannot be stacked."""
        parts = [getattr(self.pipe, name) for name in self.stage_components[Stage.DENOISE]]
        try:
            return MixedLoRA([part for part in parts if isinstance(part, torch.nn.Module)], sorted(self.loaded_loras))
        except ValueError as error:
            log.warning("%s; forwards are grouped by LoRA setting", error)
            return None

    def load_lora(self, name: str, path: str) -> None:
        """``load_lora_weights(path, adapter_name=name)`` for the components this stage holds, with the
        pipeline's own loader classmethods: ``lora_state_dict``, then ``load_lora_into_unet`` /
        ``load_lora_into_transformer`` for the denoiser and ``load_lora_into_text_encoder`` for each text
        encoder among its LoRA components; a key that fits none of them stops the load."""
        pipe = self.pipe
        if not hasattr(pipe, "lora_state_dict"):
            raise ValueError(f"--lora: diffusers loads no LoRA adapters for {self.pipeline_class.__name__}")
        state_dict, network_alphas, metadata = lora_state_dict(pipe, path)
        check_lora_keys(pipe, name, path, state_dict)
        for component_name in pipe._lora_loadable_modules:
            component = getattr(pipe, component_name, None)
            if component is None:
                continue
            common = {"adapter_name": name, "metadata": metadata, "_pipeline": pipe}
            if component_name in ("unet", "transformer"):
                load = getattr(pipe, f"load_lora_into_{component_name}")
                if "network_alphas" in inspect.signature(load).parameters:  # SD, SDXL, Flux (SD3, QwenImage: none)
                    common["network_alphas"] = network_alphas
                load(state_dict, **{component_name: component}, **common)
            else:
                pipe.load_lora_into_text_encoder(
                    state_dict,
                    network_alphas,
                    text_encoder=component,
                    prefix=component_name,
                    lora_scale=pipe.lora_scale,
                    **common,
                )

    def activate_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Make ``loras`` (name, scale) this stage's active adapters, as the pipeline's
        ``set_adapters(names, adapter_weights=scales)`` does (adapters without weights in this stage's
        components are left out); none: the base weights alone."""
        mine = tuple((name, scale) for name, scale in loras if name in self.loaded_loras)
        if mine == self.active_loras or not self.loaded_loras:
            return
        if mine:
            self.pipe.enable_lora()
            self.pipe.set_adapters([name for name, _ in mine], adapter_weights=[scale for _, scale in mine])
        else:
            self.pipe.disable_lora()
        self.active_loras = mine

    def denoise(self, key: Hashable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``forward`` with the LoRA adapters a key carries (``lora_key``) active, or for a
        ``mixed_lora_key`` with PEFT's adapters off and each row's own scales (``MixedLoRA``)."""
        loras, key = split_lora_key(key)
        if loras is None:
            self.activate_loras(())
            rows = {name: value for name, value in inputs.items() if name != LORA_SCALES}
            with self.mixed_lora.applied(inputs[LORA_SCALES]):
                return self.forward(key, rows)
        self.activate_loras(loras)
        return self.forward(key, inputs)

    @classmethod
    def pipeline_classes(cls) -> tuple[str, ...]:
        """``model_index.json`` class names this adapter serves."""
        return (cls.pipeline_class.__name__,)

    def pipeline_info(self) -> PipelineInfo:
        """Defaults and limits of the pipeline, read from its configs."""
        raise NotImplementedError

    def uses_cfg(self, params: GenerationParams) -> bool:
        """Whether the request runs the denoiser on negative conditioning too (the pipeline's rule)."""
        raise NotImplementedError

    @staticmethod
    def used_with(name: str, do_cfg: bool) -> bool:
        """Whether a request uses conditioning ``name``: ``negative_*`` only with guidance."""
        return do_cfg or not name.startswith("negative_")

    def required_conditioning(self, do_cfg: bool) -> list[str]:
        """Conditioning names START must carry (masks are optional)."""
        names = [spec.name for spec in self.conditioning if not spec.name.endswith("_mask")]
        return [name for name in names if self.used_with(name, do_cfg)]

    def text_batch_key(self, params: GenerationParams) -> Hashable:
        """One text-encoder forward per guidance rule, negative prompt given or not (the pipelines treat
        None apart from "": SDXL's zeros) and LoRA setting (text-encoder adapters)."""
        return self.uses_cfg(params), params.negative_prompt is None, params.loras

    def encode_prompts(self, batch: Sequence[GenerationParams]) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def encode_prompt(self, params: GenerationParams) -> dict[str, torch.Tensor]:
        """One request's conditioning (``encode_prompts`` of a batch of one)."""
        return self.encode_prompts([params])[0]

    @staticmethod
    def batch_texts(batch: Sequence[GenerationParams]) -> dict[str, list[str] | None]:
        """The batch's prompts and negative prompts as the pipelines' ``encode_prompt`` takes them (lists;
        None for negatives when no request gives one: ``text_batch_key`` keeps None and text apart)."""
        negatives = None if batch[0].negative_prompt is None else [params.negative_prompt for params in batch]
        return {"prompt": [params.prompt for params in batch], "negative_prompt": negatives}

    def request_rows(self, do_cfg: bool, **tensors: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Row i of each batched ``encode_prompt`` output the requests use (the pipelines return negatives
        regardless), for request i."""
        used = {name: value for name, value in tensors.items() if self.used_with(name, do_cfg)}
        return split_rows(used)

    def new_state(
        self,
        correlation_id: int,
        params: GenerationParams,
        conditioning: dict[str, torch.Tensor],
        schedule: Schedule,
        generator: torch.Generator,
        latents: torch.Tensor,
    ) -> RequestState:
        return RequestState(
            correlation_id=correlation_id,
            params=params,
            scheduler=schedule.scheduler,
            generator=generator,
            timesteps=schedule.timesteps,
            host_timesteps=schedule.host_timesteps,
            latents=latents,
            conditioning=conditioning,
            do_cfg=self.uses_cfg(params),
        )

    def schedule(
        self, params: GenerationParams, set_timesteps: Callable[[Any], torch.Tensor], *key: Hashable
    ) -> Schedule:
        """A fresh scheduler for the request with its timesteps set by ``set_timesteps(scheduler)`` (the
        pipeline's ``retrieve_timesteps`` call) and set up for stall-free steps (``host_schedule``).

        Set up once per (scheduler, steps, ``key``: whatever else ``set_timesteps`` depends on) and
        deep-copied for each request: setting timesteps on the device copies them from pageable memory
        and reading them back waits for the GPU, so a START doing either would wait for every forward
        queued before it. The copy also costs the host a fraction of the set-up."""
        cache_key = (params.scheduler, params.num_inference_steps, *key)
        template = self.schedules.pop(cache_key, None)
        if template is None:
            scheduler = self.new_scheduler(params)
            timesteps = set_timesteps(scheduler)
            template = Schedule(scheduler, timesteps, host_schedule(scheduler, timesteps))
        self.schedules[cache_key] = template
        if len(self.schedules) > SCHEDULES_KEPT:
            self.schedules.popitem(last=False)
        scheduler, timesteps = copy.deepcopy((template.scheduler, template.timesteps))
        return Schedule(scheduler, timesteps, template.host_timesteps)

    def checked_conditioning(self, params: GenerationParams, conditioning: dict[str, torch.Tensor]) -> None:
        """InvalidInput unless START brought every conditioning tensor the request needs."""
        require_conditioning(conditioning, self.required_conditioning(self.uses_cfg(params)))

    def guided_conditioning(
        self, params: GenerationParams, conditioning: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Each conditioning tensor on the device, ``negative_*`` prepended (uncond rows first) with CFG."""
        kept = {}
        for spec in self.conditioning:
            if spec.name.startswith("negative_"):
                continue
            value = to_device(conditioning[spec.name], self.device, self.dtype)
            if self.uses_cfg(params):
                value = torch.cat([to_device(conditioning[f"negative_{spec.name}"], self.device, self.dtype), value])
            kept[spec.name] = value
        return kept

    def new_scheduler(self, params: GenerationParams) -> Any:
        return new_scheduler(params.scheduler, self.scheduler_config)

    @staticmethod
    def seeded_generator(params: GenerationParams) -> torch.Generator:
        """The request's CPU generator, as the pipelines' ``generator=torch.Generator().manual_seed(seed)``."""
        return torch.Generator().manual_seed(params.seed)

    def step(self, state: RequestState, model_output: torch.Tensor) -> None:
        kwargs = scheduler_step_kwargs(state.scheduler, state.generator) if self.step_takes_generator else {}
        with stall_free_step(state.scheduler):
            state.latents = state.scheduler.step(
                model_output, state.host_timestep, state.latents, **kwargs, return_dict=False
            )[0]
        state.step_index += 1

    def latent_channels(self) -> int:
        """Channels of the latents ``decode`` takes."""
        return self.pipe.vae.config.latent_channels

    def warmup_latents(self, height: int, width: int, count: int) -> torch.Tensor:
        """Zero latents of ``count`` requests of this size, concatenated as ``decode`` takes them."""
        factor = self.vae_scale_factor
        return torch.zeros(count, self.latent_channels(), height // factor, width // factor)

    def check_latents(self, latents: torch.Tensor | None, max_pixels: int) -> torch.Tensor:
        return check_latents(latents, self.latent_channels(), self.vae_scale_factor, max_pixels)


def lora_state_dict(pipe: Any, path: str) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, Any]:
    """The pipeline's ``lora_state_dict(path)`` (kohya and other formats converted) as (state dict,
    network alphas, metadata): SD's returns alphas, Flux's on request (``return_alphas``), SD3's and
    QwenImage's none."""
    kwargs: dict[str, Any] = {"return_lora_metadata": True}
    if "return_alphas" in inspect.signature(pipe.lora_state_dict).parameters:
        kwargs["return_alphas"] = True
    outputs = pipe.lora_state_dict(path, **kwargs)
    if len(outputs) == 3:
        return outputs
    state_dict, metadata = outputs
    return state_dict, None, metadata


def check_lora_keys(pipe: Any, name: str, path: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the file and the first key of a LoRA that fits none of ``pipe``'s LoRA
    components (a module the key names does not exist there); components this stage does not hold
    are checked by the stage that does."""
    if not state_dict:
        raise ValueError(f"--lora {name}={path}: no LoRA weights found")
    for key in sorted(state_dict):
        component_name, _, module_path = key.partition(".")
        if component_name not in pipe._lora_loadable_modules:
            raise ValueError(
                f"--lora {name}={path}: key {key!r} fits no LoRA component of {type(pipe).__name__} "
                f"(allowed: {', '.join(pipe._lora_loadable_modules)})"
            )
        component = getattr(pipe, component_name, None)
        if component is None:
            continue
        module = module_path.split(".lora")[0]
        if module not in dict(component.named_modules()):
            raise ValueError(f"--lora {name}={path}: key {key!r} names no module of the {component_name}")


def split_rows(batched: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per request i: row i of every tensor, [1, ...]."""
    size = next(iter(batched.values())).shape[0]
    return [{name: value[row : row + 1] for name, value in batched.items()} for row in range(size)]


def classifier_free_guidance(state: RequestState, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``uncond + guidance_scale * (cond - uncond)`` from one denoiser call on [uncond, cond] rows."""
    [prediction] = outputs
    if not state.do_cfg:
        return prediction
    uncond, cond = prediction.chunk(2)
    return uncond + state.params.guidance_scale * (cond - uncond)
