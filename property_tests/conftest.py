"""Property tests run with beartype checking every annotated function of the package."""

from __future__ import annotations

from beartype import BeartypeConf
from beartype.claw import beartype_package

beartype_package("nexus_sli", conf=BeartypeConf(claw_skip_package_names=("nexus_sli.demo",)))
