"""Job handlers (generate, upscale) and the engines they drive.

A handler is a plain function of (validated input, engines, transfer client) -> ``Finished``
(the shape is ``handlers.dispatch.Handler``). It knows nothing of SQS; the worker runtime
(``worker``) calls it.
"""
