"""Vast.ai fleet provisioning for klein-worker: rent and destroy GPU instances to follow the queue backlog.

Light install only (no torch): ``pip install .`` then ``python -m provisioning --help``.
"""
