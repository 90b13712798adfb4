"""The documentation cannot drift: README size, generated reference tables, hand-written tables checked
against the code, links, nav, and ``mkdocs build --strict`` (see docs/index.md "This documentation")."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest
import yaml

from medflower import docgen
from medflower.config import ExperimentConfig
from medflower.config.shift import PRESETS, ShiftProfile
from medflower.config.strategy import STRATEGY_NAMES
from medflower.config.train import TrainConfig
from medflower.schema import rng_field

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README_LIMIT = 12 * 1024
SECTIONS = tuple(k for k, tp in typing.get_type_hints(ExperimentConfig).items() if dataclasses.is_dataclass(tp))
# backticked names that look like keys but are files
FILE_SUFFIXES = ("pt", "json", "png", "md", "yaml", "csv", "py")


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


# ---- README ---------------------------------------------------------------------------------------


def test_readme_is_a_front_page_of_at_most_12_kb():
    size = (REPO / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move reference text into docs/ (limit {README_LIMIT})"


def _slug(heading: str) -> str:
    """The anchor of a heading, as mkdocs' toc and GitHub make it for plain headings."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return re.sub(r"[\s]+", "-", text)


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_readme_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links
    for link in links:
        if re.match(r"https?://", link):
            continue
        target, _, anchor = link.partition("#")
        path = REPO / target
        assert path.exists(), f"README links to {link}: {target} does not exist"
        if anchor:
            assert anchor in _anchors(path), f"README links to {link}: no heading with that anchor"


def test_readme_administrator_snippet_is_a_valid_experiment():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert blocks, "README shows the administrator a YAML snippet"
    for block in blocks:
        exp = ExperimentConfig.from_dict(yaml.safe_load(block))  # raises ConfigError on any bad key
        assert exp.privacy.mode != "none" and exp.strategy.name != "fedavg"


# ---- navigation -----------------------------------------------------------------------------------


def _nav_files(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_files(config["nav"])
    pages = [p.name for p in _pages()]
    assert sorted(pages) == sorted(nav), (
        f"pages not in nav: {set(pages) - set(nav)}; nav without page: {set(nav) - set(pages)}"
    )


# ---- the generated experiment-key reference -------------------------------------------------------


def _expected_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every key and its default, walked independently of medflower.docgen."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "base_dir":  # set from the YAML's folder, refused in a YAML file
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_expected_keys(tp, f"{prefix}{f.name}."))
            continue
        out[f"{prefix}{f.name}"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            out.update(_expected_keys(typing.get_args(tp)[1], f"{prefix}{f.name}.<name>."))
    return out


def test_every_experiment_key_appears_with_its_default():
    rows = {r.key: r for r in docgen.config_keys()}
    expected = _expected_keys(ExperimentConfig)
    assert set(rows) == set(expected)
    assert "base_dir" not in rows
    page = docgen.experiment_keys_markdown()
    for key, default in expected.items():
        assert rows[key].default == docgen.yaml_value(default), key
        assert re.search(
            rf"^\| `{re.escape(key)}` \|(?:[^|]|\\\|)*\| `{re.escape(docgen.yaml_value(default))}` \|", page, re.M
        ), key


def test_reference_rows_carry_ranges_choices_and_comments():
    rows = {r.key: r for r in docgen.config_keys()}
    assert rows["data.val_fraction"].allowed == "[0.0, 0.5]"
    assert rows["train.lr"].allowed == "(0.0, 10.0]"  # exclusive_min
    assert rows["seed"].allowed == ">= 0"
    assert rows["train.optimizer"].allowed == "'sgd', 'adam', 'adamw'"
    assert rows["model.spatial_dims"].allowed == "2, 3"
    assert rows["data.channels"].type == "int | null"
    assert rows["data.size"].type == "list of int | null"
    assert "per-sample clipping bound" in rows["privacy.max_grad_norm"].doc
    assert rows["privacy.max_grad_norm"].group.startswith("mode 'sample'")
    assert rows["privacy.sites.<name>.target_epsilon"].group.startswith("mode 'sample'")
    assert "None means all sampled sites" in rows["participation.min_sites"].doc


Mode = Literal["a", "b"]


@dataclass(frozen=True)
class _Inner:
    depth: int = rng_field(3, min=1, max=9)  # how deep


@dataclass(frozen=True)
class _Throwaway:
    """A section made up for the test."""

    # ---- first group ----
    # the count
    # of things
    count: int = rng_field(2, min=0)
    ratio: float = rng_field(0.5, min=0.0, exclusive_min=True, max=1.0, step=0.1)
    mode: Mode | None = None  # pick one

    inner: _Inner = field(default_factory=_Inner)
    named: dict[str, _Inner] = field(default_factory=dict)
    sizes: tuple[int, ...] = (1, 2)
    plain: str = "x"


def test_generator_follows_a_new_dataclass():
    rows = {r.key: r for r in docgen.config_keys(_Throwaway, "t.")}
    assert list(rows) == [
        "t.count",
        "t.ratio",
        "t.mode",
        "t.inner.depth",
        "t.named",
        "t.named.<name>.depth",
        "t.sizes",
        "t.plain",
    ]
    assert (rows["t.count"].type, rows["t.count"].default, rows["t.count"].allowed) == ("int", "2", ">= 0")
    assert rows["t.count"].doc == "the count of things" and rows["t.count"].group == "first group"
    assert rows["t.ratio"].allowed == "(0.0, 1.0]; step=0.1"  # metadata the schema does not know is shown too
    assert (rows["t.mode"].type, rows["t.mode"].default, rows["t.mode"].allowed) == ("str | null", "null", "'a', 'b'")
    assert rows["t.mode"].doc == "pick one"
    assert (rows["t.inner.depth"].allowed, rows["t.inner.depth"].doc) == ("[1, 9]", "how deep")
    assert rows["t.named"].type == "mapping of str to section"
    assert rows["t.sizes"].default == "[1, 2]"
    assert rows["t.plain"].doc == "" and rows["t.plain"].group == "first group"


def test_a_field_added_to_a_config_class_appears():
    extended = dataclasses.make_dataclass(
        "ExtendedTrain", [("warmup_rounds", int, rng_field(7, min=1))], bases=(TrainConfig,), frozen=True
    )
    rows = {r.key: r for r in docgen.config_keys(extended, "train.")}
    assert set(rows) == {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)} | {"train.warmup_rounds"}
    assert (rows["train.warmup_rounds"].default, rows["train.warmup_rounds"].allowed) == ("7", ">= 1")
    assert "threads" in rows["train.num_threads"].doc  # inherited fields keep their comments
    assert "`train.warmup_rounds`" in docgen.keys_table(list(rows.values()))


