"""The manual cannot drift: every key of every config file has a line in docs/configuration.md, and
README.md's answer is generated from the records."""
from pathlib import Path

from conftest import CONF_DIR, ROOT
from omegaconf import OmegaConf

from scripts.studies import readme_answer

GROUPS = ("task", "dataset", "model", "attention", "gate", "energy")


def config_keys() -> set[str]:
    keys: set[str] = set()

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                if key not in ("defaults", "hydra"):
                    walk(child, f"{prefix}{key}.")
        else:
            keys.add(prefix[:-1])

    walk(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml")), "")
    for group in GROUPS:
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            walk(OmegaConf.to_container(OmegaConf.load(path)), f"{group}.")
    return keys


def test_every_config_key_has_a_line_in_the_configuration_page():
    page = (ROOT / "docs" / "configuration.md").read_text()
    keys = config_keys()
    assert "gate.pack" in keys and "training.optimizer.fused" in keys  # the walk reaches groups and nested nodes
    missing = sorted(k for k in keys if f"`{k}`" not in page)
    assert not missing, f"docs/configuration.md has no line for {missing}"


def test_every_group_option_is_named_in_the_configuration_page():
    page = (ROOT / "docs" / "configuration.md").read_text()
    for group in GROUPS:
        for path in Path(CONF_DIR / group).glob("*.yaml"):
            assert f"`{path.stem}`" in page, f"{group}={path.stem} is not named in docs/configuration.md"


def test_the_readme_answer_is_what_the_records_give_and_fits_the_page():
    """README.md's answer and combined-claim tables are generated (scripts/studies/readme_answer.py): a
    record changed without regenerating them, or a hand edit inside them, fails here."""
    text = (ROOT / "README.md").read_text()
    assert readme_answer.regenerated(text) == text
    assert "| SimpleCNN, CIFAR-10, 40 epochs | 0.5 | 3 |" in text  # a row, not an empty block
    assert len(text.splitlines()) <= 150
