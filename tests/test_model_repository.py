"""Model repository layout, version resolution, config validation and labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_models import SIZE, tiny_logits, write_tiny_repository

from operators.model_repository import ModelConfigError, ModelRef, ModelRepository, version_key


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg))


@pytest.fixture
def repo_root(tmp_path) -> Path:
    root = tmp_path / "models"
    for version in ("10", "2", "1"):
        write_tiny_repository(root, "tiny", version)
    return root


def test_versions_are_sorted_numerically(repo_root):
    assert ModelRepository(repo_root).versions("tiny") == ["1", "2", "10"]


def test_versions_ignore_directories_without_config(repo_root):
    (repo_root / "tiny" / "3").mkdir()
    assert ModelRepository(repo_root).versions("tiny") == ["1", "2", "10"]


def test_names_lists_models_with_versions(repo_root):
    write_tiny_repository(repo_root, "another", "1")
    (repo_root / "empty").mkdir()
    assert ModelRepository(repo_root).names() == ["another", "tiny"]


def test_bare_name_resolves_to_newest_version(repo_root):
    cfg = ModelRepository(repo_root).config("tiny")
    assert cfg.version == "10"
    assert cfg.ref == "tiny@10"
    assert cfg.model_path == repo_root / "tiny" / "10" / "model.onnx"


def test_name_at_version_pins_that_version(repo_root):
    cfg = ModelRepository(repo_root).config("tiny@1")
    assert cfg.version == "1"
    assert cfg.directory == repo_root / "tiny" / "1"


def test_config_fields_come_from_yaml(repo_root):
    cfg = ModelRepository(repo_root).config("tiny@2")
    assert cfg.task == "classify"
    assert cfg.max_batch_size == 8
    assert cfg.max_wait_ms == 5.0
    assert cfg.providers == ("cpu",)
    assert cfg.intra_op_threads == 1
    assert cfg.preprocess["size"] == SIZE
    assert cfg.postprocess == {"softmax": True, "top_k": 3}


def test_unknown_model_raises_naming_the_model(repo_root):
    with pytest.raises(ModelConfigError, match="unknown model 'resnet'"):
        ModelRepository(repo_root).config("resnet")


def test_unknown_version_raises_naming_the_version(repo_root):
    with pytest.raises(ModelConfigError, match="no version '7'") as excinfo:
        ModelRepository(repo_root).config("tiny@7")
    assert "1, 2, 10" in str(excinfo.value)


def test_unknown_task_raises_naming_the_task(repo_root):
    _edit_config(repo_root / "tiny" / "1", task="segment")
    with pytest.raises(ModelConfigError, match="unknown task 'segment'"):
        ModelRepository(repo_root).config("tiny@1")


def test_missing_model_file_raises_naming_the_file(repo_root):
    (repo_root / "tiny" / "2" / "model.onnx").unlink()
    with pytest.raises(ModelConfigError, match="model file model.onnx is missing"):
        ModelRepository(repo_root).config("tiny@2")


def test_invalid_yaml_raises_model_config_error(repo_root):
    (repo_root / "tiny" / "1" / "config.yaml").write_text("task: classify\nbatching: [unclosed\n")
    with pytest.raises(ModelConfigError, match="invalid YAML"):
        ModelRepository(repo_root).config("tiny@1")


def test_yaml_that_is_not_a_mapping_raises_model_config_error(repo_root):
    (repo_root / "tiny" / "1" / "config.yaml").write_text("- task\n- classify\n")
    with pytest.raises(ModelConfigError, match="mapping"):
        ModelRepository(repo_root).config("tiny@1")


def test_bad_batching_values_raise_model_config_error(repo_root):
    _edit_config(repo_root / "tiny" / "1", batching={"max_batch_size": 0})
    with pytest.raises(ModelConfigError, match="max_batch_size"):
        ModelRepository(repo_root).config("tiny@1")
    _edit_config(repo_root / "tiny" / "1", batching={"max_batch_size": 4, "max_pairs": 0})
    with pytest.raises(ModelConfigError, match="max_pairs"):
        ModelRepository(repo_root).config("tiny@1")


def test_label_count_not_matching_model_outputs_raises_on_load(repo_root):
    (repo_root / "tiny" / "1" / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    with pytest.raises(ModelConfigError, match="3 labels but the model outputs 4 classes"):
        ModelRepository(repo_root).load("tiny@1")


def test_missing_labels_file_raises_model_config_error(repo_root):
    (repo_root / "tiny" / "1" / "labels.json").unlink()
    with pytest.raises(ModelConfigError, match="labels file"):
        ModelRepository(repo_root).config("tiny@1").labels()


def test_labels_from_json_list(repo_root):
    assert ModelRepository(repo_root).config("tiny@1").labels() == ["class-0", "class-1", "class-2", "class-3"]


def test_labels_from_json_object_keyed_by_class_id(repo_root):
    (repo_root / "tiny" / "1" / "labels.json").write_text(json.dumps({"1": "b", "0": "a", "3": "d", "2": "c"}))
    assert ModelRepository(repo_root).config("tiny@1").labels() == ["a", "b", "c", "d"]


def test_labels_from_text_file_one_per_line(repo_root):
    directory = repo_root / "tiny" / "1"
    (directory / "labels.txt").write_text("cat\ndog\nbird\nfish\n")
    _edit_config(directory, labels="labels.txt")
    assert ModelRepository(repo_root).config("tiny@1").labels() == ["cat", "dog", "bird", "fish"]


def test_no_labels_key_gives_empty_labels(repo_root):
    directory = repo_root / "tiny" / "1"
    cfg = yaml.safe_load((directory / "config.yaml").read_text())
    del cfg["labels"]
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert ModelRepository(repo_root).config("tiny@1").labels() == []


def test_load_gives_a_working_session_with_labels(repo_root):
    model = ModelRepository(repo_root).load("tiny", providers=("cpu",))
    assert model.ref == "tiny@10"
    assert model.labels == [f"class-{i}" for i in range(4)]
    x = np.random.default_rng(0).uniform(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    np.testing.assert_allclose(model.session.run({"input": x})["logits"], tiny_logits(x), rtol=1e-4, atol=1e-4)


def test_candidate_versions_are_served_only_by_explicit_reference_until_promoted(tmp_path):
    import yaml
    from tiny_models import write_tiny_repository

    from operators.model_repository import ModelRepository

    write_tiny_repository(tmp_path, "m", "1")
    candidate = write_tiny_repository(tmp_path, "m", "2")
    config = yaml.safe_load((candidate / "config.yaml").read_text())
    (candidate / "config.yaml").write_text(yaml.safe_dump({**config, "candidate": True}))
    repo = ModelRepository(tmp_path)
    assert repo.config("m").version == "1"  # the newest *promoted* version
    assert repo.config("m@2").version == "2"
    repo.promote("m", "2")
    assert repo.config("m").version == "2"


# ------------------------------------------------------------------------------- refs and versions
def test_a_model_ref_parses_and_builds_name_at_version_and_reads_as_that_text():
    ref = ModelRef.of("tiny", "2")
    assert ref == "tiny@2" and (ref.name, ref.version) == ("tiny", "2")
    assert ModelRef("tiny").version is None and ModelRef.of("tiny") == "tiny"
    assert {"tiny@2": 1}[ref] == 1 and json.loads(json.dumps({"ref": ref})) == {"ref": "tiny@2"}
    assert yaml.safe_load(yaml.safe_dump({"ref": ref})) == {"ref": "tiny@2"}


def test_one_version_order_numbers_first_then_names():
    assert sorted(["b", "10", "2", "a", "1"], key=version_key) == ["1", "2", "10", "a", "b"]


def test_the_candidate_flag_is_set_and_dropped_keeping_the_rest_of_the_config(repo_root):
    path = repo_root / "tiny" / "2" / "config.yaml"
    path.write_text("# hand-written comment\n" + path.read_text())
    repo = ModelRepository(repo_root)
    repo.set_candidate("tiny", "10", True)
    assert repo.is_candidate("tiny", "10") and repo.serving_version("tiny") == "2"
    repo.set_candidate("tiny", "2", True)
    repo.set_candidate("tiny", "2", True)  # idempotent
    assert path.read_text().count("candidate: true") == 1 and path.read_text().startswith("# hand-written comment")
    repo.promote("tiny", "2")
    assert not repo.is_candidate("tiny", "2") and path.read_text().startswith("# hand-written comment")
    with pytest.raises(ModelConfigError, match="no version '7'"):
        repo.set_candidate("tiny", "7", True)


def test_a_new_version_takes_the_next_free_number_and_its_config_comes_last(repo_root, tmp_path):
    (repo_root / "tiny" / "11").mkdir()  # a number taken by a directory without config
    repo = ModelRepository(repo_root)
    assert repo.next_version("tiny") == "12"
    staging = repo_root / "tiny" / ".staging"
    staging.mkdir()
    (staging / "model.onnx").write_bytes((repo_root / "tiny" / "1" / "model.onnx").read_bytes())
    (staging / "labels.json").write_text((repo_root / "tiny" / "1" / "labels.json").read_text())
    seen = []

    def notes(ref):
        seen.append((ref, (repo_root / "tiny" / ref.version / "config.yaml").exists()))
        return {"report.json": json.dumps({"target": ref})}

    config = (repo_root / "tiny" / "1" / "config.yaml").read_text()
    ref = repo.add_version("tiny", staging, config, notes, candidate=True)
    assert ref == "tiny@12" and seen == [("tiny@12", False)]  # notes written before the config exists
    assert json.loads((repo_root / "tiny" / "12" / "report.json").read_text()) == {"target": "tiny@12"}
    assert repo.is_candidate("tiny", "12") and repo.serving_version("tiny") == "10"
    assert repo.load("tiny@12").labels == repo.load("tiny@1").labels
    assert not staging.exists()
