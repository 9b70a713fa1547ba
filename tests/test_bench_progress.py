"""Issue 26: every long benchmark / study shows per-case progress through ``bench.common.cases`` (with no terminal,
one ``bench LABEL case i/N ...`` line per case on stderr). Cheap CPU settings of a few entries, the same arguments
as their own tests; each fails if its measurement loop loses the ``cases`` wrapping."""

from __future__ import annotations

import pytest

from modformer.bench import registry

RUNS = {   # name -> (progress label, arguments before --out, --out is a file rather than a folder)
    "grad-checkpointing": ("grad-checkpointing", ["--tiny", "--models", "tiny-4l", "--warmup", "1", "--steps", "1",
                                                  "--device", "cpu"], False),
    "generation-batched": ("generation-batched", ["--tiny", "--device", "cpu", "--repeats", "1"], False),
    "recipe-stability": ("recipe-stability", ["--tiny", "--seeds", "2", "--depths", "1", "--steps", "4",
                                              "--eval-every", "2", "--log-every", "1", "--device", "cpu",
                                              "--target", "99"], False),
    "variants": ("variants", ["--steps", "2", "--p", "7", "--only", "mha,moe", "--threads", "1"], True),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_bench_shows_a_progress_line_per_case(name, tmp_path, capsys):
    label, argv, out_is_file = RUNS[name]
    out = tmp_path / "result.json" if out_is_file else tmp_path
    assert registry.run(name, [*argv, "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if ln.startswith(f"bench {label} case ")]
    assert any(ln.startswith(f"bench {label} case 1/") for ln in lines), err[-20:]
    total = lines[0].split()[3].split("/")[1]
    assert lines[-1].split()[3] == f"{total}/{total}" and "done" in lines[-1]     # the last case closes the count
    assert "ETA" in lines[0]
