"""Every command the README and the pages under docs/ show, and every step of `make demo`, calls an
existing script with flags that script accepts (checked against its own argparse parser), so a renamed
flag fails here first. The README stays a short front door whose links resolve."""

from __future__ import annotations

import re

import pytest

from tests.script_calls import ROOT, bad_flags, invocations, logical_lines

# the pages that hold the commands the README leaves out (tests/test_cluster.py checks docs/cluster.md too)
DOC_SCRIPTS = {
    "docs/ctclip.md": {"ctclip_make_synthetic", "ctclip_preprocess", "ctclip_split", "ctclip_train",
                       "ctclip_eval", "ctclip_impressions", "benchmarks/bench_probe_ctclip", "ctclip_train.sbatch"},
    "docs/hemorrhage.md": {"hemorrhage_make_synthetic", "hemorrhage_prepare", "hemorrhage_train",
                           "hemorrhage_extract_features", "hemorrhage_train_sequence", "hemorrhage_infer",
                           "hemorrhage_eval", "hemorrhage_plot_study"},
    "docs/cluster.md": {"ctclip_preprocess", "ctclip_merge_stores", "ctclip_preprocess.sbatch",
                        "ctclip_merge.sbatch", "ctclip_train.sbatch", "submit_ctclip_pipeline.sh",
                        "hemorrhage_prepare.sbatch", "hemorrhage_infer.sbatch"},
}


def doc_lines(path: str) -> list[str]:
    """The shell lines of a markdown file's bash/sh/unlabelled code blocks, continuations joined."""
    text = (ROOT / path).read_text()
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
    return [line for lang, block in blocks if lang in ("bash", "sh", "")
            for line in logical_lines(block, comments=False)]


def readme_lines() -> list[str]:
    return doc_lines("README.md")


def makefile_recipe(target: str) -> list[str]:
    """The recipe lines of one Makefile target, continuations joined, '$$' read as the shell's '$'."""
    text = (ROOT / "Makefile").read_text()
    # the rule with a recipe (a target-specific variable line such as "demo: export X = 1" has none)
    bodies = [m.group(1) for m in re.finditer(rf"^{target}:.*\n((?:\t.*\n|\n)*)", text, flags=re.M)
              if m.group(1).strip()]
    assert len(bodies) == 1, f"expected one recipe of {target!r} in the Makefile, found {len(bodies)}"
    body = "\n".join(line[1:] for line in bodies[0].splitlines() if line.startswith("\t"))
    return [line.lstrip("@-").replace("$$", "$") for line in logical_lines(body, comments=False)]


def test_readme_commands_use_existing_scripts_and_flags():
    lines = readme_lines()
    calls = [inv for line in lines for inv in invocations(line)]
    assert len({target for _, target, _, _ in calls}) >= 15  # the README shows most scripts
    assert bad_flags(lines) == []


@pytest.mark.parametrize("path", sorted(DOC_SCRIPTS))
def test_doc_commands_use_existing_scripts_and_flags(path):
    lines = doc_lines(path)
    called = {target for line in lines for _, target, _, _ in invocations(line)}
    assert DOC_SCRIPTS[path] <= called, f"{path} no longer shows {sorted(DOC_SCRIPTS[path] - called)}"
    assert bad_flags(lines) == []


def test_readme_is_a_short_front_door_that_links_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for path in [*DOC_SCRIPTS, "docs/benchmarks.md", "docs/differences_ctclip.md",
                 "docs/differences_hemorrhage.md"]:
        assert f"]({path})" in text, f"the README does not link {path}"


@pytest.mark.parametrize("path", ["README.md", "CLAUDE.md", *sorted(p.relative_to(ROOT).as_posix()
                                                                    for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(path):
    text = (ROOT / path).read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    missing = [t for t in targets if not re.match(r"\w+:", t)
               and not (ROOT / path).parent.joinpath(t.split("#")[0]).exists()]
    assert missing == []


def test_demo_steps_use_existing_scripts_and_flags():
    lines = [line for target in ("demo", "demo-chest", "demo-chest-data", "demo-chest-model", "demo-head")
             for line in makefile_recipe(target)]
    assert any("$(MAKE)" in line and "demo-head" in line and "demo-chest-model" in line
               for line in makefile_recipe("demo"))
    assert any("demo-chest-data" in line for line in makefile_recipe("demo"))
    called = {target for line in lines for kind, target, _, _ in invocations(line) if kind == "script"}
    assert {"fetch_samples", "ctclip_make_synthetic", "ctclip_preprocess", "ctclip_split", "ctclip_train",
            "ctclip_eval", "hemorrhage_make_synthetic", "hemorrhage_train", "hemorrhage_extract_features",
            "hemorrhage_train_sequence", "hemorrhage_infer", "hemorrhage_eval", "hemorrhage_plot_study",
            "demo_summary"} <= called
    assert bad_flags(lines) == []


def test_the_checker_sees_a_bad_flag_in_a_recipe():
    assert bad_flags(["$(PY) scripts/hemorrhage_eval.py --predictions P --labels L --output_dir O"]) == []
    assert len(bad_flags(["$(PY) scripts/hemorrhage_eval.py --prediction P"])) == 1
