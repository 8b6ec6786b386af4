from pathlib import Path

import pytest

from hiad_train.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"patch\.percentge: unknown key \(did you mean 'percentage'\?\)"):
        parse_config({"image_size": 512, "patch_size": 256, "patch": {"percentge": 0.1}})
    with pytest.raises(ConfigError, match=r"tasks\.neighborhood\.num_groups_widht: unknown key"):
        parse_config(
            {"image_size": 512, "patch_size": 256, "tasks": {"generator": "neighborhood", "num_groups_widht": 2}}
        )
    with pytest.raises(ConfigError, match=r"strid: unknown key \(did you mean 'stride'\?\)"):
        parse_config({"image_size": 512, "patch_size": 256, "strid": 128})


def test_fusion_weights_must_match_ds_factors_and_are_normalized():
    with pytest.raises(ConfigError, match="fusion_weights has 1 entries but ds_factors has 2"):
        parse_config({"image_size": 512, "patch_size": 256, "ds_factors": [0, 1], "fusion_weights": [1.0]})
    cfg = parse_config({"image_size": 512, "patch_size": 256, "ds_factors": [0, 1], "fusion_weights": [3, 1]})
    assert cfg.normalized_fusion_weights == [0.75, 0.25]


def test_even_merge_size_rejected():
    with pytest.raises(ConfigError, match="merge_size"):
        parse_config({"image_size": 512, "patch_size": 256, "patch": {"merge_size": 2}})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    import yaml

    if path.name == "thumbnail.yaml":  # a section, used as `thumbnail:`
        parse_config({"image_size": 512, "patch_size": 256, "thumbnail": yaml.safe_load(path.read_text())})
    else:
        load_config(path)


def test_detector_is_chosen_from_the_registry_and_types_its_section():
    with pytest.raises(ConfigError, match=r"detector: unknown detector 'patchcor' \(did you mean 'patchcore'\?\)"):
        parse_config({"image_size": 512, "patch_size": 256, "detector": "patchcor"})
    cfg = parse_config(
        {
            "image_size": 512,
            "patch_size": 256,
            "detector": "patchcore",
            "patch": {"percentage": 0.2},
            "thumbnail": {"thumbnail_size": 128},
        }
    )
    assert type(cfg.patch).__name__ == "PatchCoreConfig" and cfg.patch.percentage == 0.2
    assert cfg.thumbnail.thumbnail_size == 128 and cfg.thumbnail.merge_size == 3
    with pytest.raises(ConfigError, match=r"thumbnail\.thumbnail_size: Field required"):
        parse_config({"image_size": 512, "patch_size": 256, "thumbnail": {"percentage": 0.1}})


def test_yaml_aliases_are_refused_before_they_are_expanded(tmp_path, monkeypatch):
    """Issue #18: 500 bytes of nested aliases took the duplicate-key loader 41 s (yaml.safe_load: 0.006 s)."""
    import hiad_train.config as config_module

    walked = []
    walk = config_module._mapping_paths

    def counted(node, path):
        walked.append(1)
        assert len(walked) <= 10_000, "aliases expanded"
        yield from walk(node, path)

    monkeypatch.setattr(config_module, "_mapping_paths", counted)
    levels = ["a0: &a0 {x: 1, y: 2, z: 3, w: 4, v: 5, u: 6, t: 7, s: 8}"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]" for i in range(1, 9)]
    config = tmp_path / "bomb.yaml"
    config.write_text("image_size: 256\npatch_size: 128\n" + "\n".join(levels) + "\n")
    assert len(config.read_bytes()) < 600
    with pytest.raises(
        ConfigError, match=r"bomb\.yaml: invalid configuration\n  line 4: alias \*a0 refused: configs are plain"
    ):
        load_config(config)
    assert walked == []
