"""Documentation that is generated from the code, or that names code, must not drift from it."""

import re
from pathlib import Path

from trl_treepo import TreePOConfig
from trl_treepo.config import configuration_reference, treepo_fields

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_configuration_reference_is_generated_from_treepo_config():
    text = (DOCS / "configuration.md").read_text()
    block = re.search(r"<!-- BEGIN GENERATED[^>]*-->\n(.*?)\n<!-- END GENERATED -->", text, re.S).group(1)
    assert block == configuration_reference(), "docs/configuration.md is stale: run `python -m trl_treepo.config`"


def test_every_treepo_field_is_documented_in_the_class_docstring_and_its_help():
    docstring = TreePOConfig.__doc__
    for field in treepo_fields():
        assert f"{field.name} (`" in docstring, f"{field.name} is missing from TreePOConfig's docstring"
        assert field.metadata.get("help"), f"{field.name} has no metadata help"


def test_algorithm_doc_maps_every_tree_knob():
    text = (DOCS / "algorithm.md").read_text()
    for field in treepo_fields():
        if field.name.startswith("tree_") and "server" not in field.name and "timeout" not in field.name:
            assert re.search(rf"\b{field.name}\b", text), f"docs/algorithm.md does not mention {field.name}"


def test_every_test_the_docs_name_exists():
    named = set()
    for page in DOCS.glob("*.md"):
        named |= set(re.findall(r"(tests/\w+\.py)::(\w+)", page.read_text()))
    assert named, "docs/reliability.md names no tests"
    for module, name in sorted(named):
        source = (DOCS.parent / module).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{module}::{name} is named in the docs but does not exist"


def test_the_documented_server_command_is_the_one_the_code_and_tests_use():
    from trl_treepo.backends.vllm import server_command

    command = server_command("Qwen/Qwen2.5-7B")
    assert command in (DOCS / "vllm.md").read_text()
    assert command.replace("VLLM_SERVER_DEV_MODE=1 ", "CUDA_VISIBLE_DEVICES=0 VLLM_SERVER_DEV_MODE=1 ") in (
        DOCS.parent / "examples" / "README.md"
    ).read_text()
    for page in [DOCS.parent / "README.md", DOCS.parent / "examples" / "README.md", *DOCS.glob("*.md")]:
        for line in page.read_text().splitlines():
            if "trl vllm-serve --model" in line:  # only as the deprecated short form, after the vllm serve command
                assert page.name == "vllm.md" and "short form" in line, f"{page.name}: {line}"


def _source(path: Path) -> str:
    """A script's source, or a package's: every module in it."""
    return "\n".join(p.read_text() for p in sorted(path.rglob("*.py"))) if path.is_dir() else path.read_text()


def _built_options(path: str) -> set[str]:
    """Options a script's parser builds from a table rather than spells out (the study's setting fields)."""
    if path != "trl_treepo/learning":
        return set()
    from trl_treepo.learning.cli import build_parser

    return set(build_parser()._option_string_actions)


def test_every_option_the_docs_give_a_script_exists():
    scripts = {"examples/demo.py": "examples/demo.py", "trl_treepo.learning": "trl_treepo/learning",
               "trl_treepo.benchmark": "trl_treepo/benchmark"}  # fmt: skip
    checked = 0
    for page in [DOCS.parent / "README.md", *DOCS.glob("*.md")]:
        for command in re.findall(r"^(?:python|make)[^\n]*(?:\\\n[^\n]*)*", page.read_text(), re.M):
            for name, path in scripts.items():
                if name in command:
                    source = _source(DOCS.parent / path)
                    built = _built_options(path)
                    for option in re.findall(r"(?<![\w-])--\w[\w-]*", command):
                        checked += 1
                        assert f'"{option}"' in source or option in built, f"{page.name}: {path} has no option {option}"
    assert checked, "the docs give no script options"
