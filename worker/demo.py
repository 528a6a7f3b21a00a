"""`python -m worker demo`: the whole loop on one machine, no GPU, no cloud.

Starts moto's SQS + S3 on loopback, puts sample inputs in a bucket, enqueues sample jobs
(a batch with references, a plain batch, an upscale, a LoRA job, one invalid job, and last an
urgent upscale on the high-priority queue, which the worker takes first), runs the real worker
on them in burst mode with a progress display, then saves every image under ./outputs/ and
prints the results.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from worker.local import LocalStack

log = logging.getLogger(__name__)

DEMO_SIZE = 256  # the contract's smallest side: quick on CPU with MODEL=tiny
REAL_SIZE = 1024  # what the real model is made for
URGENT_JOB_ID = "demo-urgent-upscale"  # enqueued last, on the high-priority queue: taken first


def default_model(*, gpu_found: bool, model_path: str | None, hub_cache: str | None = None) -> str:
    """The demo's model when MODEL is not set: the real one only where a GPU and its weights are
    present (a local MODEL_PATH or klein-4B already in the Hugging Face cache), else tiny."""
    if not gpu_found:
        return "tiny"
    if model_path:
        return "auto"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(
        "black-forest-labs/FLUX.2-klein-4B", "model_index.json", cache_dir=hub_cache
    )
    return "auto" if isinstance(cached, str) else "tiny"


def sample_image(width: int, height: int, hue: int) -> Image.Image:
    """A gradient with shapes: something visibly an image, made without any download."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        draw.line([(0, y), (width, y)], fill=((hue + y) % 256, (2 * y) % 256, (255 - y) % 256))
    draw.ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], outline=(255, 255, 255), width=4)
    return image


def put_png(stack: LocalStack, key: str, image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    stack.client("s3").put_object(Bucket=stack.bucket, Key=key, Body=buf.getvalue(), ContentType="image/png")
    return stack.presign_get(key)


# Layers every klein transformer has (tiny and real, fused or not): what the demo adapter targets.
_DEMO_LORA_LAYERS = ("attn.to_out.0", "attn.to_add_out", "ff.linear_in", "attn.to_qkv_mlp_proj")


def demo_adapter(targets: Mapping[str, tuple[int, int]], *, rank: int = 4, seed: int = 0) -> bytes:
    """A random-weight LoRA in diffusers' safetensors layout for the loaded transformer's layers
    (``targets``: name -> (in, out)). Made here so the demo needs no download; it shows that an
    adapter applies, not a style."""
    import torch
    from safetensors.torch import save

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in sorted(targets.items()):
        if name.endswith(_DEMO_LORA_LAYERS):
            tensors[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            )
            tensors[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(fan_out, rank, generator=generator) * 0.3
            )
    return save(tensors)


def sample_jobs(
    stack: LocalStack, size: int = DEMO_SIZE, adapter: bytes | None = None
) -> list[dict[str, Any]]:
    reference = put_png(stack, "inputs/reference.png", sample_image(size, size, 40))
    photo = put_png(stack, "inputs/photo.png", sample_image(128, 96, 160))
    jobs = [
        {
            "id": "demo-story-with-reference",
            "type": "generate",
            "input": {
                "prompts": ["Scene 1: a hero enters a dark castle", "Scene 2: the treasure room"],
                "upload_urls": [stack.presign_put(f"outputs/story-{i}.png", "image/png") for i in (1, 2)],
                "images": [{"url": reference}],
                "width": size,
                "height": size,
                "seed": 42,
            },
        },
        {
            "id": "demo-batch-webp",
            "type": "generate",
            "input": {
                "prompts": ["a red fox in snow", "a lighthouse at dusk", "a bowl of ramen"],
                "upload_urls": [stack.presign_put(f"outputs/batch-{i}.webp", "image/webp") for i in range(3)],
                "width": size,
                "height": size + 64,
                "output_format": "webp",
                "quality": 85,
                "seed": 7,
            },
        },
        {
            "id": "demo-upscale-x4",
            "type": "upscale",
            "input": {
                "image_url": photo,
                "upload_url": stack.presign_put("outputs/photo-x4.png", "image/png"),
                "scale": 4,
            },
        },
        {
            "id": URGENT_JOB_ID,
            "type": "upscale",
            "input": {
                "image_url": photo,
                "upload_url": stack.presign_put("outputs/urgent-x2.png", "image/png"),
                "scale": 2,
            },
        },
        {
            "id": "demo-invalid",
            "type": "generate",
            "input": {"prompts": ["too small"], "upload_urls": ["https://example.com/x.png"], "width": 100},
        },
    ]
    if adapter is not None:
        # The batch's lighthouse again (same size and seed), with an adapter served from the bucket.
        stack.client("s3").put_object(Bucket=stack.bucket, Key="inputs/style.safetensors", Body=adapter)
        jobs.insert(
            3,
            {
                "id": "demo-lora",
                "type": "generate",
                "input": {
                    "prompts": ["a lighthouse at dusk"],
                    "upload_urls": [stack.presign_put("outputs/lighthouse-lora.webp", "image/webp")],
                    "loras": [{"url": stack.presign_get("inputs/style.safetensors"), "scale": 0.8}],
                    "width": size,
                    "height": size + 64,
                    "output_format": "webp",
                    "quality": 85,
                    "seed": 8,
                },
            },
        )
    return jobs


def enqueue(stack: LocalStack, jobs: list[dict[str, Any]]) -> None:
    sqs = stack.client("sqs")
    urgent = [job for job in jobs if job["id"] == URGENT_JOB_ID and stack.high_queue_url]
    for job in [job for job in jobs if job not in urgent] + urgent:
        queue = stack.high_queue_url if job in urgent else stack.queue_url
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(job))


def collect_results(stack: LocalStack, expected: int) -> list[dict[str, Any]]:
    sqs = stack.client("sqs")
    results: list[dict[str, Any]] = []
    for _ in range(expected + 5):
        reply = sqs.receive_message(
            QueueUrl=stack.result_queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        for message in reply.get("Messages", []):
            results.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=stack.result_queue_url, ReceiptHandle=message["ReceiptHandle"])
        if len(results) >= expected:
            break
    return results


def save_outputs(stack: LocalStack, out_dir: Path) -> list[Path]:
    s3 = stack.client("s3")
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    listing = s3.list_objects_v2(Bucket=stack.bucket, Prefix="outputs/")
    for item in listing.get("Contents", []):
        path = out_dir / Path(item["Key"]).name
        path.write_bytes(s3.get_object(Bucket=stack.bucket, Key=item["Key"])["Body"].read())
        saved.append(path)
    return saved


def run_demo(
    *,
    stack: LocalStack,
    run_worker: Callable[[int], int],
    out_dir: Path,
    size: int = DEMO_SIZE,
    adapter: bytes | None = None,
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Enqueue the samples, let ``run_worker(n_jobs)`` drain the queue, gather results and images."""
    jobs = sample_jobs(stack, size, adapter)
    enqueue(stack, jobs)
    run_worker(len(jobs))
    results = collect_results(stack, len(jobs))
    return results, save_outputs(stack, out_dir)
