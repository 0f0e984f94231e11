"""`lmforge images build`: what it sends to a Docker engine, checked without one.

The build context (the .dockerignore allow-list plus the Dockerfile), the tags
(the compiled pipeline's image name first, the registry's next) and the OCI
labels are computed by lmforge and checked here. The build itself needs a
Docker engine: the last test runs it where one answers and says why it skips
where none does.

    PYTHONPATH=src .venv/bin/pytest tests/pipeline/test_image_build.py
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import yaml

from lmforge import __version__, cli
from lmforge.pipeline import image_build
from lmforge.images import STEPS_IMAGE, TRAINER_IMAGE

REPO = Path(__file__).resolve().parents[2]


def test_tags_equal_the_package_version_and_the_pipeline_uses_them() -> None:
    specs = {s.role: s for s in image_build.image_specs(REPO, registry="registry.example.com:5000/ml/")}
    assert specs["steps"].tags == [STEPS_IMAGE, f"registry.example.com:5000/ml/lmforge-steps:{__version__}"]
    assert specs["trainer"].tags == [TRAINER_IMAGE, f"registry.example.com:5000/ml/lmforge-trainer:{__version__}"]
    assert image_build.split_tag(specs["steps"].tags[1]) == ("registry.example.com:5000/ml/lmforge-steps", __version__)
    for spec in specs.values():
        assert spec.labels["org.opencontainers.image.version"] == __version__
        assert (REPO / spec.dockerfile).is_file()
    # Every component's image is the steps image with the package version as its tag.
    for path in sorted((REPO / "components").glob("*.yaml")):
        executors = yaml.safe_load(path.read_text())["deploymentSpec"]["executors"]
        assert {e["container"]["image"] for e in executors.values()} == {STEPS_IMAGE}, path.name
    assert STEPS_IMAGE.endswith(f":{__version__}") and TRAINER_IMAGE.endswith(f":{__version__}")


def test_without_a_registry_only_the_pipelines_names() -> None:
    specs = image_build.image_specs(REPO, roles=["trainer"])
    assert [s.tags for s in specs] == [[TRAINER_IMAGE]]


def test_the_revision_label_is_the_checkouts_commit(tmp_path) -> None:
    labels = image_build.image_specs(REPO)[0].labels
    revision = image_build.git_revision(REPO)
    if revision:
        assert labels["org.opencontainers.image.revision"] == revision
    assert image_build.git_revision(tmp_path) is None
    assert "org.opencontainers.image.revision" not in image_build.image_specs(tmp_path)[0].labels


@pytest.mark.parametrize("role", sorted(image_build.ROLES))
def test_build_context_holds_the_package_and_nothing_else(role) -> None:
    from docker.utils.build import exclude_paths

    dockerfile = image_build.ROLES[role][0]
    stream = image_build.build_context(REPO, dockerfile)  # the tar build_images hands the engine
    try:
        data = stream.read()
    finally:
        stream.close()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = {m.name for m in archive.getmembers() if m.isfile()}
    # The files the Docker CLI itself would send: the .dockerignore rules as docker-py reads them.
    selected = exclude_paths(str(REPO), image_build.dockerignore_patterns(REPO), dockerfile=dockerfile)
    assert names == {p for p in selected if (REPO / p).is_file()}
    assert {dockerfile, "pyproject.toml", "requirements.lock", "README.md", "src/lmforge/__init__.py",
            "src/lmforge/cli.py", "src/lmforge/configs/wikitext-2.yaml"} <= names
    allowed = ("src/", "pyproject.toml", "requirements.lock", "README.md", "LICENSE", ".dockerignore", dockerfile,
               "wheelhouse/README.md")
    assert all(n.startswith(allowed) for n in names), sorted(n for n in names if not n.startswith(allowed))
    assert not any("__pycache__" in n or n.endswith(".pyc") or ".egg-info" in n for n in names)
    assert len(data) < 5 << 20, f"context of {len(data) >> 20} MiB: something large slipped in"


def test_a_directory_that_is_no_checkout_is_one_line(tmp_path, capsys) -> None:
    assert cli.main(["images", "build", "--context", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error:") and "--context" in err and "\n" not in err


class FakeImage:
    def __init__(self, log: list) -> None:
        self.log = log

    def tag(self, repository: str, tag: str) -> None:
        self.log.append(("tag", repository, tag))


class RecordingEngine:
    """Stands in for docker.DockerClient's `images` only to record the calls lmforge makes; the real engine
    is exercised by test_real_build below where one runs."""

    def __init__(self) -> None:
        self.log: list = []
        self.images = self

    def build(self, **kwargs):
        with tarfile.open(fileobj=kwargs["fileobj"]) as archive:
            kwargs["files"] = {m.name for m in archive.getmembers() if m.isfile()}
        self.log.append(("build", kwargs))
        return FakeImage(self.log), iter(())

    def push(self, repository, tag, stream, decode):
        self.log.append(("push", repository, tag))
        return iter([{"status": "Pushed"}])


def test_build_then_tag_and_push_to_the_registry() -> None:
    engine = RecordingEngine()
    image_build.build_images(REPO, registry="registry.local:5000/ml", client=engine, progress=lambda _: None)
    builds = [entry[1] for entry in engine.log if entry[0] == "build"]
    assert [b["tag"] for b in builds] == [STEPS_IMAGE, TRAINER_IMAGE]
    for build, role in zip(builds, ["steps", "trainer"]):
        assert build["custom_context"] is True and build["dockerfile"] == f"docker/{role}.Dockerfile"
        assert build["dockerfile"] in build["files"] and "src/lmforge/cli.py" in build["files"]
        assert build["platform"] == "linux/amd64"
        assert build["labels"]["org.opencontainers.image.version"] == __version__
    assert ("tag", "registry.local:5000/ml/lmforge-steps", __version__) in engine.log
    assert ("push", "registry.local:5000/ml/lmforge-trainer", __version__) in engine.log
    assert not any(e[0] == "push" and e[1].startswith("ghcr.io") for e in engine.log), "only the registry given"


def test_a_refused_push_is_one_line() -> None:
    engine = RecordingEngine()
    engine.push = lambda *a, **k: iter([{"error": "denied: requested access to the resource is denied"}])
    with pytest.raises(image_build.LmforgeError, match="denied.*docker login"):
        image_build.build_images(REPO, registry="r.local/ml", roles=["steps"], client=engine, progress=lambda _: None)


def fake_wheelhouse(path: Path, variant: str = "cpu") -> Path:
    path.mkdir()
    for name in [f"torch-2.13.0+{variant}-cp311-cp311-manylinux_2_28_x86_64.whl", "six-1.17.0-py2.py3-none-any.whl"]:
        (path / name).write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: enough to be sent, not installed
    (path / "wheelhouse.json").write_text("{}")
    return path


def test_a_wheelhouse_build_has_no_network_and_only_the_wheelhouse(tmp_path) -> None:
    engine = RecordingEngine()
    house = fake_wheelhouse(tmp_path / "wheels")
    image_build.build_images(REPO, client=engine, progress=lambda _: None, base_image="local/debian:12",
                             wheelhouse=house, trainer_variant="cpu")
    builds = {b["tag"]: b for kind, b, *_ in engine.log if kind == "build"}
    for tag, build in builds.items():
        assert build["network_mode"] == "none", tag
        assert build["buildargs"]["PIP_NO_INDEX"] == "1"
        assert build["buildargs"]["PIP_FIND_LINKS"] == image_build.WHEELHOUSE_IN_IMAGE
        assert build["buildargs"]["BASE_IMAGE"] == "local/debian:12"
        assert {f"wheelhouse/{w.name}" for w in house.glob("*.whl")} <= build["files"]
    assert builds[TRAINER_IMAGE]["buildargs"]["TORCH_VARIANT"] == "cpu"
    assert builds[TRAINER_IMAGE]["labels"]["io.lmforge.torch-variant"] == "cpu"
    assert "TORCH_VARIANT" not in builds[STEPS_IMAGE]["buildargs"], "the steps image is CPU by its Dockerfile"


def test_without_options_the_dockerfiles_defaults_stand() -> None:
    engine = RecordingEngine()
    image_build.build_images(REPO, client=engine, progress=lambda _: None)
    builds = {b["tag"]: b for kind, b, *_ in engine.log if kind == "build"}
    assert builds[STEPS_IMAGE]["buildargs"] == {} and builds[STEPS_IMAGE]["network_mode"] is None
    assert builds[TRAINER_IMAGE]["buildargs"] == {"TORCH_VARIANT": "cu126"}
    assert not any(f.startswith("wheelhouse/") and f.endswith(".whl") for f in builds[STEPS_IMAGE]["files"])


def test_a_wheelhouse_without_the_torch_build_is_one_line(tmp_path) -> None:
    house = fake_wheelhouse(tmp_path / "wheels", variant="cpu")
    with pytest.raises(image_build.LmforgeError, match=r"no torch==2\.13\.0\+cu126 wheel.*--torch-variant cu126"):
        image_build.build_images(REPO, client=RecordingEngine(), progress=lambda _: None, wheelhouse=house)
    (house / "wheelhouse.json").unlink()
    with pytest.raises(image_build.LmforgeError, match="not a filled wheelhouse.*lmforge images wheelhouse"):
        image_build.build_images(REPO, client=RecordingEngine(), progress=lambda _: None, wheelhouse=house,
                                 trainer_variant="cpu")
