#!/usr/bin/env bash
# Download the wheels the sweep needs on the GPU machine, whose image has no Optuna and no
# internet, into .whl/ (git-ignored). gpu_check.sh installs them there when optuna is missing.
#
#   bash benchmarks/fetch_device_wheels.sh          # here, with PyPI access
#   bash benchmarks/fetch_device_wheels.sh --help
#
# The target is the device image: CPython 3.12 on x86-64 manylinux. Only packages the image
# lacks are fetched (its list: numpy, packaging, tqdm, pyyaml, markupsafe, typing-extensions
# are there; optuna, alembic, sqlalchemy, mako, colorlog are not). Versions are the ones the
# project's test environment runs. pip downloads with --no-deps (it cannot resolve for another
# interpreter), so every wheel's Requires-Dist is checked afterwards against what was fetched
# plus what the image holds; anything else is reported and the script fails.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

cd "$(dirname "$0")/.."
DEST=${WHEEL_DIR:-.whl}
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}

# name==version; keep exactly one version of each (two stop the install on the device).
WHEELS=(
    optuna==5.0.0
    alembic==1.20.1
    SQLAlchemy==2.1.9
    Mako==1.4.3
    colorlog==6.12.0
)
# Distributions the device image already has (normalised names); see the device notes.
ON_IMAGE="numpy packaging tqdm pyyaml markupsafe typing-extensions"

# pip matches manylinux_2_N exactly, so name the common N.
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
    PLATFORMS+=(--platform "$tag")
done

mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" \
    -d "$DEST" "${WHEELS[@]}"

"$PYTHON" - "$DEST" "$ON_IMAGE" <<'PY'
"""List what was fetched and check each wheel's requirements (for CPython 3.12 on Linux)."""
import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

dest, on_image = Path(sys.argv[1]), set(sys.argv[2].split())
environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython",
               "extra": ""}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


wheels = sorted(dest.glob("*.whl"))
fetched = {normalise(w.name.split("-")[0]): w for w in wheels}
total = 0
missing = []
for wheel in wheels:
    size = wheel.stat().st_size
    total += size
    print(f"{wheel.name:<70} {size / 1024:8.0f} KiB")
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.marker is not None and not Marker(str(requirement.marker)).evaluate(environment):
            continue  # an extra, or another Python/platform
        name = normalise(requirement.name)
        if name not in fetched and name not in on_image:
            missing.append(f"{wheel.name}: {requirement}")
names = [normalise(w.name.split("-")[0]) for w in wheels]
duplicates = sorted({n for n in names if names.count(n) > 1})
print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {dest}/")
if duplicates:
    print(f"error: more than one version of {', '.join(duplicates)}; keep one", file=sys.stderr)
if missing:
    print("error: requirements neither fetched nor on the device image:\n  "
          + "\n  ".join(missing), file=sys.stderr)
sys.exit(1 if missing or duplicates else 0)
PY
echo "carry '$DEST' in the device run; gpu_check.sh installs it when optuna is missing"
