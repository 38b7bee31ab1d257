"""Packs what bench/gpu_check.py needs on a GPU machine that reaches no package index, and prints
the command to run there (``make gpu-check`` runs this).

    .venv/bin/python bench/gpu_pack.py [--dest .gpu-check] [--python 3.12]

The GPU machine (see docs/gpu.md) has Python 3.12 with torch and the CUDA stack, numpy, pandas,
pyarrow, scipy and matplotlib, and older or no versions of the rest of the factory's dependencies.
This packs, into DEST/travel/ (the folder that travels beside the working tree, which may weigh
64 MiB in all):

  site.tar.xz    every other package the factory needs (its dependency closure as installed in
                 this venv, at these versions), installed for CPython 3.12 on manylinux x86_64;
                 unpacked there into /tmp/site, which goes first on PYTHONPATH. The wheels alone
                 weigh about 96 MB (polars' runtime 54 MB of them), over the limit; installed and
                 xz-compressed they take about 57 MB.
  smollm2-135m/  SmolLM2-135M-Instruct's config, generation config and tokenizer, read from the
                 embedded model here (the check builds random weights from them there).
  versions.json  what was packed, for which Python; a later run with the same list reuses
                 site.tar.xz (compressing it takes a few minutes on 2 cores).

The downloaded wheels stay in DEST/wheels/ (not carried). DEST is ignored by git.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))  # last: bench/math_verify.py must not shadow the math_verify package

PROJECT = "dataset-factory"
LIMIT = 64 * 2**20  # what may travel with the working tree
# On the GPU image, large and built against its torch or numpy: used as they are there.
ON_IMAGE = {"torch", "triton", "numpy", "pyarrow", "pandas", "scipy", "matplotlib", "contourpy", "kiwisolver",
            "fonttools", "pillow", "cycler", "pyparsing", "python-dateutil", "tzdata", "setuptools", "sympy",
            "mpmath", "networkx"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64"]


def closure(name: str = PROJECT) -> dict[str, str]:
    """Every installed distribution ``name`` needs (extras left out), with its version."""
    found: dict[str, str] = {}
    todo = [name]
    while todo:
        current = canonicalize_name(todo.pop())
        if current in found:
            continue
        try:
            dist = md.distribution(current)
        except md.PackageNotFoundError:
            raise SystemExit(f"gpu_pack: {current} is not installed in {sys.prefix}; run it with the project's "
                             "venv (make setup), e.g. .venv/bin/python bench/gpu_pack.py") from None
        found[current] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def carried(packages: dict[str, str]) -> dict[str, str]:
    """The packages that travel: all but the project itself and what the GPU image provides."""
    return {name: version.split("+")[0] for name, version in sorted(packages.items())
            if name != PROJECT and name not in ON_IMAGE and not name.startswith(("nvidia-", "cuda-"))}


def pip_target_args(python: str) -> list[str]:
    args = ["--only-binary=:all:", "--no-deps", "--python-version", python, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def build_site(pins: dict[str, str], wheels: Path, site: Path, python: str) -> None:
    requirements = [f"{name}=={version}" for name, version in pins.items()]
    pip = [sys.executable, "-m", "pip"]
    print(f"downloading {len(requirements)} wheels for CPython {python} into {wheels} ...", file=sys.stderr)
    subprocess.run([*pip, "download", "-q", *pip_target_args(python), "-d", str(wheels), *requirements], check=True)
    shutil.rmtree(site, ignore_errors=True)
    print(f"installing them into {site} ...", file=sys.stderr)
    subprocess.run([*pip, "install", "-q", *pip_target_args(python), "--no-index", "--find-links", str(wheels),
                    "--no-compile", "--target", str(site), *requirements], check=True)
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts for this machine's interpreter


def compress(site: Path, archive: Path) -> None:
    """``site`` as a tar.xz: xz (all cores, preset 9) when it is installed, else Python's lzma."""
    print(f"compressing {site} into {archive} (minutes) ...", file=sys.stderr)
    partial = archive.with_name(archive.name + ".partial")
    if shutil.which("xz"):
        with partial.open("wb") as out:
            tar = subprocess.Popen(["tar", "-C", str(site), "-cf", "-", "."], stdout=subprocess.PIPE)
            subprocess.run(["xz", "-9", "-T0", "-c"], stdin=tar.stdout, stdout=out, check=True)
            if tar.wait() != 0:
                raise SystemExit("gpu_pack: tar failed")
    else:
        with tarfile.open(partial, "w:xz", preset=9) as tar:
            tar.add(site, arcname=".")
    partial.replace(archive)


def travelling_bytes(travel: Path) -> int:
    """What a device call sends: the tracked and untracked-not-ignored files, and ``travel``."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    tree = sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())
    return tree + sum(f.stat().st_size for f in travel.rglob("*") if f.is_file())


def command(travel: Path) -> str:
    rel = os.path.relpath(travel, ROOT)
    return (f"python3 -c \"import tarfile; tarfile.open('{rel}/site.tar.xz').extractall('/tmp/site', filter='data')\""
            f" && PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 python3 bench/gpu_check.py "
            f"--model-files {rel}/smollm2-135m --out $OUT")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu-check")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    args = parser.parse_args(argv)
    dest = args.dest.resolve()
    if not dest.is_relative_to(ROOT):
        raise SystemExit(f"gpu_pack: --dest {args.dest} is outside the checkout ({ROOT}); only the checkout travels")
    travel = dest / "travel"
    travel.mkdir(parents=True, exist_ok=True)
    pins = carried(closure())
    wanted = {"python": args.python, "packages": pins}
    stamp = travel / "versions.json"
    archive = travel / "site.tar.xz"
    if archive.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        print(f"{archive} is up to date ({len(pins)} packages)", file=sys.stderr)
    else:
        stamp.unlink(missing_ok=True)
        build_site(pins, dest / "wheels", dest / "site", args.python)
        compress(dest / "site", archive)
        shutil.rmtree(dest / "site")
        stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    from gpu_check import write_model_files

    shutil.rmtree(travel / "smollm2-135m", ignore_errors=True)
    write_model_files(travel / "smollm2-135m")
    size = travelling_bytes(travel)
    print(f"packed {len(pins)} packages into {archive} ({archive.stat().st_size / 2**20:.1f} MiB); a device call "
          f"sends {size / 2**20:.1f} MiB of the {LIMIT / 2**20:.0f} MiB it may")
    if size > LIMIT:
        print("gpu_pack: that is over the limit: ignore or delete what else lies untracked in the checkout")
        return 1
    print(f"On the GPU machine (the device tool's run, carry [\"{os.path.relpath(travel, ROOT)}\"], timeout_s 600), "
          f"from the repository root:\n\n  {command(travel)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
