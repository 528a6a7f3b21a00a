"""scripts/benchmark_vram.py on the tiny model (CPU), its profile, and the limits derived from it."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from klein_facts.profile import (
    BatchRun,
    BenchmarkProfile,
    ProfileError,
    ReferenceRun,
    ResolutionRun,
    load_profile,
)
from klein_facts.variants import GIB
from measurement.limits import derive_limits, headroom_bytes, recommend
from tests.helpers import load_script
from tests.oom_engine import OomAboveEngine
from worker.config import Settings

# Small enough for a 2-core CPU: one 128x128 size, 64 px references, one step, one run.
SMALL = ["--resolutions", "128x128", "--refs", "0,1,2,3", "--batches", "1,2", "--runs", "1", "--steps", "1"]
SMALL += ["--ref-side", "64", "--upscale-input", "32"]


@pytest.fixture(scope="module")
def bench():
    module = load_script("benchmark_vram")
    return module


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    """One real CLI run on the tiny model, building its own engines: (exit status, profile path, stdout)."""
    out = tmp_path_factory.mktemp("bench") / "profile.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = bench.main(["--model", "tiny", *SMALL, "--output", str(out)])
    return status, out, stdout.getvalue()


def test_tiny_run_writes_a_valid_profile_and_a_table(bench, tiny_run):
    status, out, table = tiny_run
    assert status == bench.EXIT_FITS

    profile = BenchmarkProfile.model_validate_json(out.read_text())
    assert profile.variant.model == "tiny" and profile.variant.label == "flux2-klein-tiny"
    assert profile.gpu is None and profile.rest_vram is None  # CPU: no VRAM figures
    assert profile.software.torch == torch.__version__
    [size] = profile.resolutions
    assert (size.width, size.height, size.oom) == (128, 128, False)
    assert size.latency_s_median > 0 and len(size.latency_s_all) == 1
    assert size.peak_torch_bytes is None and size.peak_nvml_bytes is None
    assert [(r.count, r.oom) for r in profile.references] == [(0, False), (1, False), (2, False), (3, False)]
    assert all(r.latency_s > 0 for r in profile.references)
    assert [(b.size, b.oom) for b in profile.batches] == [(1, False), (2, False)]
    assert [(u.scale, u.input, u.error) for u in profile.upscaler] == [(2, 32, None), (4, 32, None)]
    assert profile.limits.max_references == {"128x128": 3}
    assert profile.recommendation.fits and profile.recommendation.model == "tiny"

    assert "| | flux2-klein-tiny |" in table and "| inference 128x128, 1 steps |" in table
    assert "| max references 128x128 | 3 |" in table and "fits=true" in table


def test_the_worker_reads_its_limits_from_a_profile_file(tiny_run):
    settings = Settings(model="tiny", benchmark_profile=str(tiny_run[1]))

    profile = load_profile(settings.benchmark_profile)

    assert profile.limits.max_references_default == 3
    assert profile.limits.max_batch == 2
    assert (profile.recommendation.fits, profile.recommendation.model) == (True, "tiny")


def test_an_injected_oom_is_recorded_and_ends_the_reference_series(bench, engines):
    engine = OomAboveEngine(engines.klein, max_refs=1)
    argv = ["--model", "tiny", *SMALL, "--batches", "1", "--upscale-input", "0", "--output", "unused.json"]
    args = bench.parse_args(argv)

    profile = bench.run_benchmark(engine, engines.upscaler, args)

    assert [(r.count, r.oom) for r in profile.references] == [(0, False), (1, False), (2, True)]
    assert profile.references[2].latency_s is None
    assert (3, 128 * 128) not in engine.calls  # the series stopped at the first OOM
    assert engine.frees >= 1  # memory handed back after the OOM
    assert profile.limits.max_references == {"128x128": 1}
    assert [b.oom for b in profile.batches] == [False]  # the next series still ran
    assert all(u.error.startswith("skipped") for u in profile.upscaler)
    assert profile.recommendation.fits  # references are a limit, not a misfit


def test_every_series_point_is_warmed_before_it_is_timed(bench, engines):
    engine = OomAboveEngine(engines.klein)  # no budget: it only records the calls
    argv = ["--model", "tiny", *SMALL, "--refs", "0,1", "--batches", "1", "--upscale-input", "0"]
    args = bench.parse_args([*argv, "--output", "unused.json"])

    profile = bench.run_benchmark(engine, engines.upscaler, args)

    pixels = 128 * 128
    resolution = [(0, pixels)] * 2  # one warm-up, --runs 1
    # Then each reference count and each batch size: a warm-up call, then the timed one.
    assert engine.calls == [
        *resolution,
        (0, pixels),
        (0, pixels),
        (1, pixels),
        (1, pixels),
        (0, pixels),
        (0, pixels),
    ]
    assert all(r.latency_s and r.latency_s > 0 for r in profile.references)


def test_exit_status_follows_fits(bench, engines, tmp_path, capsys):
    out = tmp_path / "nofit.json"
    engine = OomAboveEngine(engines.klein, max_pixels=128 * 128)
    argv = ["--model", "tiny", *SMALL, "--resolutions", "128x128,256x256", "--upscale-input", "0"]

    assert bench.main([*argv, "--output", str(out)], engines=(engine, engines.upscaler, {})) == 3

    profile = load_profile(out)
    assert [r.oom for r in profile.resolutions] == [False, True]
    assert not profile.recommendation.fits and "out of memory at 256x256" in profile.recommendation.reason
    assert "fits=false" in capsys.readouterr().out


def test_usage_errors_exit_2(bench, tmp_path):
    out = str(tmp_path / "p.json")
    assert bench.main(["--model", "klein-5b", "--output", out]) == bench.EXIT_USAGE
    assert bench.main(["--model", "tiny", "--resolutions", "100x100", "--output", out]) == bench.EXIT_USAGE
    argv = ["--model", "klein-4b", "--random-weights", "--device", "cpu", "--output", out]
    assert bench.main(argv) == bench.EXIT_USAGE
    assert not Path(out).exists()


def test_load_profile_names_the_file_and_the_field(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ProfileError, match="broken.json.*not JSON"):
        load_profile(broken)

    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"schema_version": 1, "created_at": "2026-01-01T00:00:00Z"}))
    with pytest.raises(ProfileError, match=r"incomplete.json.*recommendation: Field required"):
        load_profile(incomplete)

    with pytest.raises(ProfileError, match="missing.json.*cannot read"):
        load_profile(tmp_path / "missing.json")


# derive_limits / recommend on GPU-like figures (a 24 GiB card, 4B BF16-like peaks).
CARD = 24 * GIB


def _res(width: int, height: int, peak_gib: float | None, oom: bool = False) -> ResolutionRun:
    peak = None if peak_gib is None else int(peak_gib * GIB)
    return ResolutionRun(width=width, height=height, latency_s_median=1.0, peak_torch_bytes=peak, oom=oom)


def _refs(counts_gib: dict[int, float | None], size: int = 1024) -> list[ReferenceRun]:
    return [
        ReferenceRun(
            count=count,
            width=size,
            height=size,
            latency_s=None if gib is None else 1.0 + 0.5 * count,
            peak_torch_bytes=None if gib is None else int(gib * GIB),
            peak_nvml_bytes=None if gib is None else int((gib + 0.5) * GIB),  # context + cache on top
            oom=gib is None,
        )
        for count, gib in counts_gib.items()
    ]


def test_headroom_is_ten_percent_or_one_and_a_half_gib():
    assert headroom_bytes(CARD) == int(2.4 * GIB)
    assert headroom_bytes(8 * GIB) == int(1.5 * GIB)


def test_limits_keep_headroom_and_estimate_unmeasured_sizes():
    # Budget = 24 - 2.4 = 21.6 GiB, judged on the NVML figure (torch + 0.5 GiB).
    references = _refs({0: 17.0, 4: 19.0, 8: 21.0, 12: 23.0, 16: None})
    resolutions = [_res(512, 512, 15.5), _res(1024, 1024, 17.0), _res(2048, 2048, 30.0, oom=True)]
    batches = [
        BatchRun(size=s, width=1024, height=1024, peak_torch_bytes=int(g * GIB))
        for s, g in ((1, 17), (2, 19))
    ] + [BatchRun(size=4, width=1024, height=1024, oom=True)]

    limits = derive_limits(total_bytes=CARD, resolutions=resolutions, references=references, batches=batches)

    # 12 references ran but 23.5 GiB leaves less than the headroom: the limit is 8.
    assert limits.max_references["1024x1024"] == 8
    assert limits.max_references_default == 8
    assert limits.bytes_per_reference == int(0.5 * GIB) and limits.seconds_per_reference == 0.5
    # 512x512: (21.6 - 15.5) / 0.5 = 12 estimated, capped at the 8 measured anywhere; OOM size: 0.
    assert limits.max_references["512x512"] == 8 and limits.max_references["2048x2048"] == 0
    assert set(limits.max_references_estimated) == {"512x512", "2048x2048"}
    assert limits.max_batch == 2 and limits.headroom_bytes == headroom_bytes(CARD)


def test_estimates_shrink_with_a_heavier_base_and_default_picks_the_largest_size_up_to_1024():
    references = _refs({0: 10.0, 10: 15.0}, size=768)  # 0.5 GiB per reference, 10 fit
    resolutions = [_res(768, 768, 10.0), _res(1024, 768, 19.0), _res(1536, 1536, 12.0)]

    limits = derive_limits(total_bytes=CARD, resolutions=resolutions, references=references, batches=[])

    assert limits.max_references["768x768"] == 10
    assert limits.max_references["1024x768"] == 5  # (21.6 - 19.0) / 0.5
    assert limits.max_references_default == 5  # 1024x768 is the largest size <= 1024x1024 pixels
    assert limits.max_batch is None  # no batch series measured


def test_cpu_limits_are_the_measured_series():
    references = [ReferenceRun(count=c, width=256, height=256, latency_s=0.1) for c in (0, 1, 2)]
    limits = derive_limits(
        total_bytes=None, resolutions=[_res(256, 256, None)], references=references, batches=[]
    )
    assert limits.max_references == {"256x256": 2} and limits.headroom_bytes is None


def test_recommendation_judges_the_target_size_and_suggests_a_smaller_variant():
    fits = recommend(
        model="klein-4b", quantization="none", total_bytes=CARD, resolutions=[_res(1024, 1024, 17.3)]
    )
    assert fits.fits and (fits.model, fits.quantization) == ("klein-4b", "none")

    # 1024x1024 is the target even when larger sizes were asked; 23 GiB + 2.4 GiB > 24 GiB.
    tight = recommend(
        model="klein-9b",
        quantization="fp8",
        total_bytes=CARD,
        resolutions=[_res(1024, 1024, 23.0), _res(512, 512, 20.0)],
    )
    assert not tight.fits and (tight.model, tight.quantization) == ("klein-4b", "none")
    assert "headroom" in tight.reason

    largest = recommend(
        model="klein-4b", quantization="fp8", total_bytes=CARD, resolutions=[_res(768, 1024, 1, oom=True)]
    )
    assert not largest.fits and largest.model is None and "out of memory at 768x1024" in largest.reason


def test_random_weight_configs_have_the_published_sizes():
    from handlers.engines.klein_loader import prompt_settings
    from handlers.engines.upscaler import Upscaler
    from measurement.random_weights import build_random_pipeline, realesrgan_state_dict

    def billions(module: torch.nn.Module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)

    small = build_random_pipeline("klein-4b", device="meta")  # structure only, no memory
    assert (billions(small.transformer), billions(small.text_encoder)) == (3.88, 4.02)
    assert small.transformer.dtype == torch.bfloat16 and small.vae_scale_factor == 8
    assert prompt_settings(small) == ((9, 18, 27), 512)  # the real text layers and prompt length

    large = build_random_pipeline("klein-9b", device="meta")
    assert (billions(large.transformer), billions(large.text_encoder)) == (9.08, 8.19)

    # The Real-ESRGAN layouts load through the worker's own spandrel path as x2 and x4 models.
    upscaler = Upscaler(
        sources={s: lambda s=s: realesrgan_state_dict(s) for s in (2, 4)}, device=torch.device("cpu")
    )
    assert upscaler.ensure_loaded(2) >= 0 and upscaler.ensure_loaded(4) >= 0
    assert upscaler.loaded_scales == [2, 4]


def test_a_compiled_engine_is_warmed_before_anything_is_timed(bench, capsys):
    # --compile on a GPU gives an engine with compiled=True; the eager backend stands in on CPU.
    from handlers.engines.klein_loader import create_klein_engine
    from handlers.engines.speed import compile_pipeline
    from handlers.engines.upscaler_loader import create_upscaler

    engine = create_klein_engine(model="tiny")
    compile_pipeline(engine.pipeline, backend="eager")
    engine.compiled = True
    upscaler = create_upscaler(model="tiny", weights_x2=None, weights_x4=None)
    args = bench.parse_args(
        ["--model", "tiny", *SMALL, "--refs", "0", "--batches", "1", "--output", "x.json"]
    )

    profile = bench.run_benchmark(engine, upscaler, args)

    assert profile.settings.compiled is True and profile.settings.compile_warmup_s > 0
    assert "| torch.compile | yes, " in bench.markdown_table(profile)


def test_compile_is_recorded_as_off_where_it_does_not_apply(bench, tmp_path):
    out = tmp_path / "profile.json"
    assert bench.main(["--model", "tiny", *SMALL, "--compile", "--output", str(out)]) == bench.EXIT_FITS
    profile = load_profile(str(out))
    assert (profile.settings.compiled, profile.settings.compile_warmup_s) == (False, None)  # CPU: eager
