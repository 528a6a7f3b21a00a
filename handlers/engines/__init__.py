"""The engines the handlers drive: the FLUX.2-klein pipeline and the Real-ESRGAN upscaler.

Import each name from the module that defines it (``handlers.engines.klein``,
``handlers.engines.upscaler``, ...). This package itself imports nothing, so the worker's
config and contract code can import a light submodule without loading the GPU stack.
"""
