"""The Real-ESRGAN upscaler through spandrel: tiny random weights, checkpoint files, tiling."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from spandrel.architectures.ESRGAN import ESRGAN

from handlers.engines.tiling import _spans
from handlers.engines.upscaler import UNTILED_BYTES_PER_OUTPUT_PIXEL, Upscaler
from handlers.engines.upscaler_loader import create_upscaler, tiny_state_dict
from handlers.engines.weights import REALESRGAN_X2PLUS_URL, REALESRGAN_X4PLUS_URL, cache_path
from handlers.errors import InvalidInput, JobError
from tests.scripted_http import ScriptedServer


def _noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def tiny() -> Upscaler:
    return create_upscaler(model="tiny", weights_x2=None, weights_x4=None)


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize(("width", "height"), [(64, 64), (70, 45)])
def test_tiny_upscale_is_exactly_scale_times_the_size(
    tiny: Upscaler, scale: int, width: int, height: int
) -> None:
    # 70x45 is not a multiple of 4: the x2 model's pixel-unshuffle input needs padding and cropping.
    result = tiny.upscale(_noise_image(width, height), scale)
    assert result.size == (width * scale, height * scale)
    assert result.mode == "RGB"
    assert _pixels(result).std() > 5


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_any_pillow_mode_comes_out_rgb(tiny: Upscaler, mode: str) -> None:
    result = tiny.upscale(_noise_image(32, 32, mode=mode), 2)
    assert result.mode == "RGB"
    assert result.size == (64, 64)


def test_load_is_timed_once_and_release_unloads() -> None:
    upscaler = create_upscaler(model="tiny", weights_x2=None, weights_x4=None, device="cpu")
    assert upscaler.loaded_scales == []
    assert upscaler.ensure_loaded(4) > 0.0
    assert upscaler.ensure_loaded(4) == 0.0
    assert upscaler.loaded_scales == [4]
    upscaler.upscale(_noise_image(16, 16), 2)  # loads x2 on demand
    assert upscaler.loaded_scales == [2, 4]
    upscaler.release()
    assert upscaler.loaded_scales == []
    assert upscaler.ensure_loaded(2) > 0.0


def test_unknown_scale_is_an_error(tiny: Upscaler) -> None:
    with pytest.raises(InvalidInput, match="x3"):
        tiny.ensure_loaded(3)


@pytest.mark.parametrize("scale", [2, 4])
def test_tiled_matches_untiled(scale: int) -> None:
    image = _noise_image(100, 76, seed=scale)
    whole = create_upscaler(model="tiny", weights_x2=None, weights_x4=None, tile_size=0).upscale(image, scale)
    tiled = create_upscaler(
        model="tiny", weights_x2=None, weights_x4=None, tile_size=40, tile_overlap=12
    ).upscale(image, scale)
    assert len(_spans(76, 40, 12, 4)) == 2 and len(_spans(100, 40, 12, 4)) == 3  # six tiles, really tiled
    diff = np.abs(_pixels(whole) - _pixels(tiled))
    assert tiled.size == whole.size
    # Tiles see less context at their inner borders; the blended seams stay within a few levels.
    assert diff.max() <= 8
    assert diff.mean() < 0.5


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "align"),
    [(100, 48, 16, 4), (257, 64, 16, 1), (33, 32, 8, 4), (1024, 512, 32, 4)],
)
def test_tile_spans_cover_the_axis_with_overlap(length: int, tile: int, overlap: int, align: int) -> None:
    spans = _spans(length, tile, overlap, align)
    assert spans[0][0] == 0
    assert spans[-1][1] == length
    assert all(start % align == 0 for start, _ in spans)
    for (_, prev_end), (start, _) in zip(spans, spans[1:], strict=False):
        assert prev_end - start >= 2 * overlap  # the cross-fade band
    assert all(end - start <= tile + 2 * (overlap + align) for start, end in spans)


def test_checkpoint_files_load_through_spandrel(tmp_path: Path, tiny: Upscaler) -> None:
    x2 = tmp_path / "tiny_x2.safetensors"
    x4 = tmp_path / "tiny_x4.pth"
    save_file(tiny_state_dict(2), str(x2))
    torch.save(tiny_state_dict(4), x4)
    real = create_upscaler(model="real", weights_x2=str(x2), weights_x4=str(x4), device="cpu")
    image = _noise_image(40, 36)
    for scale in (2, 4):
        assert real.ensure_loaded(scale) > 0.0
        result = real.upscale(image, scale)
        assert result.size == (40 * scale, 36 * scale)
        # Same weights as the tiny model, so the same pixels: the file path is the only difference.
        assert np.array_equal(_pixels(result), _pixels(tiny.upscale(image, scale)))


def test_checkpoint_of_the_wrong_scale_is_refused(tmp_path: Path) -> None:
    x4 = tmp_path / "x4.pth"
    torch.save(tiny_state_dict(4), x4)
    upscaler = create_upscaler(model="real", weights_x2=str(x4), weights_x4=None, device="cpu")
    with pytest.raises(ValueError, match="x2 hold a x4"):
        upscaler.ensure_loaded(2)
    with pytest.raises(InvalidInput, match="x4 is not available .*UPSCALER_WEIGHTS_X4 is unset"):
        upscaler.ensure_loaded(4)


def test_missing_weights_file_fails_at_creation(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="UPSCALER_WEIGHTS_X4: .*missing.pth"):
        create_upscaler(model="real", weights_x2=None, weights_x4=str(tmp_path / "missing.pth"))


def _serve_checkpoint(scripted: ScriptedServer, scale: int) -> str:
    buffer = io.BytesIO()
    torch.save(tiny_state_dict(scale), buffer)
    path = f"/weights/tiny_x{scale}.pth"
    scripted.bodies[path] = buffer.getvalue()
    scripted.content_types[path] = "application/octet-stream"
    return scripted.url + path


def test_weight_urls_are_downloaded_once_and_cached(
    tmp_path: Path, scripted: ScriptedServer, tiny: Upscaler
) -> None:
    url = _serve_checkpoint(scripted, 4)
    cache = tmp_path / "cache"
    upscaler = create_upscaler(model="real", weights_x2=None, weights_x4=url, device="cpu", cache_dir=cache)
    assert scripted.count("/weights/tiny_x4.pth") == 0  # nothing fetched at creation
    image = _noise_image(24, 20)
    result = upscaler.upscale(image, 4)
    assert scripted.count("/weights/tiny_x4.pth") == 1
    assert np.array_equal(_pixels(result), _pixels(tiny.upscale(image, 4)))
    cached = cache_path(url, cache)
    assert cached.is_file() and cached.name.endswith("-tiny_x4.pth")
    assert [p.name for p in cache.iterdir()] == [cached.name]  # no partial file left behind
    # A new worker (same cache) loads from disk without a request.
    again = create_upscaler(model="real", weights_x2=None, weights_x4=url, device="cpu", cache_dir=cache)
    assert again.ensure_loaded(4) > 0.0
    assert scripted.count("/weights/tiny_x4.pth") == 1


def test_failed_weight_download_is_retryable_and_leaves_no_file(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    url = scripted.url + "/status/503/RealESRGAN_x4plus.pth"
    upscaler = create_upscaler(
        model="real", weights_x2=None, weights_x4=url, device="cpu", cache_dir=tmp_path
    )
    with pytest.raises(JobError, match="could not be downloaded") as info:
        upscaler.ensure_loaded(4)
    assert info.value.retryable
    assert list(tmp_path.iterdir()) == []
    assert upscaler.loaded_scales == []


def test_after_job_keeps_the_model_on_the_cpu() -> None:
    upscaler = create_upscaler(model="tiny", weights_x2=None, weights_x4=None, device="cpu")
    upscaler.ensure_loaded(2)
    assert upscaler.free_memory is None  # no VRAM to hand back
    assert upscaler.after_job() is False
    assert upscaler.loaded_scales == [2]


def test_after_job_releases_only_when_free_memory_is_short() -> None:
    free = {"bytes": 10 << 30}
    reads: list[int] = []

    def reader() -> int:
        reads.append(free["bytes"])
        return free["bytes"]

    upscaler = Upscaler(
        sources={4: lambda: tiny_state_dict(4)},
        device=torch.device("cpu"),
        keep_free_bytes=4 << 30,
        free_memory=reader,
    )
    assert upscaler.after_job() is False and reads == []  # nothing loaded: nothing to read or drop
    upscaler.ensure_loaded(4)
    assert upscaler.after_job() is False  # 10 GiB free: keep it for the next upscale
    assert upscaler.loaded_scales == [4]
    free["bytes"] = 3 << 30
    assert upscaler.after_job() is True  # 3 GiB < 4 GiB: give the memory back
    assert upscaler.loaded_scales == []
    assert upscaler.ensure_loaded(4) > 0.0  # and loads again on demand


def test_official_weight_urls() -> None:
    assert REALESRGAN_X2PLUS_URL.endswith("/v0.2.1/RealESRGAN_x2plus.pth")
    assert REALESRGAN_X4PLUS_URL.endswith("/v0.1.0/RealESRGAN_x4plus.pth")
    assert all(
        url.startswith("https://github.com/xinntao/Real-ESRGAN/releases/download/")
        for url in (REALESRGAN_X2PLUS_URL, REALESRGAN_X4PLUS_URL)
    )


def _upscaler_with_free(free_bytes: int) -> Upscaler:
    return Upscaler(
        sources={4: lambda: tiny_state_dict(4)},
        device=torch.device("cpu"),
        tile_size=40,
        tile_overlap=12,
        free_memory=lambda: free_bytes,
    )


def test_runs_untiled_when_free_memory_holds_it_and_tiled_when_not() -> None:
    # Untiled is twice as fast on an H100 (BENCHMARKS.md); tiles only where memory is short.
    image = _noise_image(100, 76, seed=3)
    whole = create_upscaler(model="tiny", weights_x2=None, weights_x4=None, tile_size=0).upscale(image, 4)
    tiled = create_upscaler(
        model="tiny", weights_x2=None, weights_x4=None, tile_size=40, tile_overlap=12
    ).upscale(image, 4)
    assert not np.array_equal(_pixels(whole), _pixels(tiled))  # the two paths are told apart
    needed = 400 * 304 * UNTILED_BYTES_PER_OUTPUT_PIXEL
    roomy, tight = _upscaler_with_free(needed), _upscaler_with_free(needed - 1)
    assert roomy.tile_for(100, 76, 4) == 0 and tight.tile_for(100, 76, 4) == 40
    np.testing.assert_array_equal(_pixels(roomy.upscale(image, 4)), _pixels(whole))
    np.testing.assert_array_equal(_pixels(tight.upscale(image, 4)), _pixels(tiled))


@pytest.fixture
def oom_above_tile():
    """Every ESRGAN forward on an input bigger than a 40 px tile plus its 2x12 px context raises
    torch's out-of-memory error, as a GPU short of memory would; returns the sizes it was called with."""
    calls: list[tuple[int, int]] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, ESRGAN):
            height, width = args[0].shape[-2:]
            calls.append((height, width))
            if max(height, width) > 40 + 2 * 12:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    yield calls
    handle.remove()


