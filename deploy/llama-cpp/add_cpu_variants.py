"""Add cpu_variants.py to a built llama-cpp-python wheel, called from `llama_cpp/__init__.py`.

The wheel's CPU backend is a set of loadable modules that llama-cpp-python never loads itself;
with this module in the package, `import llama_cpp` registers the right one, for our code and
for anyone else's (cpu_variants.py says how it chooses). Done to the compiled wheel rather than
to the sources, so that a change here costs seconds instead of a 10-minute rebuild.

    python add_cpu_variants.py WHEEL OUT_DIR    (writes OUT_DIR/<the same file name>)

Standard library only: it runs in the export image's build stage too.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

MODULE = Path(__file__).with_name("cpu_variants.py")
PACKAGE_INIT = "llama_cpp/__init__.py"
REGISTRATION = b"""
# Added by backpropagate's deploy/llama-cpp/build-wheel.sh: this build's CPU backend is one
# loadable module per CPU level, which llama-cpp-python does not load by itself.
from .cpu_variants import register_at_import as _register_cpu_backend

_register_cpu_backend()
"""


def record_line(name: str, data: bytes) -> str:
    """The wheel RECORD entry for a file: path, urlsafe base64 sha256 without padding, size."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def add_cpu_variants(wheel: Path, out_dir: Path) -> Path:
    """A copy of `wheel` in `out_dir` whose llama_cpp package registers its CPU backend.

    Every other entry keeps its data and its zip metadata (the file modes pip installs with).
    """
    with zipfile.ZipFile(wheel) as source:
        entries = {info.filename: (info, source.read(info)) for info in source.infolist()}
    record = next(name for name in entries if name.endswith(".dist-info/RECORD"))
    if PACKAGE_INIT not in entries:
        raise SystemExit(f"{wheel.name} has no {PACKAGE_INIT}: not a llama-cpp-python wheel")
    init_info, init_data = entries[PACKAGE_INIT]
    entries[PACKAGE_INIT] = (init_info, init_data + REGISTRATION)
    module_info = zipfile.ZipInfo("llama_cpp/cpu_variants.py", init_info.date_time)
    module_info.external_attr = init_info.external_attr
    entries[module_info.filename] = (module_info, MODULE.read_bytes())
    record_info, _ = entries.pop(record)
    lines = [record_line(name, data) for name, (_, data) in entries.items()] + [f"{record},,"]
    entries[record] = (record_info, ("\n".join(lines) + "\n").encode())
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as finished:
        for info, data in entries.values():
            finished.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(add_cpu_variants(Path(sys.argv[1]), Path(sys.argv[2])))
