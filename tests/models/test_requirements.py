"""lmforge.models.requirements: the registered model's pins, read from this venv's real metadata.

The closure is checked against requirements.lock (the one home of versions) and for being closed;
the rules of the walk (markers, extras, a missing requirement) on small distributions written
under tmp_path, which importlib.metadata finds as it finds any installed one.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO
from lmforge.errors import LmforgeError
from lmforge.models import requirements
from lmforge.models.scoring import IMPORTS

#: Pinned by scripts/install.sh itself; everything else (setuptools included) is in the lock, so the
#: wheelhouse holds exactly the versions a registered model requires.
NOT_IN_THE_LOCK = {"torch", "ve-fairseq"}


def lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


@pytest.fixture(scope="module")
def served() -> dict[str, str]:
    """name -> pinned version of the language model's requirements."""
    return dict(pin.split("==") for pin in requirements.pins(IMPORTS))


def test_the_pins_are_the_locks_versions_and_fewer(served):
    locked = lock()
    assert {name for name in served if name not in locked} == NOT_IN_THE_LOCK
    assert {name: v for name, v in served.items() if name in locked} == {n: locked[n] for n in served if n in locked}
    assert served["torch"] == "2.13.0" and served["ve-fairseq"] == "0.12.3"
    # Serving needs none of the pipeline's, the cluster's or the tests' packages.
    for name in ("kfp", "kubernetes", "kubeflow-training", "boto3", "moto", "pytest", "yamllint", "torchaudio"):
        assert name not in served, name
    assert len(served) < len(locked)
    assert list(served) == sorted(served)


def test_the_pins_are_closed_except_fairseqs_torchaudio(served):
    """Every requirement of every pinned distribution is pinned too, at a version it accepts:
    what `pip install --no-deps -r requirements.txt` needs to give a working environment."""
    skipped = []
    for name, version in served.items():
        for line in metadata.requires(name) or ():
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            required = canonicalize_name(requirement.name)
            if required not in served:
                skipped.append((name, required))
                continue
            assert requirement.specifier.contains(served[required], prereleases=True), (name, line, served[required])
    assert skipped == [("ve-fairseq", "torchaudio")]


def test_every_imported_package_is_provided_by_a_pin(served):
    providers = metadata.packages_distributions()
    for package in IMPORTS:
        assert {canonicalize_name(d) for d in providers[package]} <= set(served), package


def write_distribution(site: Path, name: str, *requires: str, version: str = "1.0") -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "top_level.txt").write_text(name.replace("-", "_") + "\n")


def test_markers_and_extras_are_followed_as_pip_would(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write_distribution(site, "lmf-root", "lmf-base", 'lmf-dev; extra == "dev"', "lmf-old; python_version < '3'",
                       "lmf-extras[fast]")
    write_distribution(site, "lmf-base", version="2.0+local")
    write_distribution(site, "lmf-extras", 'lmf-speed; extra == "fast"')
    write_distribution(site, "lmf-speed")
    monkeypatch.syspath_prepend(str(site))
    assert requirements.requirement_closure(["lmf-root"]) == {
        "lmf-root": "1.0", "lmf-base": "2.0+local", "lmf-extras": "1.0", "lmf-speed": "1.0",
    }
    assert requirements.pins(["lmf_root"]) == ["lmf-base==2.0", "lmf-extras==1.0", "lmf-root==1.0", "lmf-speed==1.0"]


def test_a_missing_requirement_is_a_one_line_error(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write_distribution(site, "lmf-broken", "lmf-nowhere>=1")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(LmforgeError) as err:
        requirements.requirement_closure(["lmf-broken"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("lmf-broken requires lmf-nowhere, which is not installed")


def test_a_package_no_distribution_provides_is_a_one_line_error():
    with pytest.raises(LmforgeError) as err:
        requirements.distributions_of(["torch", "no_such_package_here"])
    assert "\n" not in str(err.value) and "no installed distribution provides no_such_package_here" in str(err.value)
