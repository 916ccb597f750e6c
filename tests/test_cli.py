"""The `fashionshoot` command: dispatch, the embedded default `synth` job, and error reporting."""

from __future__ import annotations

import json

import yaml

from fashionshoot.cli import main


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
