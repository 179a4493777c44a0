"""Help texts: every option described, defaults shown once and true, no source file named."""

from __future__ import annotations

import argparse
import re

import pytest

from trainer.cli import build_parser as train_parser
import cxr_config
from worker.cli.main import build_parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_worker_command_has_a_description_and_every_option_a_help():
    parser = build_parser()
    top = parser.format_help()
    assert not re.search(r"\w+/\w+\.py", top)  # no source file named
    for name, sub in subparsers(parser).items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, (name, action.dest)
        assert "(default: )" not in sub.format_help()


def test_the_serve_help_says_what_it_exposes_and_the_port_flags_exist():
    serve = subparsers(build_parser())["serve"].format_help()
    assert "0.0.0.0:11112" in " ".join(serve.split()) and "TLS" in serve and "calling AE" in serve
    for flag in ("--port", "--bind", "--data-dir"):
        assert flag in serve


def test_train_help_shows_defaults_once_and_true():
    defaults = cxr_config.load("train", "CXR_TRAIN", environ={})
    parser = train_parser(defaults)
    top = parser.format_help()
    assert "cxr-train train --help" in " ".join(top.split())
    train = " ".join(subparsers(parser)["train"].format_help().split())
    assert "(default: True)" not in train and "(default: False)" not in train
    assert "(default: )" not in train and train.count("OUTPUT/cache") == 1
    assert "instead of fp16 (default: fp16 weights" in train
    for sub in subparsers(parser).values():
        for action in sub._actions:
            assert action.help, action.dest


@pytest.mark.parametrize("half, shown", [(True, "fp16"), (False, "fp32")])
def test_the_precision_default_follows_the_configuration(half, shown):
    defaults = cxr_config.load("train", "CXR_TRAIN", environ={"CXR_TRAIN__TRAIN__HALF": str(half).lower()})
    train = " ".join(subparsers(train_parser(defaults))["train"].format_help().split())
    assert f"(default: {shown} weights" in train
