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


def test_the_combined_claims_loss_costs_are_each_arm_minus_dense_on_the_same_seed(tmp_path):
    """The claims table's loss column: sundew 25% with sparse attention, sundew alone and sparse
    attention alone at the row's top_k, each minus dense full training's final validation loss on
    the same seed; the recipe's runs, other top_k and other gates are not arms of the claim."""
    import json

    def run(name: str, val_loss: float, seed: int, **overrides: str) -> str:
        overrides = {"study": "long_context_rope", "seed": str(seed), **overrides}
        summary = {"seed": seed, "val_loss": val_loss, "model": "gpt",
                   "attention": overrides.get("attention", "dense"), "gate": overrides.get("gate", "none"),
                   "target_rate": float(overrides.get("budget", 1.0))}
        return json.dumps({"run": name, "overrides": overrides, "summary": summary, "epochs": []})

    sparse = {"attention": "sparse_causal_long", "attention.top_k": "256"}
    gated = {"gate": "sundew_memory", "budget": "0.25", "gate.pack": "true"}
    lines = [run("dense0", 1.80, 0), run("dense1", 1.78, 1),
             run("both0", 2.20, 0, **gated, **sparse), run("sundew0", 2.25, 0, **gated),
             run("sparse0", 1.77, 0, **sparse), run("sparse1", 1.79, 1, **sparse),
             run("sparse512", 1.00, 0, attention="sparse_causal_long"),  # top_k 512 by default: another row's
             run("random0", 9.00, 0, gate="random", budget="0.25"),
             run("sundew_half0", 9.00, 0, gate="sundew_memory", budget="0.5"),
             run("recipe0", 9.00, 0, **sparse, init_from="epoch_5.pt")]
    record = tmp_path / "runs.jsonl"
    record.write_text("\n".join(lines) + "\n")
    # both 2.20 - 1.80; sundew 2.25 - 1.80; sparse mean(1.77 - 1.80, 1.79 - 1.78) = -0.01: seeds differ by arm
    assert readme_answer.loss_costs((str(record), 256)) == "+0.40 (seed 0), +0.45 (seed 0), -0.01 (seeds 0, 1)"
    record.write_text("\n".join(line for line in lines if '"run": "sparse1"' not in line) + "\n")
    assert readme_answer.loss_costs((str(record), 256)) == "+0.40, +0.45, -0.03 (seed 0)"
    assert readme_answer.loss_costs(None) == "–"
    assert readme_answer.loss_costs((str(tmp_path / "absent.jsonl"), 256)) == "–"
