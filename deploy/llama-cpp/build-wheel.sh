#!/usr/bin/env bash
# Build (once) and install a portable llama-cpp-python wheel: runs on every x86-64 CPU, as fast as
# that CPU allows, and never on the crashing AMX path.
#
# Why not pip's default build: it compiles with -march=native, which bakes the builder's
# instruction set into the wheel (an image or a shared wheel cache then dies with SIGILL on an
# older CPU) and, on Intel Sapphire Rapids, enables ggml's AMX kernels, which segfault in
# ggml_backend_amx_mul_mat on the first quantised GGUF (docs/export.md, "Portable llama.cpp").
#
# What this builds instead is what llama.cpp's own release builds do: the CPU backend as loadable
# modules, one per x86-64 feature level (x64, sse42, ..., haswell, skylakex, icelake, zen4, ...),
# and the best one this CPU supports is chosen at run time, leaving out the AMX one
# (sapphirerapids). llama-cpp-python never loads such a module by itself: add_cpu_variants.py adds
# cpu_variants.py to the wheel, which registers the variant whenever `llama_cpp` is imported, so
# the library works on its own, for our code and anyone else's.
#
# pip's wheel cache keys wheels by name and version only, so a cached native wheel would be reused
# whatever CMAKE_ARGS say: this script keeps its own cache, keyed by version and build flags.
#
# GGML_BACKEND_DIR is typed STRING so CMake keeps it relative: the variant modules are then
# installed into the wheel's llama_cpp/lib, next to libggml (as PATH, CMake would resolve it
# against the build's working directory and install them outside the wheel).
#
# Usage: build-wheel.sh [PYTHON [COPY_TO]]
#   PYTHON   builds with this interpreter (default python3) and installs the wheel into its
#            environment, unless COPY_TO is given: then the wheel is copied into that directory.
set -euo pipefail

PYTHON=${1:-python3}
COPY_TO=${2:-}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REQUIREMENTS="${HERE}/../../services/export/requirements-llama.txt"
VERSION=$(sed -n 's/^llama-cpp-python==//p' "${REQUIREMENTS}")
CMAKE_FLAGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
-DGGML_BACKEND_DIR:STRING=llama_cpp/lib"
KEY=$(printf '%s %s' "${VERSION}" "${CMAKE_FLAGS}" | sha256sum | cut -c1-12)
CACHE=${BACKPROPAGATE_WHEEL_CACHE:-${XDG_CACHE_HOME:-${HOME}/.cache}/backpropagate/wheels}
WHEEL_DIR="${CACHE}/llama-cpp-python-${VERSION}-${KEY}"

if ! compgen -G "${WHEEL_DIR}/*.whl" >/dev/null; then
    echo ">>> Building llama-cpp-python ${VERSION} from source with every CPU variant:"
    echo ">>> about 8 min on 2 cores (15 of CPU) the first time, then cached in ${WHEEL_DIR}."
    rm -rf "${WHEEL_DIR}.partial"
    mkdir -p "${WHEEL_DIR}.partial"
    log="${WHEEL_DIR}.partial/build.log"
    # One progress line per compiled file ([n/total] name); the whole log is kept for failures.
    if ! CMAKE_ARGS="${CMAKE_FLAGS}" "${PYTHON}" -m pip wheel --verbose --no-deps --no-cache-dir \
        --no-binary llama-cpp-python --wheel-dir "${WHEEL_DIR}.partial" \
        "llama-cpp-python==${VERSION}" 2>&1 | tee "${log}" \
        | sed -nuE 's|^ *\[([0-9]+/[0-9]+)\] .* -c .*/([^/ ]+)$|  [\1] \2|p'; then
        tail -n 40 "${log}"
        echo ">>> llama-cpp-python build failed; the whole log is ${log}" >&2
        exit 1
    fi
    mv "${WHEEL_DIR}.partial" "${WHEEL_DIR}"
fi
# The cache holds the compiled wheel; adding the registration takes seconds, so it is redone on
# every run and a change to it never costs a rebuild.
FINISHED=$(mktemp -d)
trap 'rm -rf "${FINISHED}"' EXIT
"${PYTHON}" "${HERE}/add_cpu_variants.py" "${WHEEL_DIR}"/*.whl "${FINISHED}" >/dev/null
if [[ -n "${COPY_TO}" ]]; then
    mkdir -p "${COPY_TO}"
    cp "${FINISHED}"/*.whl "${COPY_TO}/"
else
    # Replace whatever llama-cpp-python is there (a native build, say), then add its own
    # dependencies (numpy, diskcache, jinja2) without touching the ones already installed.
    "${PYTHON}" -m pip install --quiet --no-deps --force-reinstall "${FINISHED}"/*.whl
    "${PYTHON}" -m pip install --quiet "${FINISHED}"/*.whl
fi
