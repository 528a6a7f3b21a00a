"""COMPILE_REGIONS: what TORCH_COMPILE compiles at boot. The setting, the boot's wiring, and the
upscaler region (the Real-ESRGAN networks compiled at boot, served compiled at every size); the
text encoder region's engine tests are in tests/test_text_encoder_compile.py.

The upscaler's in-process tests trace with a counting backend (dynamo's tracing and guards, which
decide what runs compiled, without codegen), so they see whether a job ran the compiled graph or
fell back to eager. The process test boots real workers with inductor's C++ backend and the
compile cache.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.engine_set import Engines
from handlers.engines.upscaler import compile_blocks
from handlers.engines.upscaler_loader import create_upscaler
from tests.helpers import s3_image, serve_jobs
from tests.scripted_http import png_bytes
from worker.local import LocalStack


def counting_backend(calls: list[int]) -> Callable[..., Any]:
    """A torch.compile backend that runs the traced graph as is and counts its runs."""

    def backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            calls.append(1)
            return graph(*args)

        return run

    return backend


def _noise(width: int, height: int, seed: int = 3) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_after_the_warm_up_every_job_size_runs_the_compiled_blocks_and_nothing_compiles() -> None:
    torch._dynamo.reset()
    calls: list[int] = []
    tiles = {"tile_size": 160, "tile_overlap": 16}
    upscaler = create_upscaler(
        model="tiny", weights_x2=None, weights_x4=None, compile_backend=counting_backend(calls), **tiles
    )
    eager = create_upscaler(model="tiny", weights_x2=None, weights_x4=None, **tiles)
    assert upscaler.compiled and not eager.compiled

    assert upscaler.warm_up() == [2, 4]
    assert upscaler.loaded_scales == [2, 4] and calls, "the warm-up loaded and ran both scales compiled"
    torch.compiler.set_stance("eager_on_recompile")  # what the boot does after its warm-ups
    graphs = _unique_graphs()

    # One piece, tiled (interior and edge tiles of other sizes), square, and after a reload.
    for width, height, scale in ((150, 130, 4), (300, 200, 4), (256, 256, 2), (330, 170, 2)):
        image = _noise(width, height)
        before = len(calls)
        out = upscaler.upscale(image, scale)
        assert out.size == (width * scale, height * scale)
        assert len(calls) > before, f"{width}x{height} x{scale} fell back to eager"
        np.testing.assert_array_equal(np.asarray(out), np.asarray(eager.upscale(image, scale)))
    assert _unique_graphs() == graphs, "a job compiled a graph"

    upscaler.release()  # VRAM pressure drops the models; the next job reloads and recompiles nothing
    before = len(calls)
    assert upscaler.upscale(_noise(200, 150), 4).size == (800, 600)
    assert len(calls) > before and _unique_graphs() == graphs


def test_only_the_repeated_blocks_are_compiled_and_a_network_without_them_whole() -> None:
    torch._dynamo.reset()
    calls: list[int] = []
    upscaler = create_upscaler(model="tiny", weights_x2=None, weights_x4=None)
    upscaler.ensure_loaded(4)
    network = upscaler._models[4].model
    assert compile_blocks(network, backend=counting_backend(calls)) == 1  # the tiny RRDBNet has one block
    compiled = [m for m in network.modules() if "forward" in vars(m)]  # compile_forward's wrapper
    assert [type(m).__name__ for m in compiled] == ["RRDB"]

    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.LeakyReLU(0.2))
    assert compile_blocks(plain, backend=counting_backend(calls)) == 1
    before = len(calls)
    plain(torch.rand(1, 3, 96, 80))
    assert len(calls) == before + 1


def test_compiled_with_inductor_the_image_matches_eager() -> None:
    # Inductor's C++ backend on the CPU: the code a GPU worker runs is generated the same way.
    torch._dynamo.reset()
    compiled = create_upscaler(model="tiny", weights_x2=None, weights_x4=None, compile_backend="inductor")
    eager = create_upscaler(model="tiny", weights_x2=None, weights_x4=None)
    compiled.warm_up()
    image = _noise(200, 136)
    for scale in (2, 4):
        a = np.asarray(compiled.upscale(image, scale)).astype(int)
        b = np.asarray(eager.upscale(image, scale)).astype(int)
        assert a.shape == b.shape == (136 * scale, 200 * scale, 3)
        assert np.abs(a - b).max() <= 2  # fused float math rounds differently, by a level at most


def _boot_once(stack: LocalStack, job_id: str, cache: str) -> tuple[dict[str, Any], dict]:
    """One worker process compiling only the upscaler serves one x4 upscale job, then is stopped."""
    stack.client("s3").put_object(Bucket=stack.bucket, Key=f"{job_id}/in.png", Body=png_bytes(120, 88))
    job = {
        "id": job_id,
        "type": "upscale",
        "input": {
            "image_url": stack.presign_get(f"{job_id}/in.png"),
            "upload_url": stack.presign_put(f"{job_id}/out.png", "image/png"),
            "scale": 4,
        },
    }
    boot, found = serve_jobs(
        stack, [job], TORCH_COMPILE="true", COMPILE_CACHE=cache, COMPILE_REGIONS="upscaler"
    )
    return boot, found[job_id]


@pytest.mark.slow
@pytest.mark.timeout(600)  # one CPU inductor compile of the tiny upscaler (~40 s idle), then a cache hit
def test_the_upscaler_compiles_at_boot_once_and_the_next_worker_loads_it_from_s3(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    remote = f"s3://{stack.bucket}/compile/{uuid.uuid4().hex[:8]}"

    first, result = _boot_once(stack, "first", f"{tmp_path / 'a'},{remote}")
    assert first["upscaler_scales"] == [2, 4]  # both loaded and compiled before the first job
    assert first["compile_cache"] == "miss" and first["graphs_compiled"] > 0
    assert result["status"] == "succeeded", result
    assert s3_image(stack, "first/out.png")[0].size == (480, 352)

    second, result = _boot_once(stack, "second", f"{tmp_path / 'b'},{remote}")
    assert second["compile_cache"] == "hit"
    # The compiled blocks came whole from the bundle: nothing traced, nothing compiled.
    assert second["graphs_compiled"] == 0 and second["dynamo_graphs"] == 0
    assert second["precompiled_from_cache"] > 0
    assert result["status"] == "succeeded", result
    assert s3_image(stack, "second/out.png")[0].size == (480, 352)


def _boot_in_process(tmp_path: Path, **settings: Any) -> Engines:
    """``build_engines`` as the worker's boot runs it, on the tiny model on the CPU with TORCH_COMPILE."""
    from worker.boot import build_engines
    from worker.config import Settings
    from worker.variant import choose_variant

    worker = Settings(model="tiny", device="cpu", torch_compile=True, hf_home=str(tmp_path), **settings)
    return build_engines(worker, choose_variant(worker, gpus=[]))


