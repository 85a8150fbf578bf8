"""Ray for a GPU host that has torch with CUDA but no Ray and no package index (``make gpu-check``).

    python -m benchmarks.wheelhouse build .wheelhouse/gpu     # here, with an index: ~50 MiB
    python -m benchmarks.wheelhouse install .wheelhouse/gpu   # there, before the benchmark

``build`` downloads the project's pinned ``ray[default,train]`` and everything it pulls in, for
CPython 3.12 on x86-64 Linux, and keeps the wheels the GPU host lacks (``--have``: names it
already has; by default those of a CUDA PyTorch image). Ray's wheel alone is 79 MB, over the
64 MiB a lent device machine receives, so it is shipped without ``ray/jars/`` (Java workers
only, 32 MB compressed) and recompressed with xz (~31 MiB); ``install`` zips it back into a
wheel. Standard library only: it runs before Ray is there.
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What a lent device machine (and a device's whole working tree) may carry.
BUDGET_MIB = 60
# Parts of a wheel the trainer never loads, dropped to fit the budget.
DROP = {"ray": ("ray/jars/",)}
PLATFORMS = ["manylinux2014_x86_64", "manylinux1_x86_64", "any"]
PLATFORMS += [f"manylinux_2_{n}_x86_64" for n in (5, 17, 27, 28)]
# Ray's dependencies a CUDA PyTorch image already holds (read off the lent H200 image's package
# list, 2026-11-17); a host without one of them needs --have to name what it has.
HAVE = [
    "aiohappyeyeballs",
    "aiohttp",
    "aiosignal",
    "attrs",
    "certifi",
    "charset-normalizer",
    "click",
    "filelock",
    "frozenlist",
    "fsspec",
    "grpcio",
    "idna",
    "msgpack",
    "multidict",
    "numpy",
    "packaging",
    "pandas",
    "prometheus-client",
    "propcache",
    "protobuf",
    "pyarrow",
    "python-dateutil",
    "pyyaml",
    "requests",
    "six",
    "typing-extensions",
    "urllib3",
    "wrapt",
    "yarl",
]


def ray_requirement() -> str:
    """The project's own pin of Ray, from pyproject.toml."""
    return re.search(r'"(ray\[[^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)


def canonical(wheel: str) -> str:
    return wheel.split("-")[0].lower().replace("_", "-").replace(".", "-")


def build(out: Path, have: list[str], python: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "-d", tmp]
        cmd += ["--python-version", python, "--implementation", "cp"]
        cmd += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        subprocess.run([*cmd, ray_requirement()], check=True)
        for wheel in sorted(Path(tmp).glob("*.whl")):
            name = canonical(wheel.name)
            if name in have:
                continue
            if name in DROP:
                pack(wheel, out, DROP[name])
            else:
                (out / wheel.name).write_bytes(wheel.read_bytes())
    total = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"{out}: {len(list(out.iterdir()))} files, {total:.1f} MiB (budget {BUDGET_MIB} MiB)")
    if total > BUDGET_MIB:
        sys.exit(f"{out} is over the {BUDGET_MIB} MiB a lent device machine receives")


def pack(wheel: Path, out: Path, drop: tuple[str, ...]) -> None:
    """The wheel's files minus ``drop`` (and their RECORD lines), as ``<wheel>.tar.xz``."""
    with zipfile.ZipFile(wheel) as z, tarfile.open(out / f"{wheel.name}.tar.xz", "w:xz") as tar:
        for item in z.infolist():
            if item.is_dir() or item.filename.startswith(drop):
                continue
            blob = z.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                kept = [line for line in blob.splitlines(True) if not line.startswith(drop_b(drop))]
                blob = b"".join(kept)
            info = tarfile.TarInfo(item.filename)
            info.size, info.mode = len(blob), (item.external_attr >> 16) or 0o644
            tar.addfile(info, io.BytesIO(blob))


def drop_b(drop: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(prefix.encode() for prefix in drop)


def unpack(archive: Path, into: Path) -> Path:
    """A ``<wheel>.tar.xz`` back into ``<wheel>`` (stored, not compressed: only pip reads it)."""
    wheel = into / archive.name.removesuffix(".tar.xz")
    with tarfile.open(archive) as tar, zipfile.ZipFile(wheel, "w") as z:
        for member in tar:
            info = zipfile.ZipInfo(member.name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = member.mode << 16
            z.writestr(info, tar.extractfile(member).read())
    return wheel


def install(wheels: Path) -> None:
    if subprocess.run([sys.executable, "-c", "import ray"], capture_output=True).returncode == 0:
        print("Ray is installed already")
        return
    if not wheels.is_dir():
        sys.exit(f"Ray is not installed and {wheels} does not exist: `pip install "
                 f"'{ray_requirement()}'` or build it: make gpu-wheels")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for archive in wheels.glob("*.tar.xz"):
            unpack(archive, Path(tmp))
        links = ["--no-index", "--find-links", str(wheels), "--find-links", tmp]
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", *links]
        if subprocess.run([*pip, ray_requirement()]).returncode == 0:
            return
        # The host's copy of a dependency is older than Ray asks for, and none was carried:
        # install what was carried and go on with the host's copy (said, not hidden).
        print("pip could not satisfy every requirement from the host and the wheelhouse; "
              "installing the carried wheels without dependency checks", flush=True)  # fmt: skip
        carried = [*wheels.glob("*.whl"), *Path(tmp).glob("*.whl")]
        subprocess.run([*pip, "--no-deps", *map(str, carried)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wheelhouse", description=__doc__)
    parser.add_argument("action", choices=["build", "install"])
    parser.add_argument("dir", type=Path, help="The wheelhouse, e.g. .wheelhouse/gpu")
    parser.add_argument("--have", nargs="*", default=HAVE, help="build: names the host has")
    parser.add_argument("--python", default="3.12", help="build: the host's CPython version")
    args = parser.parse_args()
    if args.action == "build":
        build(args.dir, args.have, args.python)
    else:
        install(args.dir)


if __name__ == "__main__":
    main()
