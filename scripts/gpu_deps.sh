#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, for gpu_checks.sh (run HERE, where PyPI answers):
#
#   scripts/gpu_deps.sh [DIR]      # default .whl (git-ignored through .git/info/exclude)
#
# That machine (KINDS.md of the device notes: Python 3.12, torch 2.11, transformers 5.17,
# huggingface_hub 1.x, pillow, numpy, rich, typer, prometheus-client, nvidia-ml-py, werkzeug,
# jinja2, requests already there) lacks diffusers, spandrel, pydantic(-settings), boto3 and moto
# (the cold-start benchmark's local SQS + S3). The project's pins, --no-deps, one version each;
# keep the machine's own torch, transformers and huggingface_hub. ~25 MiB, under the 64 MiB carry
# limit. There: pip install --no-index --no-deps --target /tmp/site DIR/*.whl; PYTHONPATH=/tmp/site.
# torchao (FP8 steps only) is left out: its C++ ops are built for one torch release; add the one
# matching that machine's torch for the issue10-fp8 preset.
set -eu
dir=${1:-.whl}
mkdir -p "$dir"
python=${PYTHON:-python3}
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" \
    diffusers==0.42.1 spandrel==0.4.2 \
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
    typing-inspection==0.4.5 annotated-types==0.8.0 \
    boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0 \
    moto==5.2.5 xmltodict==1.0.4 responses==0.26.3 flask==3.1.3 flask-cors==6.0.5 blinker==1.9.0 \
    itsdangerous==2.2.0 py-partiql-parser==0.6.3 jsonpath-ng==1.16.0 joserfc==1.8.0 \
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
du -sh "$dir"
