"""groupvit_pt and groupvit_tf stay mirror images: same files, public classes, attributes and functions in order."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import check_mirror  # noqa: E402


def test_framework_packages_mirror_each_other():
    problems = check_mirror.compare()
    assert problems == [], "\n".join(problems)
