import argparse
import json

import pytest

from saelab.config import CacheCommand, add_arguments, from_args, from_dict, to_dict
from saelab.errors import SaelabError


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, CacheCommand)
    return from_args(CacheCommand, parser.parse_args(argv))


def test_defaults_come_from_the_dataclasses():
    assert parse([]) == CacheCommand()


def test_flags_override_file_which_overrides_defaults(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("data:\n  context_length: 64\n  seed: 3\nharvest:\n  hooks: [blocks.2.hook_mlp_out]\n")
    config = parse(["--config", str(file), "--seed", "7", "--with-grads"])
    assert config.data.context_length == 64  # from the file
    assert config.data.seed == 7  # flag beats file
    assert config.harvest.hooks == ["blocks.2.hook_mlp_out"]
    assert config.harvest.with_grads is True
    assert config.cache.n_tokens == CacheCommand().cache.n_tokens  # default


def test_json_config_and_round_trip(tmp_path):
    config = parse(["--hooks", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_z", "--n-tokens", "999"])
    file = tmp_path / "c.json"
    file.write_text(json.dumps(to_dict(config)))
    assert parse(["--config", str(file)]) == config
    assert from_dict(CacheCommand, to_dict(config)) == config


@pytest.mark.parametrize(
    "text, message",
    [("data:\n  contxt_length: 3\n", "contxt_length"), ("dta:\n  seed: 1\n", "Unknown config section"),
     ("- 1\n- 2\n", "mapping"), ("data: [\n", "could not be parsed")],
)
def test_bad_config_files_say_what_is_wrong(tmp_path, text, message):
    file = tmp_path / "c.yaml"
    file.write_text(text)
    with pytest.raises(SaelabError, match=message):
        parse(["--config", str(file)])


def test_missing_config_file(tmp_path):
    with pytest.raises(SaelabError, match="does not exist"):
        parse(["--config", str(tmp_path / "nope.yaml")])
