"""The `fashionshoot` command: dispatch, the embedded default `synth` job, and error reporting."""

from __future__ import annotations

import json

import pytest
import yaml

from fashionshoot.cli import main
from fashionshoot.errors import DataError
from fashionshoot.pipelines.cli import read_keypoints


def test_synth_generates_shards_and_reads_everything_back(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["synth", f"out_dir={out}", "synthetic.num_garments=6", "samples_per_shard=5"]) == 0
    printed = capsys.readouterr().out
    assert "read back 18 pairs from the shards; no samples skipped" in printed
    assert "by tier: high=18" in printed
    index = json.loads((out / "shards" / "shards.json").read_text())
    assert all(len(shard["splits"]) == 1 for shard in index["shards"])  # each split fills its own shards
    assert len(list((out / "shards").glob("*.tar"))) == sum(-(-n // 5) for n in index["splits"].values()) >= 4
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["synthetic"]["num_garments"] == 6 and saved["samples_per_shard"] == 5


def test_bad_key_is_reported_with_its_name(tmp_path, capsys):
    assert main(["synth", f"out_dir={tmp_path}", "synthetic.num_garmets=3"]) == 1
    assert "synthetic.num_garmets" in capsys.readouterr().err


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "synth" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ({"keypoints": [[1, 2]] * 18, "size": 64}, r"'size' must be \[width, height\], two positive numbers; got 64"),
    ({"keypoints": [[1, 2]] * 18, "size": [0, 64]}, r"'size' must be .*got \[0, 64\]"),
    ({"people": [{"face_keypoints_2d": []}]}, "the first OpenPose person has no 'pose_keypoints_2d'"),
])
def test_bad_keypoint_file_is_a_data_error_naming_it(tmp_path, content, message):
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=rf"pose\.json: {message}"):
        read_keypoints(path, (32, 32))


def test_generate_refuses_counts_below_one_before_loading_anything(tmp_path, capsys):
    argv = ["generate", f"pipeline={tmp_path / 'no-pipeline'}", f"out_dir={tmp_path}"]
    assert main([*argv, "num_images=0", "steps=0"]) == 1
    assert "generate: must be at least 1: steps=0, num_images=0" in capsys.readouterr().err
    assert main([*argv, "batch_size=0"]) == 1
    assert "batch_size=0" in capsys.readouterr().err


def test_scripts_print_what_the_library_refuses_as_one_line(capsys):
    from fashionshoot.errors import ConfigError, script_exit_code

    def refused():
        raise ConfigError("generated: expected a list, got 'x'")

    assert script_exit_code("eval/generation.py", refused) == 1
    assert capsys.readouterr().err == "eval/generation.py: error: generated: expected a list, got 'x'\n"
    assert script_exit_code("eval/generation.py", lambda: None) == 0
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        script_exit_code("eval/generation.py", lambda: 1 / 0)
