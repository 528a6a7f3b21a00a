"""What a compiled worker compiles (TORCH_COMPILE, COMPILE_REGIONS): the regions and the default.

Each region is compiled shape-generic at boot and warmed before the first job:

- ``transformer``: the transformer's repeated blocks (one graph per block class);
- ``vae``: the VAE decoder, in channels_last;
- ``text_encoder``: the Qwen3 text encoder's decoder layers, at its one padded prompt length;
- ``upscaler``: the Real-ESRGAN networks' residual blocks, every configured scale loaded at boot
  (with PRELOAD_MODELS; without it the upscaler is not compiled: its first use would compile in a job).

The default is what was measured to pay on an H100 (BENCHMARKS.md): the transformer and the VAE
decoder. The text encoder and the upscaler stay opt-in until a GPU run shows they pay for their boot
time (``scripts/gpu_checks.sh OUT issue10-regions``).
"""

from __future__ import annotations

# The klein pipeline's regions (handlers/engines/speed.py compiles them); "upscaler" is the upscaler's.
KLEIN_COMPILE_REGIONS = ("transformer", "vae", "text_encoder")
COMPILE_REGIONS = (*KLEIN_COMPILE_REGIONS, "upscaler")
DEFAULT_COMPILE_REGIONS = ("transformer", "vae")


def klein_regions(regions: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The regions the klein engine compiles, out of COMPILE_REGIONS' (the upscaler's is its own)."""
    return tuple(region for region in regions if region in KLEIN_COMPILE_REGIONS)


def parse_regions(text: str) -> tuple[str, ...]:
    """``"transformer, vae"`` -> ("transformer", "vae"); "none" or "" -> (); an unknown name raises
    a ValueError naming COMPILE_REGIONS and the known regions."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in COMPILE_REGIONS]
    if unknown:
        raise ValueError(
            f"COMPILE_REGIONS: unknown region(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(COMPILE_REGIONS)} (or none)"
        )
    return tuple(region for region in COMPILE_REGIONS if region in names)
