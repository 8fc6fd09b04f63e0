"""The policy cookbook (policies/cookbook, docs/policy-cookbook.md): every recipe
loads, is canonically formatted, passes its own tests with both engines, and the
document shows the files exactly as they are."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COOKBOOK = REPO / "policies" / "cookbook"
DOC = REPO / "docs" / "policy-cookbook.md"
EGRESS = Path(sys.executable).parent / "egress"
RECIPES = sorted(p.name for p in COOKBOOK.iterdir() if p.is_dir())


def egress(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(EGRESS), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_the_cookbook_has_the_recipes_the_docs_promise():
    assert set(RECIPES) >= {"github-readonly", "llm-api", "package-registries", "cloud-metadata",
                            "time-and-labels", "private-services"}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("engine", ["rust", "python"])
def test_recipe_passes_its_tests(recipe, engine):
    d = COOKBOOK / recipe
    test_files = sorted(d.glob("*.test.yaml"))
    assert test_files, f"{recipe} has no tests"
    n = sum(len(yaml.safe_load(f.read_text())["tests"]) for f in test_files)
    r = egress("policy", "test", "--engine", engine, d)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"\b{n} tests in {len(test_files)} files?: {n} passed, 0 failed", r.stdout), r.stdout


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_is_formatted(recipe):
    r = egress("policy", "fmt", "--check", COOKBOOK / recipe)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_document_shows_every_file_verbatim():
    doc = DOC.read_text()
    for recipe in RECIPES:
        for f in sorted((COOKBOOK / recipe).glob("*.yaml")):
            rel = f.relative_to(REPO).as_posix()
            assert f"`{rel}`" in doc, f"{rel} is not named in {DOC.name}"
            assert f.read_text() in doc, f"{rel} differs from its copy in {DOC.name}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_lints_clean(recipe):
    r = egress("policy", "lint", "--fail-on", "warning", COOKBOOK / recipe)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no findings" in r.stdout + r.stderr
