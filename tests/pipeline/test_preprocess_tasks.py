"""The pipeline's data stages (configure, download, then plan, ParallelFor count, dictionary, ParallelFor
binarize, merge as `definition.preprocess_tasks` wires them), run by KFP's local runner (SubprocessRunner,
no Docker). The preprocess settings and the corpus come from upstream tasks' outputs, as in the real
pipeline (the local runner treats those differently from pipeline parameters inside a loop)."""

import json
from pathlib import Path

import pytest
from kfp import dsl, local

from conftest import write_corpus
from lmforge import config as config_mod
from lmforge.pipeline import components as c
from lmforge.pipeline.definition import preprocess_tasks

FILES = ("dict.txt", "summary.json", "tokenizer.json", "bpe.json") + tuple(
    f"{s}.{e}" for s in config_mod.SPLITS for e in ("bin", "idx"))


@dsl.pipeline(name="lmforge-data-stages")
def data_stages(config_json: str) -> str:
    configure = c.configure(config_json=config_json)
    download = c.download(download_json=configure.outputs["download_json"])
    merge = preprocess_tasks(
        configure.outputs["preprocess_json"], download.outputs["corpus_dir"], download.outputs["corpus_sha256"]
    )
    return merge.outputs["data_bin"]


def run_local(root: Path, corpus: Path, shards: int) -> Path:
    cfg = config_mod.load(None, [
        f"corpus.source={corpus}", f"storage.root={root}", f"preprocess.shards={shards}",
        "preprocess.tokenizer=bpe", "preprocess.vocab_size=400", "preprocess.threshold=2",
    ])
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp-local"))
    return Path(data_stages(config_json=cfg.to_json()).output)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), train_lines=800)


def test_three_shards_give_the_data_bin_of_one(corpus: Path, tmp_path: Path) -> None:
    one = run_local(tmp_path / "one", corpus, 1)
    three = run_local(tmp_path / "three", corpus, 3)
    for name in FILES:
        assert (one / name).read_bytes() == (three / name).read_bytes(), name
    # content-addressed: the data-bin lives under storage.root/data/data-bin/<key>
    assert three.parent == tmp_path / "three" / "data" / "data-bin"
    work = next((tmp_path / "three" / "data" / "preprocess").iterdir())
    assert sorted(p.name for p in (work / "count").iterdir()) == ["00000", "00001", "00002"]
    assert sorted(p.name for p in (work / "bin").iterdir()) == ["00000", "00001", "00002"]
    plan = json.loads((work / "plan" / "plan.json").read_text())
    assert [len(p["ranges"]) for p in plan] == [3, 3, 3]
    summary = json.loads((three / "summary.json").read_text())
    assert summary["tokenizer"]["kind"] == "bpe" and summary["splits"]["train"]["sentences"] == 800
