"""Maps the fixed top-level layout onto import names; everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    package_dir={"backpropagate": "cli/backpropagate", "backpropagate_services": "services"},
    packages=["backpropagate", *(f"backpropagate.{p}" for p in find_packages("cli/backpropagate"))]
    + ["backpropagate_services", *(f"backpropagate_services.{p}" for p in find_packages("services"))],
)
