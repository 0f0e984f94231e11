"""A registered model's pip requirements: every distribution its pyfunc needs, pinned, closed.

In:  the top-level packages a pyfunc imports (a task's `Pyfunc.imports`, e.g.
     `lmforge.models.scoring.IMPORTS`) and the metadata of the distributions installed in this
     environment (`importlib.metadata`: which distribution provides a package, what each one
     requires, under which markers and extras).
Out: ``name==version`` for each distribution of the closure: the ones providing those
     packages, then everything they require, transitively, at the installed versions. It is
     what `lmforge.models.register` writes as the model's requirements.txt.

Why a closure: the model is installed with ``--no-deps``, as the images and
scripts/install.sh install fairseq,

    pip install --no-index --find-links WHEELHOUSE --no-deps -r MODEL/requirements.txt

because ve-fairseq's wheel declares torchaudio, which fairseq's language modeling never
imports and which would pull another torch (PyPI's multi-GB CUDA build). With --no-deps pip
installs exactly the list, so the list itself must hold every requirement of every entry; the
one requirement left out on purpose is `DELIBERATELY_ABSENT`. The versions come from the
installed metadata, which scripts/install.sh holds to requirements.lock: the lock stays the one
home of versions (a test checks that the two agree), and the closure keeps only what serving
needs (no kfp, kubernetes, boto3, moto, pytest).

torch is pinned without its local label ("2.13.0", not "2.13.0+cpu"): ``==2.13.0`` matches any
build of that release (PEP 440 ignores a candidate's local label), so the model installs from a
CPU wheelhouse and from PyTorch's CUDA index alike. A CUDA build brings nvidia-* wheels the CPU
build does not require: install torch first as scripts/install.sh does, then the rest --no-deps.

    python -c "from lmforge.models.requirements import pins; print('\\n'.join(pins(['torch'])))"
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata

from lmforge.errors import LmforgeError

#: Requirements an installed distribution declares but which are absent on purpose (see above).
DELIBERATELY_ABSENT = {"ve-fairseq": frozenset({"torchaudio"})}

#: How to install a registered model's requirements, and why so (the version's description and
#: the MLmodel's metadata say it where the model travels).
INSTALL_NOTE = (
    "Self-contained: code/ holds lmforge's source and requirements.txt the complete pinned closure of "
    "what the model imports; install it with `pip install --no-deps -r requirements.txt` (add "
    "`--no-index --find-links WHEELHOUSE` offline), then mlflow.pyfunc.load_model(MODEL_DIR): without "
    "--no-deps pip would follow ve-fairseq's declared torchaudio, which the model never imports and "
    "which pulls another torch."
)


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def distributions_of(packages: Iterable[str]) -> list[str]:
    """The installed distributions that provide the top-level `packages` (canonical names)."""
    providers = metadata.packages_distributions()
    found, missing = [], []
    for package in packages:
        if package not in providers:
            missing.append(package)
        for name in providers.get(package, ()):
            if canonical(name) not in found:
                found.append(canonical(name))
    if missing:
        raise LmforgeError(
            f"no installed distribution provides {', '.join(missing)}; install lmforge's dependencies "
            "(scripts/install.sh) before registering a model"
        )
    return found


def requirement_closure(roots: Iterable[str]) -> dict[str, str]:
    """canonical name -> installed version, for `roots` and everything they require (markers
    evaluated for this interpreter, extras followed where a requirement names them)."""
    from packaging.requirements import Requirement

    versions: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [(canonical(name), frozenset(), "") for name in roots]
    while pending:
        name, extras, wanted_by = pending.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise LmforgeError(
                f"{wanted_by} requires {name}, which is not installed; the environment is incomplete "
                "(pip check names what is missing): reinstall with scripts/install.sh"
            ) from None
        versions[name] = dist.version
        for line in dist.requires or ():
            requirement = Requirement(line)
            required = canonical(requirement.name)
            if required in DELIBERATELY_ABSENT.get(name, ()):
                continue
            # A base requirement's marker is evaluated with extra == ""; one that only an extra
            # brings ('extra == "dev"') counts only where that extra was asked for.
            environments = [{"extra": extra} for extra in ("", *sorted(extras))]
            if requirement.marker is not None and not any(requirement.marker.evaluate(e) for e in environments):
                continue
            pending.append((required, frozenset(requirement.extras), name))
    return versions


def pins(packages: Iterable[str]) -> list[str]:
    """The requirements.txt lines of a pyfunc that imports `packages`, sorted by name."""
    closure = requirement_closure(distributions_of(packages))
    # "2.13.0+cpu" -> "2.13.0": see the module docstring.
    return [f"{name}=={version.split('+')[0]}" for name, version in sorted(closure.items())]


__all__ = ["DELIBERATELY_ABSENT", "INSTALL_NOTE", "distributions_of", "pins", "requirement_closure"]
