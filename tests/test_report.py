"""``geosurge.report.format_table``: the rendered strings (one number of decimals a column)."""
from geosurge.report import column_decimals, format_table


def _body(text):
    """The table's rows, as lists of cells (header and rule dropped)."""
    return [line.split() for line in text.splitlines()[2:]]


def test_a_column_shares_one_number_of_decimals():
    rows = [{"p50_ms": 5.0, "cos": 0.99991, "n": 3}, {"p50_ms": 2.9, "cos": 1.0, "n": 1234},
            {"p50_ms": 22.8, "cos": None, "n": None}]
    text = format_table(rows)
    assert text.splitlines()[0].split() == ["p50_ms", "cos", "n"]
    # 5.0 / 2.9 / 22.8 were 5.0000 / 2.9000 / 22.8; a cosine keeps its four decimals beside an exact 1
    assert _body(text) == [["5.0", "0.9999", "3"], ["2.9", "1.0000", "1,234"], ["22.8"]]
    lines = text.splitlines()  # numbers right-aligned
    assert lines[2].startswith("   5.0  0.9999") and lines[4].startswith("  22.8")



def test_integer_valued_floats_print_without_decimals():
    # the hierarchy table: median_photos 7.0 was printed 7.0000 beside 84.0
    rows = [{"median_photos": 7.0, "median_area_km2": 84.0}, {"median_photos": 12.0, "median_area_km2": 2.5e6}]
    assert _body(format_table(rows)) == [["7", "84"], ["12", "2,500,000"]]


def test_decimals_follow_magnitude_with_a_cap_and_no_false_zero():
    assert [column_decimals(v) for v in ([150.123], [22.81], [2.912], [0.5123], [0.5], [3, None, "x"])] == \
        [0, 1, 2, 4, 1, None]
    # one small figure asks for 4 decimals; the column's largest (>= 100 asks 0) allows at most 2
    assert _body(format_table([{"ms": 0.4567}, {"ms": 150.2}])) == [["0.46"], ["150.20"]]
    # a non-zero value those decimals would round to 0 keeps 2 significant digits; nan and a zero stay as such
    assert _body(format_table([{"v": 0.00012}, {"v": 5000.0}, {"v": float("nan")}, {"v": -0.0}])) == \
        [["0.00012"], ["5,000.00"], ["nan"], ["0.00"]]


def test_explicit_decimals_for_units_the_caller_knows():
    # the demo's step 6: degrees with 2 decimals for lat and lon alike, km whole (was 1.7439 beside 110 and -160)
    from geosurge.commands.demo import LOCATE_DECIMALS

    rows = [{"true lat": 1.7439, "true lon": 110.0, "pred lat": -3.2, "pred lon": -160.0, "error_km": 3456.78},
            {"true lat": 45.0, "true lon": 7.25, "pred lat": 44.987, "pred lon": 7.1, "error_km": 12.3}]
    assert _body(format_table(rows, decimals=LOCATE_DECIMALS)) == [
        ["1.74", "110.00", "-3.20", "-160.00", "3,457"], ["45.00", "7.25", "44.99", "7.10", "12"]]


def test_a_mixed_column_formats_each_value_on_its_own():
    rows = [{"gate": "p95_drift_km", "value": 1234.5}, {"gate": "cosine_mean", "value": 0.99991},
            {"gate": "top1_agreement", "value": 0.5}]
    assert _body(format_table(rows, mixed=["value"])) == [["p95_drift_km", "1,234"], ["cosine_mean", "0.9999"],
                                                          ["top1_agreement", "0.5"]]
    # shared, the km would cap the cosine at 2 decimals: why the parity gates' value column is mixed
    assert _body(format_table(rows))[1] == ["cosine_mean", "1.00"]
