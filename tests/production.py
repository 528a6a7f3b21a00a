"""What a deployment loads, made small enough for a CPU: the tiny klein pipeline written as a
diffusers folder (``save_pretrained``, loaded as ``MODEL=klein-4b MODEL_PATH=...``) and
Real-ESRGAN-layout checkpoints (basicsr key names under ``params_ema``, as in the official
``RealESRGAN_x4plus.pth``) served over loopback HTTP as ``UPSCALER_WEIGHTS_X2/_X4`` URLs.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from handlers.engines.tiny import build_tiny_pipeline
from handlers.engines.upscaler_loader import random_realesrgan
from tests.scripted_http import ScriptedServer

# A worker process imports torch and diffusers and loads the folder before it can answer.
BOOT_TIMEOUT_S = 300
# Two RRDB blocks: more than MODEL=tiny's one, so the file is not the tiny network in disguise.
CHECKPOINT_FILTERS = 8
CHECKPOINT_BLOCKS = 2

# spandrel's ESRGAN module names -> the basicsr RRDBNet names the Real-ESRGAN release files use.
_BASICSR_NAMES = [
    (re.compile(r"^model\.0\."), "conv_first."),
    (re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\."), r"body.\1.rdb\2.conv\3."),
    (re.compile(rf"^model\.1\.sub\.{CHECKPOINT_BLOCKS}\."), "conv_body."),
    (re.compile(r"^model\.3\."), "conv_up1."),
    (re.compile(r"^model\.6\."), "conv_up2."),
    (re.compile(r"^model\.8\."), "conv_hr."),
    (re.compile(r"^model\.10\."), "conv_last."),
]


def write_klein_folder(folder: Path) -> Path:
    """The tiny pipeline saved in the layout of the hub's FLUX.2-klein folders."""
    build_tiny_pipeline().save_pretrained(folder)
    return folder


def deep_tiny_pipeline(depth: int = 30) -> Any:
    """The tiny pipeline with a text encoder as deep as the official ones stack: layers (9, 18, 27)
    of ``depth`` (>= 27), so the layers after 27 are what a cut leaves out; its head is untied,
    like Qwen3-8B's (klein-9B), so it is a tensor of its own in the files."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    pipeline = build_tiny_pipeline()
    tiny = pipeline.text_encoder.config
    config = Qwen3Config(
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=depth,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        head_dim=tiny.head_dim,
        vocab_size=tiny.vocab_size,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    pipeline.text_encoder = Qwen3ForCausalLM(config).eval()
    return pipeline


def realesrgan_checkpoint(scale: int) -> bytes:
    """A ``torch.save``d Real-ESRGAN x2plus/x4plus-layout checkpoint with random weights."""
    network = random_realesrgan(scale, num_filters=CHECKPOINT_FILTERS, num_blocks=CHECKPOINT_BLOCKS, seed=7)
    with torch.no_grad():  # mid-grey output, so images are not clipped to black
        network.model[-1].bias.fill_(0.5)
    state: dict[str, Any] = {}
    for name, tensor in network.state_dict().items():
        for pattern, replacement in _BASICSR_NAMES:
            name, found = pattern.subn(replacement, name)
            if found:
                break
        state[name] = tensor
    buffer = io.BytesIO()
    torch.save({"params_ema": state}, buffer)
    return buffer.getvalue()


def serve_checkpoints(server: ScriptedServer) -> dict[int, str]:
    """Put an x2 and an x4 checkpoint on ``server``; returns their URLs by scale."""
    urls = {}
    for scale in (2, 4):
        path = f"/releases/RealESRGAN_x{scale}plus.pth"
        server.bodies[path] = realesrgan_checkpoint(scale)
        server.content_types[path] = "application/octet-stream"
        urls[scale] = server.url + path
    return urls


def partial_copy(folder: Path, dest: Path) -> Path:
    """``folder`` with the transformer's weights file missing (an interrupted download)."""
    shutil.copytree(folder, dest)
    (dest / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    return dest


def corrupt_copy(folder: Path, dest: Path) -> Path:
    """``folder`` with the transformer's weights file cut in half (a disk or copy error)."""
    shutil.copytree(folder, dest)
    weights = dest / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return dest


def log_lines(stderr: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines; anything else on stderr (a traceback, a progress bar, a
    library's print) fails the parse, which is the point."""
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def production_env(
    tmp_path: Path, klein_folder: Path, weight_urls: dict[int, str], **env: Any
) -> dict[str, Any]:
    """What an operator sets for a real model, device chosen by the worker (no GPU here: CPU)."""
    return {
        "MODEL": "klein-4b",
        "MODEL_PATH": str(klein_folder),
        "DEVICE": "",
        "UPSCALER_WEIGHTS_X2": weight_urls[2],
        "UPSCALER_WEIGHTS_X4": weight_urls[4],
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "ALLOW_PRIVATE_URLS": "true",
        "RETRY_BACKOFF_SECONDS": "0",
        **env,
    }
