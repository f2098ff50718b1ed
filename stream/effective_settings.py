"""``lineinspect config``: print the effective settings (after files, overrides and environment) as YAML, with
passwords in URLs and secret keys (``preview.token``) masked."""

from __future__ import annotations

import argparse
import sys

import yaml

from config.settings import Settings, to_dict
from stream.redact import redact_settings


def main(settings: Settings, args: argparse.Namespace) -> int:
    yaml.safe_dump(redact_settings(to_dict(settings)), sys.stdout, sort_keys=False)
    return 0
