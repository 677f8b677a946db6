"""Maps the fixed top-level layout onto import names; everything else is in pyproject.toml."""

from setuptools import find_packages, setup

PACKAGE_DIRS = {
    "backpropagate": "cli/backpropagate",
    "backpropagate_api": "proto/backpropagate_api",
    "backpropagate_services": "services",
}

setup(
    package_dir=PACKAGE_DIRS,
    packages=[
        name
        for package, directory in PACKAGE_DIRS.items()
        for name in [package, *(f"{package}.{sub}" for sub in find_packages(directory))]
    ],
    # The typing stubs of the generated code, and the .proto files other tools generate from.
    package_data={"backpropagate_api.v1": ["*.pyi", "*.proto"]},
)
