"""The benchmark registry (`modformer bench NAME | list`) and the committed results' layout and schema."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from modformer.bench import registry
from modformer.bench.common import DEFAULT_OUT, RESULT_KEYS, map_cases, write_result
from modformer.cli import main

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_bench_list_prints_one_line_per_entry(capsys):
    assert main(["bench", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(registry.ENTRIES)
    for name in ("throughput", "attention", "generation", "memory", "fidelity", "time-to-loss"):   # the old names
        assert name in registry.ENTRIES


@pytest.mark.parametrize("name", list(registry.ENTRIES))
def test_every_entry_imports_and_parses_help(name, capsys):
    """Each entry's module has main(argv); ``--help`` runs its parser (prog named after the CLI entry)."""
    module = importlib.import_module(registry.ENTRIES[name].module_path)
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    assert f"modformer bench {name}" in capsys.readouterr().out


def test_unknown_benchmark_is_one_error_line(capsys):
    assert main(["bench", "hourglas"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown benchmark 'hourglas' (did you mean 'hourglass'?)")


def test_write_result_has_the_schema_and_defaults_outside_the_committed_results(tmp_path, monkeypatch):
    """Every result carries benchmark, command, device, torch, git commit, date, headline, rows; the default
    folder is runs/bench, so only an explicit --out touches benchmarks/results."""
    monkeypatch.chdir(tmp_path)
    path = write_result("demo", {"x": 1.0}, [{"a": 1}], "cpu", extra={"note": "n"})
    assert path == Path(DEFAULT_OUT) / "demo.json" and not DEFAULT_OUT.startswith("benchmarks")
    result = json.loads(path.read_text())
    assert list(result)[:len(RESULT_KEYS)] == list(RESULT_KEYS) and result["note"] == "n"
    assert result["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", result["git_commit"])


def canonical_files() -> list[Path]:
    return sorted(RESULTS.glob("*.json"))


def test_canonical_results_have_the_schema():
    """One canonical file per question in benchmarks/results, each with every schema key (null where unknown)."""
    assert canonical_files()
    for path in canonical_files():
        result = json.loads(path.read_text())
        missing = [k for k in RESULT_KEYS if k not in result]
        assert not missing, f"{path.name} lacks {missing}"


def test_archive_index_lists_every_archived_file_once():
    """benchmarks/results/archive/INDEX.md: one line per archived file, and no line for a file that is not there."""
    archive = RESULTS / "archive"
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in archive.iterdir() if p.name != "INDEX.md")
    listed = re.findall(r"^- `([^`]+)`", (archive / "INDEX.md").read_text(), flags=re.M)
    assert sorted(listed) == files


def test_modification_guide_cites_existing_tests():
    """Every `tests/FILE.py::test_name` (and each following `::test_name` of the same file) in the guide exists."""
    text = re.sub(r"```.*?```", "", (ROOT / "docs" / "transformer_modification_guide.md").read_text(), flags=re.S)
    cited, current = [], None
    for item in re.findall(r"`([^`]+)`", text):
        m = re.fullmatch(r"(tests/\w+\.py)::(\w+)", item) or re.fullmatch(r"::(\w+)", item)
        if m and m.re.pattern.startswith("(tests"):
            current = m.group(1)
            cited.append((current, m.group(2)))
        elif m and current:
            cited.append((current, m.group(1)))
    assert len(cited) > 20
    for path, name in cited:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), flags=re.M), f"{path}::{name} not found"


def test_benchmark_pages_link_to_files_that_exist():
    """Relative links and `benchmarks/results/...` paths in BENCHMARKS.md and docs/studies point at real files."""
    pages = [ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs" / "studies").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not link.startswith("http"):
                assert (page.parent / link).exists(), f"{page.name}: broken link {link}"
        for path in re.findall(r"benchmarks/results/[\w./-]+\.(?:json|png|md)", text):
            assert (ROOT / path).exists(), f"{page.name}: {path} does not exist"
        for name in re.findall(r"`([\w.-]+\.json)`", text):     # a bare name is a canonical file's
            assert (RESULTS / name).exists() or not (RESULTS / "archive" / name).exists(), \
                f"{page.name}: {name} is archived: write archive/{name}"


def test_circuits_study_through_the_registry_writes_a_schema_result_and_its_figures(tmp_path):
    """A moved study (tiny CPU settings: a smoke run, not a measurement) writes the schema through --out, with its
    notes, and circuits-figures draws both pages' figures from that file."""
    out = tmp_path / "c.json"
    assert main(["bench", "circuits", "--steps-1l", "2", "--steps-2l", "2", "--d-model", "32", "--n-head", "2",
                 "--seq-len", "32", "--batch", "2", "--vocab", "512", "--threads", "1",
                 "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert all(k in result for k in RESULT_KEYS) and result["benchmark"] == "circuits"
    assert [r["model"] for r in result["rows"]] == ["attn_only_1l", "attn_only_2l"] and result["notes"]
    assert len(result["rows"][0]["copying_scores"]) == 2
    assert main(["bench", "circuits-figures", str(out), "--out", str(tmp_path / "fig")]) == 0
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["circuits_1l_copying.png",
                                                                     "circuits_2l_induction.png"]
    assert main(["bench", "circuits-figures", str(out), "--out", str(tmp_path / "fig"), "--runs",
                 str(tmp_path / "runs")]) == 0                  # + the plots drawn from the weights (issue 27)
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == [
        "circuits_1l_copying.png", "circuits_1l_ov_eigenvalues.png", "circuits_2l_induction.png",
        "circuits_2l_ov_eigenvalues.png", "circuits_2l_patterns.png"]


def test_variants_study_writes_rows_for_the_chosen_variants(tmp_path):
    """modformer bench variants (moved from benchmarks/): one row per chosen variant, schema keys, its plot."""
    out = tmp_path / "v.json"
    assert main(["bench", "variants", "--steps", "2", "--p", "7", "--only", "mha,moe", "--threads", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert all(k in result for k in RESULT_KEYS) and result["settings"]["steps"] == 2
    assert [r["variant"] for r in result["rows"]] == ["mha", "moe"] and out.with_suffix(".png").is_file()


def test_map_cases_in_processes_keeps_order_and_raises(capsys):
    import math

    items = [5, 3, 7, 1]
    assert map_cases(math.factorial, items, "t", jobs=2) == map_cases(math.factorial, items, "t") == [120, 6, 5040, 1]
    seen: list[list[int]] = []
    map_cases(math.factorial, items, "t", jobs=2, on_result=seen.append)   # after each item: those finished so far
    assert [len(x) for x in seen] == [1, 2, 3, 4] and seen[-1] == [120, 6, 5040, 1]
    with pytest.raises(ValueError, match="math domain error"):
        map_cases(math.sqrt, [4.0, -1.0, 9.0], "t", jobs=2)
    capsys.readouterr()
