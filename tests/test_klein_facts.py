"""klein_facts is read by the provisioning CLI, whose install has no torch: it must stay torch-free and
import none of the packages that read it."""

from __future__ import annotations

import subprocess
import sys


def test_klein_facts_imports_no_torch_and_none_of_its_readers():
    code = (
        "import sys, pkgutil, importlib, klein_facts\n"
        "for m in pkgutil.iter_modules(klein_facts.__path__):\n"
        "    importlib.import_module('klein_facts.' + m.name)\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'worker', 'handlers', 'provisioning',\n"
        "         'measurement')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
