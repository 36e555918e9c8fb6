"""Check that groupvit_pt and groupvit_tf mirror each other. Maintainer script, also run by the tests.

    python tools/check_mirror.py

For every pair of twin files (same name in both packages) it compares, with the ``TF`` class prefix removed:
the module files present, the public classes in order, and for each class the attributes assigned in ``__init__``
(``self.name = ...``) in order, plus the module-level functions in order. Prints the differences and exits 1
if there are any.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("groupvit_pt", "groupvit_tf")
# Attributes that exist for framework idiom only (Keras bookkeeping) and carry no architecture.
IGNORED_ATTRIBUTES = {"supports_masking", "built"}
# Twin modules whose contents are compared. training.py exists in both but is not a mirror: PyTorch has the whole
# trainer (DDP, checkpoints, resume); TensorFlow has the losses and a Keras fit step, tested for equal gradients.
MIRRORED_MODULES = ("__init__.py", "modeling.py", "segmentation.py")
# Class-level API that only one framework has by convention (Keras serialisation and export, Keras variables).
FRAMEWORK_ONLY_API = {"get_config", "from_config", "export", "canonical_variables"}


def _strip(name: str) -> str:
    return name[2:] if name.startswith("TF") and name[2:3].isupper() else name


def describe(path: str) -> Tuple[List[str], Dict[str, List[str]]]:
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=path)
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]
    classes: Dict[str, List[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
            continue  # private classes are framework idiom (e.g. a Keras BatchNorm with a step counter)
        attributes: List[str] = []
        for item in node.body:
            # Class-level API assigned once and shared (config = property(...), canonical_state = ...).
            if isinstance(item, ast.Assign):
                for target in item.targets:
                    if (isinstance(target, ast.Name) and not target.id.startswith("_")
                            and target.id not in FRAMEWORK_ONLY_API):
                        attributes.append("class." + target.id)
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                for sub in ast.walk(item):
                    targets = sub.targets if isinstance(sub, ast.Assign) else (
                        [sub.target] if isinstance(sub, ast.AnnAssign) else [])
                    for target in targets:
                        if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                                and target.value.id == "self" and not target.attr.startswith("_")
                                and target.attr not in IGNORED_ATTRIBUTES and target.attr not in attributes):
                            attributes.append(target.attr)
        classes[_strip(node.name)] = attributes
    return functions, classes


def compare() -> List[str]:
    problems: List[str] = []
    files = [sorted(f for f in os.listdir(os.path.join(ROOT, p)) if f.endswith(".py")) for p in PACKAGES]
    if files[0] != files[1]:
        problems.append(f"module files differ: {PACKAGES[0]} {files[0]} vs {PACKAGES[1]} {files[1]}")
    for name in sorted(set(files[0]) & set(files[1]) & set(MIRRORED_MODULES)):
        (pt_functions, pt_classes), (tf_functions, tf_classes) = (
            describe(os.path.join(ROOT, p, name)) for p in PACKAGES)
        if pt_functions != tf_functions:
            problems.append(f"{name}: functions differ: {pt_functions} vs {tf_functions}")
        if list(pt_classes) != list(tf_classes):
            problems.append(f"{name}: classes differ: {list(pt_classes)} vs {list(tf_classes)}")
        for cls in pt_classes:
            if cls in tf_classes and pt_classes[cls] != tf_classes[cls]:
                problems.append(f"{name}: {cls} attributes differ: {pt_classes[cls]} vs {tf_classes[cls]}")
    return problems


def main() -> int:
    problems = compare()
    for problem in problems:
        print(problem)
    if not problems:
        print("groupvit_pt and groupvit_tf mirror each other")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
