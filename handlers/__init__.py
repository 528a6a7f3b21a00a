"""Job handlers (generate, upscale) and the engines they drive.

A handler is a plain function of (validated input, engines, transfer client) -> output.
It knows nothing of SQS; the worker runtime (``worker``) calls it.
"""
