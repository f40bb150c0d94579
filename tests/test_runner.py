"""The denoiser runner on CPU with the tiny SD UNet: buckets, padding, buffers, chunks, the solo call."""

from __future__ import annotations

import pytest
import torch

from stepdiff.adapters import Stage, load_adapter
from stepdiff.runner import ROW_BUCKETS, DenoiserRunner, GraphedCall, Rows, bucket_size, eager_branches


@pytest.fixture(scope="module")
def adapter(tiny_sd):
    return load_adapter(str(tiny_sd), Stage.DENOISE, torch.device("cpu"), torch.float32)


def unet_rows(adapter, count: int, seed: int, size: int = 64) -> Rows:
    """``count`` random UNet rows of the tiny pipeline, keyed as the adapter keys them."""
    generator = torch.Generator().manual_seed(seed)
    [example] = adapter.warmup_rows(size, size)
    tensors = {
        name: torch.randn((count, *value.shape[1:]), generator=generator) for name, value in example.tensors.items()
    }
    tensors["timestep"] = torch.randint(1, 999, (count,), generator=generator).float()
    return Rows(example.key, tensors)


def direct(adapter, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return adapter.forward(None, tensors)


def test_buckets_are_the_smallest_that_fit():
    assert [bucket_size(n) for n in (1, 2, 3, 5, 7, 9, 17, 29, 33, 50, 64)] == [1, 2, 4, 6, 8, 10, 18, 30, 36, 52, 64]
    assert bucket_size(65) == 65  # beyond the largest bucket: exactly the rows
    assert bucket_size(5, largest=4) == 5
    assert ROW_BUCKETS[:2] == (1, 2)  # a lone request (1 row, or 2 with guidance) is never padded


def test_a_lone_request_runs_the_stock_call_unpadded(adapter):
    runner = DenoiserRunner(adapter.forward, torch.device("cpu"))
    rows = unet_rows(adapter, 2, seed=1)
    rows.tensors["timestep"] = torch.full((2,), 601.0)  # one step's timestep for both rows (uncond, cond)
    with torch.inference_mode():
        [output] = runner.run([rows], separate=True)
        # StableDiffusionPipeline passes the step's timestep as a scalar tensor
        stock = adapter.pipe.unet(
            rows.tensors["sample"],
            rows.tensors["timestep"][0],
            encoder_hidden_states=rows.tensors["encoder_hidden_states"],
        )[0]
    assert runner.stats.padded_rows == 0 and runner.stats.forwards == [2]
    assert torch.equal(output, stock)


def test_padding_rows_do_not_change_real_rows(adapter):
    """3 real rows fill a bucket of 4; the padding row's content must not matter: the real rows equal a
    plain batch of 4 whose 4th row is something else entirely."""
    runner = DenoiserRunner(adapter.forward, torch.device("cpu"))
    first, second = unet_rows(adapter, 2, seed=2), unet_rows(adapter, 1, seed=3)
    with torch.inference_mode():
        out_first, out_second = runner.run([first, second])
    assert runner.stats.forwards == [3] and runner.stats.padded_rows == 1
    other = unet_rows(adapter, 1, seed=4)
    batch = {
        name: torch.cat([first.tensors[name], second.tensors[name], other.tensors[name]]) for name in first.tensors
    }
    reference = direct(adapter, batch)
    assert torch.equal(torch.cat([out_first, out_second]), reference[:3])
    assert not torch.equal(reference[3], reference[0])  # the padding differed from the first row: a real check


def test_buffers_are_reused_and_outputs_do_not_alias_them(adapter):
    runner = DenoiserRunner(adapter.forward, torch.device("cpu"))
    first, second = unet_rows(adapter, 2, seed=5), unet_rows(adapter, 2, seed=6)
    with torch.inference_mode():
        [out_first] = runner.run([first])
        kept = out_first.clone()
        [out_second] = runner.run([second])
    assert len(runner.buckets) == 1 and next(iter(runner.buckets.values())).uses == 2
    assert torch.equal(out_first, kept), "the first output changed when the buffers were reused"
    assert not torch.equal(out_first, out_second)
    assert torch.equal(out_second, direct(adapter, second.tensors))


def test_rows_group_by_key_and_chunk_at_max_rows_without_splitting_a_request(adapter):
    runner = DenoiserRunner(adapter.forward, torch.device("cpu"), max_rows=4)
    rows = [unet_rows(adapter, 2, seed=10 + i) for i in range(5)] + [unet_rows(adapter, 1, seed=20, size=48)]
    with torch.inference_mode():
        outputs = runner.run(rows)
    assert sorted(runner.stats.forwards) == [1, 2, 4, 4]  # 64x64: 4 + 4 + 2 rows; 48x48: its own forward
    assert [tuple(output.shape) for output in outputs] == [(2, 4, 8, 8)] * 5 + [(1, 4, 6, 6)]
    with torch.inference_mode():
        runner.run(rows[:2], separate=True)
    assert runner.stats.forwards == [2, 2]  # separate: each Rows alone (a lone request's stock calls)


def test_warm_up_prepares_every_bucket_and_eager_mode_has_no_graphs(adapter):
    runner = DenoiserRunner(adapter.forward, torch.device("cpu"), max_rows=8)
    [rows] = adapter.warmup_rows(64, 64)
    with torch.inference_mode():
        runner.warm_up(rows)
    assert sorted(size for _, size in runner.buckets) == [1, 2, 4, 6, 8]
    assert runner.stats.graphs == 0 and not runner.use_graphs  # CPU: the same buffers, eagerly
    with pytest.raises(ValueError, match="denoiser='fast': allowed exact, compiled, eager"):
        DenoiserRunner(adapter.forward, torch.device("cpu"), mode="fast")


def test_compiled_pads_a_lone_row_to_two_so_one_graph_serves_every_bucket():
    """``compiled`` has no 1-row bucket: a lone row runs padded in the bucket of 2, whose dynamic batch
    also serves 4 to 8 rows, so after the first forward nothing compiles again (Dynamo would compile a
    batch of 1 apart); each real row's output is still its own."""
    import torch._dynamo

    def forward(key, inputs):
        return inputs["x"] * 2 + 1

    torch._dynamo.reset()
    runner = DenoiserRunner(forward, torch.device("cpu"), mode="compiled", max_rows=8)
    x = torch.arange(16.0).reshape(8, 2)
    with torch.inference_mode():
        runner.warm_up(Rows("k", {"x": x[:1]}))
        assert sorted(size for _, size in runner.buckets) == [2, 4, 6, 8]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for count in (1, 2, 3, 8):
                [output] = runner.run([Rows("k", {"x": x[:count]})])
                assert torch.equal(output, x[:count] * 2 + 1)
    assert runner.stats.padded_rows == 1 + 1  # the lone row and 3 -> 4 (the warm-up filled each bucket exactly)
    assert sorted(size for _, size in runner.buckets) == [2, 4, 6, 8]


def test_a_graphed_call_reuses_one_capture_per_distinct_call_and_returns_copies():
    seen = []

    def function(x: torch.Tensor, scale: float = 1.0) -> dict:
        seen.append(x)
        return {"out": x * scale, "rows": x.shape[0]}

    graphed = GraphedCall(function, torch.device("cpu"), "test")
    first, second = torch.randn(2, 3), torch.randn(2, 3)
    one, two = graphed(first, scale=2.0), graphed(second, scale=2.0)
    assert torch.equal(one["out"], first * 2) and torch.equal(two["out"], second * 2) and two["rows"] == 2
    assert len(graphed.captures) == 1 and seen[0] is seen[1]  # one input copy, filled by each call
    assert seen[0] is not first and seen[0] is not second
    graphed(torch.randn(4, 3), scale=2.0)  # another shape
    graphed(second, scale=3.0)  # another argument
    assert len(graphed.captures) == 3


def test_a_graphed_call_keys_on_its_context_and_runs_eagerly_past_max_graphs_or_unhashable_arguments():
    setting = {"loras": ()}
    seen = []

    def function(x: torch.Tensor, tags=None) -> torch.Tensor:
        seen.append(x)
        return x + 1

    graphed = GraphedCall(function, torch.device("cpu"), "test", context=lambda: setting["loras"], max_graphs=2)
    x = torch.zeros(3)
    graphed(x)
    setting["loras"] = (("style", 0.5),)
    graphed(x)
    assert len(graphed.captures) == 2
    larger = torch.zeros(5)
    assert torch.equal(graphed(larger), larger + 1) and seen[-1] is larger  # past max_graphs: as called
    assert torch.equal(graphed(x, tags={"a"}), x + 1) and seen[-1] is x  # a set cannot key a graph
    assert len(graphed.captures) == 2


def test_captures_see_transformers_eager_branches(monkeypatch):
    """transformers asks whether a CUDA stream is capturing to pick its mask branches (and then gives
    CLIP another attention kernel than eager): inside ``eager_branches`` (every capture) it hears no."""
    from transformers.masking_utils import is_tracing

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)  # as during a capture
    assert is_tracing()
    with eager_branches():
        assert not is_tracing()
    assert is_tracing()
