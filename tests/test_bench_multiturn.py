"""`python -m bench.multiturn`: the multi-turn table on the tiny model (contents, never speed)."""

from bench import multiturn


def test_the_table_shows_what_each_turn_prefilled_both_ways(tmp_path, capsys):
    rows = multiturn.main(["--repeats", "1", "--warmup", "0", "--max-new-tokens", "3", "--out", str(tmp_path)])
    assert {row["mode"] for row in rows} == set(multiturn.MODES)
    for mode in multiturn.MODES:
        again = [r for r in rows if r["mode"] == mode and r["cache"] == "re-prefill"]
        kept = [r for r in rows if r["mode"] == mode and r["cache"] == "kept"]
        assert [r["turn"] for r in again] == [r["turn"] for r in kept] == [1, 2, 3]
        assert all(r["prefilled_tokens"] == r["context_tokens"] and r["cached_tokens"] == 0 for r in again)
        assert again[0]["context_tokens"] < again[1]["context_tokens"] < again[2]["context_tokens"]
        assert kept[0]["cached_tokens"] == 0
        for later in kept[1:]:
            assert later["cached_tokens"] > 0 and later["prefilled_tokens"] * 5 < kept[0]["prefilled_tokens"]
    assert (tmp_path / "multiturn-tiny-cpu.json").exists() and "| mode | cache | turn |" in capsys.readouterr().out
