"""Reading klein's weights into the page cache while the worker imports torch.

A cold boot reads ~16 GB of weights (klein-4B; ~34 GB for 9B) and, before it can, spends seconds
importing torch, diffusers and transformers: the disk idles through the imports, then the load
waits on the disk. ``start_prefetch`` runs first, before those imports, and reads in a background
thread exactly what the engine will read: every weight file of the transformer and the VAE, and of
the text encoder the tensors of the layers it keeps (``klein_facts.text_encoder``: not layers
28..36, nor the head). By the time ``from_pretrained`` maps the files, what the thread read is in
memory (BENCHMARKS.md, "Reading the weights during the imports").

Nothing here imports torch, and nothing here is fatal: a folder it cannot read, or a machine whose
free memory could not hold the files until the load reads them (the page cache would drop the
first before the last), is a log line and a boot as before.

Hand-written because no library warms the page cache for a file's byte ranges (vmtouch, util-linux
do whole files, from the shell): ``os.sendfile`` to /dev/null has the kernel read each range into
the cache without copying it to Python, twice as fast here as a ``readinto`` loop.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from klein_facts.text_encoder import cut_off, stacked_layers

logger = logging.getLogger(__name__)

# The names diffusers (transformer, vae) and transformers (text_encoder) load, sharded or whole; a
# folder's other files (a root-level single-file checkpoint, .bin copies, fp16 variants) are not read.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_COMPONENTS = ("transformer", "vae", "text_encoder")  # what the engine loads from the folder
_CHUNK = 64 << 20
# The page cache must hold the files from this read until the load's; keep room for the rest.
_MEMORY_SHARE = 0.8


@dataclass(frozen=True)
class Span:
    path: Path
    start: int
    end: int


def weight_files(component: Path) -> list[Path]:
    """The safetensors files a component folder's loader reads: its index's shards, or its one file."""
    for stem in _WEIGHT_STEMS:
        index = component / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = json.loads(index.read_text())["weight_map"].values()
            return sorted({component / shard for shard in shards})
        single = component / f"{stem}.safetensors"
        if single.is_file():
            return [single]
    return []


def tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's byte range in a safetensors file (an 8-byte header length, a JSON header whose
    ``data_offsets`` count from the end of the header, then the data). The safetensors library
    gives tensors, not where they lie in the file."""
    with path.open("rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_length))
    base = 8 + header_length
    return {
        name: (base + entry["data_offsets"][0], base + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def plan(folder: Path, *, components: tuple[str, ...] = _COMPONENTS) -> list[Span]:
    """What the engine will read of a diffusers klein folder, file by file, in file order."""
    spans: list[Span] = []
    for component in components:
        if component == "text_encoder":
            spans += _text_encoder_spans(folder)
        else:
            spans += [Span(path, 0, path.stat().st_size) for path in weight_files(folder / component)]
    return spans


def _text_encoder_spans(folder: Path) -> list[Span]:
    """The kept layers' tensors and the embeddings, merged into runs: not the layers after the last
    one stacked (``load_text_encoder`` never builds them), nor the head (the engine drops it)."""
    text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    transformer_config = json.loads((folder / "transformer" / "config.json").read_text())
    last = max(
        stacked_layers(
            num_layers=text_config["num_hidden_layers"],
            hidden_size=text_config["hidden_size"],
            joint_attention_dim=transformer_config["joint_attention_dim"],
        )
    )
    spans: list[Span] = []
    for path in weight_files(folder / "text_encoder"):
        for name, (start, end) in sorted(tensor_ranges(path).items(), key=lambda item: item[1]):
            if name.startswith("lm_head.") or cut_off(name, last):
                continue
            if spans and spans[-1].path == path and spans[-1].end == start:
                spans[-1] = Span(path, spans[-1].start, end)
            else:
                spans.append(Span(path, start, end))
    return spans


def available_memory() -> int | None:
    """Bytes the page cache can grow by without evicting: MemAvailable, capped by the container's
    cgroup memory limit (v2, then v1) less what the cgroup uses. None where neither is readable."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            cap, used = Path(limit).read_text().strip(), Path(usage).read_text().strip()
        except OSError:
            continue
        if cap.isdigit() and int(cap) < 1 << 60:  # "max", or v1's "no limit" of 2**63 rounded to pages
            found.append(int(cap) - int(used))
        break
    return min(found) if found else None


@dataclass
class Prefetch:
    """The background read: how much, and how long it took once done."""

    spans: list[Span]
    planned_bytes: int
    started: float = field(default_factory=time.perf_counter)
    read_bytes: int = 0
    seconds: float | None = None
    error: str | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    def report(self) -> dict[str, object]:
        """For the boot phases: GB read so far and, if the thread is done, its seconds."""
        return {
            "prefetch_gb": round(self.read_bytes / 1e9, 3),
            "prefetch_s": None if self.seconds is None else round(self.seconds, 2),
        }

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            for span in self.spans:
                fd = os.open(span.path, os.O_RDONLY)
                try:
                    offset = span.start
                    while offset < span.end:
                        sent = os.sendfile(null, fd, offset, min(_CHUNK, span.end - offset))
                        if sent == 0:  # the file is shorter than its header says: the load will say so
                            break
                        offset += sent
                        self.read_bytes += sent
                finally:
                    os.close(fd)
        except OSError as exc:
            self.error = str(exc)
            logger.warning("weights prefetch stopped after %.1f GB: %s", self.read_bytes / 1e9, exc)
        finally:
            os.close(null)
            self.seconds = time.perf_counter() - self.started


def start_prefetch(
    folder: Path | None, *, skip: tuple[str, ...] = (), available: int | None = None
) -> Prefetch | None:
    """Start reading ``folder``'s weights in a daemon thread; None if there is nothing to read or no
    room to keep it. ``skip``: components loaded from elsewhere (a nunchaku transformer).
    ``available``: the memory to fit in (default ``available_memory()``)."""
    if folder is None or not (folder / "model_index.json").is_file():
        return None
    components = tuple(c for c in _COMPONENTS if c not in skip)
    try:
        spans = plan(folder, components=components)
    except (OSError, ValueError, KeyError, struct.error) as exc:  # the load reports a bad folder itself
        logger.warning("weights prefetch skipped: %s could not be planned (%s)", folder, exc)
        return None
    planned = sum(span.end - span.start for span in spans)
    room = available_memory() if available is None else available
    if not planned or (room is not None and planned > _MEMORY_SHARE * room):
        logger.info(
            "weights prefetch skipped: %.1f GB to read, %s GB of memory free",
            planned / 1e9,
            "?" if room is None else f"{room / 1e9:.1f}",
        )
        return None
    prefetch = Prefetch(spans=spans, planned_bytes=planned)
    prefetch._thread = threading.Thread(target=prefetch.run, name="weights-prefetch", daemon=True)
    prefetch._thread.start()
    logger.info("reading %.1f GB of weights from %s ahead of the load", planned / 1e9, folder)
    return prefetch