def test_untiled_out_of_memory_retries_the_same_image_in_tiles(
    oom_above_tile: list, caplog: pytest.LogCaptureFixture
) -> None:
    image = _noise_image(100, 76, seed=3)
    expected = _pixels(_upscaler_with_free(0).upscale(image, 4))  # tiled
    oom_above_tile.clear()
    result = _upscaler_with_free(1 << 40).upscale(image, 4)
    np.testing.assert_array_equal(_pixels(result), expected)
    assert oom_above_tile[0] == (76, 100) and len(oom_above_tile) == 1 + 6  # untiled, then six tiles
    assert "retrying in 40 px tiles" in caplog.text


def test_tiled_out_of_memory_is_raised_for_the_handler(oom_above_tile: list) -> None:
    upscaler = Upscaler(
        sources={4: lambda: tiny_state_dict(4)}, device=torch.device("cpu"), tile_size=80, tile_overlap=12
    )
    with pytest.raises(torch.OutOfMemoryError):
        upscaler.upscale(_noise_image(100, 76), 4)


def test_a_pinned_url_whose_file_differs_is_refused_and_not_cached(
    tmp_path: Path, scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from handlers.engines import weights

    url = _serve_checkpoint(scripted, 4)
    # The release's pin, moved to this URL: the served file is not the release file.
    monkeypatch.setitem(weights.PINNED_SHA256, url, weights.PINNED_SHA256[REALESRGAN_X4PLUS_URL])
    upscaler = create_upscaler(
        model="real", weights_x2=None, weights_x4=url, device="cpu", cache_dir=tmp_path
    )
    with pytest.raises(JobError, match="UPSCALER_WEIGHTS_X4: .* is not the pinned release file"):
        upscaler.fetch()
    assert list(tmp_path.iterdir()) == []  # nothing left under the final name, no partial file


def test_a_cached_file_that_fails_its_pin_is_fetched_again(
    tmp_path: Path, scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from handlers.engines import weights

    url = _serve_checkpoint(scripted, 4)
    body = scripted.bodies["/weights/tiny_x4.pth"]
    monkeypatch.setitem(weights.PINNED_SHA256, url, hashlib.sha256(body).hexdigest())
    cached = cache_path(url, tmp_path)
    cached.write_bytes(body[: len(body) // 2])  # a truncated copy from an older, unchecked worker
    create_upscaler(model="real", weights_x2=None, weights_x4=url, device="cpu", cache_dir=tmp_path).fetch()
    assert cached.read_bytes() == body and scripted.count("/weights/tiny_x4.pth") == 1


@pytest.mark.parametrize(
    ("path", "code", "retryable"),
    [("/status/404/x4.pth", "download_failed", False), ("/status/503/x4.pth", "download_failed", True)],
)
def test_weight_download_failures_follow_the_contracts_codes(
    tmp_path: Path, scripted: ScriptedServer, path: str, code: str, retryable: bool
) -> None:
    upscaler = create_upscaler(
        model="real", weights_x2=None, weights_x4=scripted.url + path, device="cpu", cache_dir=tmp_path
    )
    with pytest.raises(JobError) as info:
        upscaler.ensure_loaded(4)
    assert (info.value.code, info.value.retryable) == (code, retryable)
    assert "UPSCALER_WEIGHTS_X4" in info.value.message


def test_a_weight_download_that_stalls_is_a_timeout(tmp_path: Path, scripted: ScriptedServer) -> None:
    from handlers.engines.weights import resolve_weights

    with pytest.raises(JobError) as info:
        resolve_weights(scripted.url + "/slow/3/x4.pth", cache_dir=tmp_path, timeout=0.5, setting="X")
    assert (info.value.code, info.value.retryable) == ("timeout", True)