# ---- the generated strategy table -----------------------------------------------------------------


@dataclass(frozen=True)
class _FakeParams:
    eta: float = rng_field(0.01, min=0.0, exclusive_min=True)
    beta: float = rng_field(0.9, min=0.0, max=1.0)


@dataclass(frozen=True)
class _NoParams:
    pass


def test_strategy_table_from_a_registry():
    methods = {
        "fakeopt": SimpleNamespace(
            name="fakeopt",
            summary="server-side optimiser | made up",
            params=_FakeParams,
            privacy={"sample": None, "client": "needs a plain mean"},
            secure_aggregation=None,
            source="Flower",
        ),
        "fakebn": SimpleNamespace(
            name="fakebn",
            summary="keeps layers local",
            params=_NoParams,
            privacy={"sample": None, "client": None},
            secure_aggregation="sends no full model",
            source="medflower",
        ),
    }
    table = docgen.strategy_table_markdown(methods)
    lines = table.splitlines()
    fakeopt = next(line for line in lines if line.startswith("| `fakeopt`"))
    fakebn = next(line for line in lines if line.startswith("| `fakebn`"))
    assert "server-side optimiser \\| made up" in fakeopt  # a | in a summary does not break the table
    assert "`eta` = `0.01` (> 0.0)" in fakeopt and "`beta` = `0.9` ([0.0, 1.0])" in fakeopt
    assert "`sample` yes, `client` no" in fakeopt and fakeopt.endswith("| yes | any | Flower |")
    assert "| – |" in fakebn and fakebn.endswith("| no | any | medflower |")
    assert "* `fakeopt` with `privacy.mode: client`: needs a plain mean" in lines
    assert "* `fakebn` with secure aggregation (planned): sends no full model" in lines


def test_every_strategy_is_documented():
    from medflower.strategies.registry import METHODS

    table = docgen.strategy_table_markdown(METHODS)  # what the page shows, generated from the registry
    details = (DOCS / "strategies.md").read_text(encoding="utf-8")
    for name in STRATEGY_NAMES:
        assert re.search(rf"^\| `{name}` \|", table, re.M), f"the generated table lacks {name}"
        assert re.search(rf"^\|[^\n]*`{name}`", details, re.M), f"docs/strategies.md's details table lacks {name}"


# ---- hand-written tables, checked against the code ------------------------------------------------


def _doc_texts() -> dict[str, str]:
    paths = [*_pages(), REPO / "README.md", REPO / "deploy" / "README.md", REPO / "bench" / "RESULTS.md"]
    return {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in paths}


def _normalise(key: str) -> str:
    return re.sub(r"<[^>]+>", docgen.MAPPING_PLACEHOLDER, key)


def test_every_key_named_in_the_docs_exists():
    rows = {r.key: r for r in docgen.config_keys()}
    open_mappings = [k for k, r in rows.items() if r.type == "mapping of str to any"]
    sections = "|".join(SECTIONS)
    pattern = re.compile(rf"`((?:{sections})(?:\.(?:[a-z_0-9]+|<[^>`]+>))+)`")
    unknown = []
    for where, text in _doc_texts().items():
        for key in pattern.findall(text):
            k = _normalise(key)
            if k.rsplit(".", 1)[-1] in FILE_SUFFIXES or k in rows:
                continue
            if not any(k.startswith(f"{m}.") for m in open_mappings):
                unknown.append(f"{where}: {key}")
    assert not unknown, "keys the schema does not have:\n" + "\n".join(unknown)