def test_the_boot_compiles_the_named_klein_regions_into_a_bundle_keyed_by_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # COMPILE_REGIONS=text_encoder through the worker's boot, inductor on the CPU: only the text
    # encoder's layers are compiled (the transformer and the VAE stay eager), and the bundle saved
    # after the miss carries the regions in its key.
    from handlers.engines.compile_cache import read_header

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # kept out of os.environ
    torch._dynamo.reset()
    engines = _boot_in_process(
        tmp_path,
        compile_regions="text_encoder",
        compile_cache=str(tmp_path / "cache"),
        compile_sizes="256x256",
    )
    klein = engines.klein
    assert klein is not None and klein.compile_regions == ("text_encoder",)
    block = klein.pipeline.transformer.transformer_blocks[0]
    assert "forward" not in vars(block)  # the transformer stayed eager (no compile_forward wrapper)
    assert all("forward" in vars(layer) for layer in klein.pipeline.text_encoder.base_model.layers)
    assert engines.boot["compile_cache"] == "miss" and engines.boot["graphs_compiled"] > 0
    (bundle,) = (tmp_path / "cache").glob("*.bundle")
    header, _ = read_header(bundle.read_bytes())
    assert header["key"]["regions"] == "text_encoder"
    assert engines.upscaler is not None and not engines.upscaler.compiled


def test_compile_regions_none_compiles_nothing_and_opens_no_cache(tmp_path: Path) -> None:
    engines = _boot_in_process(tmp_path, compile_regions="none", compile_cache=str(tmp_path / "cache"))
    assert engines.klein is not None and not engines.klein.compiled
    assert engines.boot["compile_cache"] == "not compiled"
    assert not (tmp_path / "cache").exists()


def test_without_preload_the_upscaler_is_not_compiled(tmp_path: Path) -> None:
    # Compiled on first use it would stall that job (or, after klein's warm-up, run eager anyway).
    engines = _boot_in_process(tmp_path, compile_regions="upscaler", preload_models=False)
    assert engines.upscaler is not None and not engines.upscaler.compiled
    assert engines.upscaler.loaded_scales == []


@pytest.mark.parametrize("text", ["transformer,unet", "upscaler, vea", "all"])
def test_a_bad_compile_regions_value_names_the_variable(text: str) -> None:
    from pydantic import ValidationError

    from worker.config import Settings

    with pytest.raises(ValidationError, match="COMPILE_REGIONS"):
        Settings(compile_regions=text)


def test_compile_regions_parse_and_default() -> None:
    from worker.config import Settings

    # The default is what was measured to pay on a GPU (BENCHMARKS.md): no text encoder, no upscaler.
    assert Settings().compiled_regions() == ("transformer", "vae")
    assert Settings(compile_regions=" Upscaler , transformer").compiled_regions() == (
        "transformer",
        "upscaler",
    )
    assert Settings(compile_regions="none").compiled_regions() == ()
