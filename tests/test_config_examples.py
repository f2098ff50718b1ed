"""The shipped example line configurations load and validate."""

from pathlib import Path

import pytest

from config.settings import Settings

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "config" / "lines").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_line_config_validates(path):
    s = Settings.load(path, env={})
    assert s.cameras, "an example line config defines at least one camera"
    for cam in s.cameras:
        assert s.camera(cam.id) is cam


def test_there_are_examples():
    assert len(EXAMPLES) >= 2