def _same(written: str, value: Any) -> bool:
    if written == "–":  # unset: null, or an empty list or mapping
        return value is None or value in ((), {})
    parsed = yaml.safe_load(written)
    if isinstance(value, float) and isinstance(parsed, (int, float, str)) and not isinstance(parsed, bool):
        try:
            return float(parsed) == value
        except ValueError:
            return False
    return docgen.yaml_value(parsed) == docgen.yaml_value(value)


def test_hand_written_key_tables_state_the_code_defaults():
    expected = _expected_keys(ExperimentConfig)
    checked, wrong = 0, []
    for where, text in _doc_texts().items():
        for table in re.findall(r"^\| key \| default \|.*\n\|[-|]+\|\n((?:\|.*\n?)+)", text, re.M):
            for line in table.splitlines():
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                keys: list[str] = []
                for k in re.findall(r"`([^`]+)`", cells[0]):
                    if k.startswith(".") and keys:  # `privacy.sites.<site>.target_epsilon`, `.target_delta`
                        k = keys[-1].rsplit(".", 1)[0] + k
                    if "." in k and "*" not in k:
                        keys.append(k)
                written = re.findall(r"`([^`]+)`", cells[1]) if cells[1] != "–" else ["–"] * len(keys)
                if len(written) == 1:
                    written *= len(keys)
                if not keys or len(written) != len(keys):
                    continue  # prose defaults such as "from the data", "derived"
                for key, text_default in zip(keys, written, strict=True):
                    checked += 1
                    if not _same(text_default, expected[_normalise(key)]):
                        wrong.append(f"{where}: {key} says {text_default}, the code {expected[_normalise(key)]!r}")
    assert checked > 50
    assert not wrong, "\n".join(wrong)


def test_shift_parameter_table_states_the_identity_profile():
    text = (DOCS / "simulator.md").read_text(encoding="utf-8")
    table = re.search(r"^\| parameter \| identity \|.*\n\|[-|]+\|\n((?:\|.*\n?)+)", text, re.M).group(1)
    identity = ShiftProfile()
    seen = set()
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names, values = re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[1])
        for name, value in zip(names, values, strict=True):
            assert _same(value, getattr(identity, name)), name
            seen.add(name)
    assert seen | {"bias_degree"} == {f.name for f in dataclasses.fields(ShiftProfile)}
    assert "`bias_degree` default 3" in table and identity.bias_degree == 3


def test_shift_presets_table_is_generated_from_the_presets():
    table = docgen.shift_presets_markdown()
    for name, params in PRESETS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        for key, value in params.items():
            assert f"{key}={docgen.yaml_value(value)}" in row
    assert "<!-- generated: shift-presets -->" in (DOCS / "simulator.md").read_text(encoding="utf-8")


def test_all_commands_table_lists_every_cli_command():
    import argparse

    from medflower.cli import build_parser

    def leaves(parser: argparse.ArgumentParser, path: list[str]):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs and path:
            yield path
        for action in subs:
            for name, sub in action.choices.items():
                yield from leaves(sub, [*path, name])

    text = (DOCS / "index.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| `medflower ")]
    for path in leaves(build_parser(), []):
        assert any(
            line.startswith(f"| `medflower {path[0]}") and all(word in line for word in path) for line in rows
        ), f"docs/index.md 'All commands' lacks medflower {' '.join(path)}"


def test_app_components_named_in_the_docs_are_the_manifest_s():
    manifest = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    components = set(manifest["tool"]["flwr"]["app"]["components"].values())
    assert "medflower.server.app:app" in components
    for where, text in _doc_texts().items():
        for name in re.findall(r"`((?:medflower\.)?[a-z_.]+:app)`", text):
            assert name in components, f"{where} names the app component {name}; pyproject.toml has {components}"


# ---- the site -------------------------------------------------------------------------------------


def _mkdocs_missing() -> bool:
    return importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None


@pytest.mark.skipif(_mkdocs_missing(), reason="mkdocs and mkdocs-material are not installed (pip install -e '.[test]')")
def test_hook_refuses_an_unknown_generated_part():
    from mkdocs.exceptions import PluginError

    spec = importlib.util.spec_from_file_location("reference_hook", DOCS / "hooks" / "reference.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = SimpleNamespace(file=SimpleNamespace(src_path="x.md"))
    with pytest.raises(PluginError, match="unknown generated part 'nope'"):
        hook.on_page_markdown("a\n<!-- generated: nope -->\n", page=page, config=None, files=None)
    assert set(hook.GENERATORS) >= {"experiment-keys", "strategy-table"}


@pytest.mark.skipif(_mkdocs_missing(), reason="mkdocs and mkdocs-material are not installed (pip install -e '.[test]')")
def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reference = (site / "reference" / "index.html").read_text(encoding="utf-8")
    assert "privacy.sites.&lt;name&gt;.target_epsilon" in reference
    assert "participation.on_too_few" in reference
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        assert "generated:" not in text, f"{html}: a generated part was not filled"
        assert not re.search(r"<(?:script|link)[^>]+(?:src|href)=\"https?:", text), f"{html} loads from the network"
