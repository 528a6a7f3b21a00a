"""`python -m provisioning` (also installed as `klein-fleet`)."""

from __future__ import annotations

from provisioning.cli import app


def main() -> None:
    app()


if __name__ == "__main__":
    app(prog_name="python -m provisioning")
