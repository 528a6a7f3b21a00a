"""Facts about klein-worker said once: model variants, quantization names, VRAM needs, job limits and
the benchmark profile schema.

Torch-free on purpose: the worker, the handlers, the measurement scripts and the provisioning CLI (whose
install has no torch) all import these definitions instead of keeping copies.
"""
