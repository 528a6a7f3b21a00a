"""Measurement code behind ``scripts/``: the VRAM benchmark, per-stage GPU timing, random-weight engines.

Nothing here runs inside a serving worker; ``worker/`` holds only what a running worker executes, and
the scripts are thin command lines over this package.
"""
