from flowlib import paper


def test_table1_records_cover_every_printed_cell():
    records = paper.table1_records()
    assert len(records) == 2 * 5 * 5 - 5  # the MAF SKD row is empty in the paper
    assert {r["dataset"] for r in records} == set(paper.DATASETS)


def test_gap_closure_of_a_printed_row():
    # GLOW on GAS: student 5.967, SKD 6.515, teacher 6.604 -> (6.515 - 5.967) / (6.604 - 5.967)
    assert abs(paper.gap_closure("glow", "SKD Student", "gas") - 0.548 / 0.637) < 1e-12
    assert paper.gap_closure("maf", "SKD Student", "gas") is None
