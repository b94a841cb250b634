"""The machine a benchmark ran on, for its report: ``machine_info() -> dict`` and
``machine_markdown() -> str``.

Package versions are read from the installed metadata, so nothing heavy (torch, onnxruntime) is
imported just to name it.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

PACKAGES = ("edgecap", "numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU instruction sets that change the figures (int8 and float kernels): recorded with the CPU,
# since a model name ("AMD EPYC") does not say whether the int8 dot products (VNNI) are there
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp")


def _cpu_features(text: str | None = None) -> list[str]:
    """Which of ``FEATURES`` the CPU has (the first processor's ``flags`` / ``Features`` in
    /proc/cpuinfo); [] where it does not say."""
    if text is None:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
        except OSError:
            return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return [name for name in FEATURES if name in have]
    return []


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None where it does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """CPU model and cores, OS, Python and the versions of the packages that matter here."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cpu_features": _cpu_features(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cores": usable,
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {p: v for p in PACKAGES if (v := _version(p)) is not None},
    }


def cores_text(info: dict) -> str:
    """``machine_info()``'s cores in words: logical, physical, usable by this process."""
    cores = f"{info['logical_cores']} logical"
    if info["physical_cores"]:
        cores += f", {info['physical_cores']} physical"
    return cores + f", {info['usable_cores']} usable by this process"


def machine_markdown(info: dict | None = None) -> str:
    """``machine_info()`` as a short markdown list."""
    info = info or machine_info()
    cores = cores_text(info)
    features = info.get("cpu_features")
    if features is not None:  # the int8 dot products said either way: VNNI or not
        vnni = "with" if {"avx512_vnni", "avx_vnni"} & set(features) else "without"
        cores += f"; {vnni} VNNI; {' '.join(features) or 'none of ' + ' '.join(FEATURES)}"
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    return "\n".join(
        [f"- CPU: {info['cpu']} ({cores})", f"- OS: {info['os']}", f"- Python {info['python']}; {packages}"]
    )


if __name__ == "__main__":
    print(machine_markdown())
