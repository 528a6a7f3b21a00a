"""What a job may ask for (SPEC section 2) and the worker's default limits on it.

The handlers' input models check jobs against these; the worker's settings take their defaults and
bounds from here, and so do the compile sizes and the benchmark's profile.
"""

from __future__ import annotations

from typing import Literal

MIB = 1024 * 1024

OutputFormat = Literal["png", "jpeg", "webp"]
DEFAULT_QUALITY = 90  # JPEG/WebP quality when a job names none

# Output sides, in pixels; the pipeline's latent grid needs multiples of 16.
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 256, 2048, 16
# A job's size when it names none: what the benchmark's reference-limit figures and the warm-up's
# compiled shape are for.
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1024, 1024

# Prompts per job: MAX_BATCH's default, and the most it may be set to.
DEFAULT_MAX_BATCH = 8
MAX_BATCH_CAP = 64
# Reference images per job when neither MAX_REFERENCES nor a benchmark profile says: what a 24 GB card
# holds at 1024x1024 with 4B BF16 (seed benchmark). MAX_REFERENCES may be set up to the cap.
DEFAULT_MAX_REFERENCES = 10
MAX_REFERENCES_CAP = 64
# LoRA adapters per job: MAX_LORAS's default and cap.
DEFAULT_MAX_LORAS = 2
MAX_LORAS_CAP = 8

# Per input image: MAX_DOWNLOAD_BYTES's default (SPEC section 3) ...
MAX_DOWNLOAD_BYTES = 32 * MIB
# ... and MAX_DOWNLOAD_PIXELS's, 8192x8192: above any camera (~50 MP) and any input the contract can
# use, below Pillow's own bomb threshold (~89 MP), and the decoded RGB copy stays under 200 MiB of host
# memory.
MAX_DOWNLOAD_PIXELS = 8192 * 8192
