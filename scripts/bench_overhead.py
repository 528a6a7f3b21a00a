"""Worker overhead per job on CPU with the tiny model, and image encode times.

Overhead = (receive returned -> delete returned) - engine time, over N generate jobs run by
the real runner against moto SQS + S3 on loopback (``measurement/overhead.py``).

    python scripts/bench_overhead.py --jobs 200
"""

from __future__ import annotations

import argparse
import json
import platform

from measurement.overhead import bench_encode, bench_overhead
from worker.logs import configure_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    configure_logging(level="WARNING", fmt="text")
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
        "overhead": bench_overhead(args.jobs, args.size, concurrency=1),
        "throughput_concurrency_2": bench_overhead(args.jobs, args.size, concurrency=2),
        "encode_1024": bench_encode(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
