"""nox sessions: lint, type, tests, property, reliability. ``nox`` with no arguments runs them all.

Every session installs torch first from ``NEXUS_SLI_TORCH`` (default ``torch==2.13.0``, a CPU
build): an unpinned torch would pull a multi-GB CUDA build.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "type", "tests", "property", "reliability"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"
TORCH = os.environ.get("NEXUS_SLI_TORCH", "torch==2.13.0")
TYPED_PATHS = [
    "nexus_sli",
    "tests",
    "property_tests",
    "reliability",
    "typing_tests",
    "benchmarks",
    "noxfile.py",
]


def install(session: nox.Session, *extra: str) -> None:
    """Install torch (CPU pin) first, then the package with its dev extras."""
    session.install(TORCH)
    session.install("-e", ".[dev]", *extra)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON, name="type")
def type_check(session: nox.Session) -> None:
    """mypy --strict on the package, tests, property tests, typing tests and this noxfile."""
    install(session, "nox")
    session.run("mypy", *TYPED_PATHS)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The unit and integration test suite (pytest, warnings as errors, beartype on)."""
    install(session)
    session.run("pytest", "tests", *session.posargs)


@nox.session(python=PYTHON, name="property")
def property_tests(session: nox.Session) -> None:
    """Hypothesis property tests: registry state machine, names, forward-shape contracts."""
    install(session)
    session.run("pytest", "property_tests", *session.posargs)


@nox.session(python=PYTHON)
def reliability(session: nox.Session) -> None:
    """Faults and hostile input: killed runs, full disks, damaged checkpoints, fuzzing, races."""
    install(session)
    session.run("pytest", "reliability", *session.posargs)
