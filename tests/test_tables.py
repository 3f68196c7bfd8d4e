"""`flava.data.tables`: the one reader of users' tables (CSV, TSV, JSONL, parquet) and its rules:
suffixes, BOM, encodings, bad rows, column lookup, empty files; and the one prompt-template parser."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flava.data.tables import SUFFIXES, read_table, table_format
from flava.errors import ConfigError, DataError

ROWS = [{"image": "a.png", "caption": "a red, round thing"}, {"image": "b.png", "caption": 'say "hi"'}]


def write(path, fmt):
    """ROWS written as `fmt` at `path`."""
    if fmt in ("csv", "tsv"):
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, ["image", "caption"], delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(ROWS)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("suffix", SUFFIXES + (".CSV", ".Tab"))
def test_every_suffix_reads_the_same_rows(tmp_path, suffix):
    path = write(tmp_path / f"t{suffix}", table_format(f"t{suffix}"))
    table = read_table(path)
    assert table.columns == ["image", "caption"]
    assert [r.values for r in table.rows] == ROWS
    unit = "row" if suffix == ".parquet" else "line"
    first = 1 if suffix in (".jsonl", ".parquet") else 2
    assert table.rows[1].where == f"{path}, {unit} {first + 1}"


def test_tab_is_tab_separated_and_other_suffixes_are_refused(tmp_path):
    (tmp_path / "t.tab").write_text("text\tlabel\na, b\tx\n")
    assert read_table(tmp_path / "t.tab").rows[0].values == {"text": "a, b", "label": "x"}
    (tmp_path / "t.txt").write_text("text,label\n")
    with pytest.raises(DataError, match=r"t\.txt: a table is a \.csv, .*\.parquet file, not \.txt"):
        read_table(tmp_path / "t.txt")
    with pytest.raises(DataError, match="nowhere.csv does not exist"):
        read_table(tmp_path / "nowhere.csv")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_byte_order_mark_is_dropped(tmp_path, suffix):
    text = "text,label\nhello,1\n" if suffix == ".csv" else '{"text": "hello", "label": 1}\n'
    (tmp_path / f"bom{suffix}").write_bytes(b"\xef\xbb\xbf" + text.encode())
    table = read_table(tmp_path / f"bom{suffix}")
    assert table.columns == ["text", "label"] and table.rows[0].get("text") == "hello"


def test_utf8_is_read_and_other_bytes_are_a_bad_row(tmp_path):
    (tmp_path / "u.csv").write_bytes("text,label\ncafé 東京,1\n".encode() + b"bad \xff,2\nfine,3\n")
    with pytest.raises(DataError, match=r"u\.csv, line 3: the row holds bytes that are not UTF-8 text; save the "
                                        r"file as UTF-8"):
        read_table(tmp_path / "u.csv")
    table = read_table(tmp_path / "u.csv", bad_rows="skip")
    assert [r.get("text") for r in table.rows] == ["café 東京", "fine"]
    assert table.rejected == {"undecodable csv row": 1} and table.rows[1].line == 4
    (tmp_path / "u.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n[1]\n{not json\n')
    with pytest.raises(DataError, match=r"u\.jsonl, line 2: the line holds bytes that are not UTF-8"):
        read_table(tmp_path / "u.jsonl")
    table = read_table(tmp_path / "u.jsonl", bad_rows="skip")
    assert [r.values for r in table.rows] == [{"text": "ok"}]
    assert table.rejected == {"undecodable json line": 1, "json line that is not an object": 1,
                              "unreadable json line": 1}


def test_empty_cells_past_the_header_are_dropped_and_missing_ones_are_none(tmp_path):
    (tmp_path / "r.csv").write_text("a,b\n1,2,,\n4\n\n5,6\n")
    table = read_table(tmp_path / "r.csv")
    assert [r.values for r in table.rows] == [{"a": "1", "b": "2"}, {"a": "4", "b": None}, {"a": "5", "b": "6"}]
    assert [r.line for r in table.rows] == [2, 3, 5]


def test_rows_that_are_not_well_formed_are_bad_rows_not_merged_or_cut(tmp_path):
    # An unquoted comma shifted the label into a text's tail (the extra cell was dropped); a quote
    # never closed took every row after it into one cell; text after a closing quote was glued on.
    (tmp_path / "c.csv").write_text('text,label\nhello, world,pos\nfine,neg\n')
    with pytest.raises(DataError, match=r"c\.csv, line 2: 3 cells under a header of 2; quote a cell that holds "
                                        r"a comma"):
        read_table(tmp_path / "c.csv")
    (tmp_path / "q.csv").write_text('text,label\nfine,neg\n"a "quoted" thing",pos\nok,pos\n"never closed,neg\n'
                                    'lost,neg\nalso lost,pos\n')
    with pytest.raises(DataError, match=r"q\.csv, line 3: not a well-formed CSV row .*written twice"):
        read_table(tmp_path / "q.csv")
    table = read_table(tmp_path / "q.csv", bad_rows="skip")
    # The lines a stray quote took, each a row of the header's width alone, are read as rows (they had
    # been lost: "1 malformed row" of 3, then counted as lines after an unclosed quote).
    assert [r.get("text") for r in table.rows] == ["fine", "ok", "lost", "also lost"]
    assert table.rejected == {"malformed csv row": 2}
    # Lines that are not rows alone (a text's lines) are counted as lost.
    (tmp_path / "q2.csv").write_text('text,label\n"never closed,neg\nits second line\nand, a third,pos\nok,pos\n')
    table = read_table(tmp_path / "q2.csv", bad_rows="skip")
    assert table.rows == [] and table.rejected == {"malformed csv row": 1, "line after an unclosed quote": 3}
    # A quote closed before other text: the opening line is named, and the rows between read again.
    (tmp_path / "q3.tsv").write_text('image\tcaption\na\tfirst\nb\t"unbalanced start\nc\tthird\nd\ta 5" screen\n'
                                     'e\tlast\n')
    table = read_table(tmp_path / "q3.tsv", bad_rows="skip")
    assert [(r.get("image"), r.line) for r in table.rows] == [("a", 2), ("c", 4), ("d", 5), ("e", 6)]
    assert table.first_bad["malformed csv row"][0] == 3 and table.rejected == {"malformed csv row": 1}
    (tmp_path / "q4.tsv").write_text('image\tcaption\nb\t"unbalanced start\nits second line\nd\ta 5" screen\n'
                                     'e\tlast\n')
    table = read_table(tmp_path / "q4.tsv", bad_rows="skip")
    assert [r.get("image") for r in table.rows] == ["e"]
    assert table.rejected == {"malformed csv row": 1, "line inside a broken quoted cell": 2}
    # Where bad rows stop the command, the stray quote is named with its fix.
    (tmp_path / "r.csv").write_text('text,label\nfine,neg\n"never closed,neg\nlost,neg\n')
    with pytest.raises(DataError, match=r"r\.csv, line 3: a quote opened on this line is never closed \(.*\); "
                                        r"close it, or double a quote inside a quoted cell"):
        read_table(tmp_path / "r.csv")
    # A header over two lines: the rows' lines counted from where it ends.
    (tmp_path / "h.csv").write_text('image,"cap\ntion"\na.jpg,one\nb.jpg,"two\n')
    table = read_table(tmp_path / "h.csv", bad_rows="skip")
    assert [r.line for r in table.rows] == [3] and table.first_bad["malformed csv row"][0] == 4
    # A line with fewer cells than the header is a row as the reader reads it: re-read, not lost.
    (tmp_path / "w.csv").write_text('image,caption,label\na.jpg,"5 inch,x\nb.jpg,nice,\nc.jpg,ok\n')
    assert [r.get("image") for r in read_table(tmp_path / "w.csv", bad_rows="skip").rows] == ["b.jpg", "c.jpg"]
    # A stray quote closed lines later by an inch mark is valid CSV: kept, and the span recorded to be said.
    (tmp_path / "q5.tsv").write_text('image\tcaption\nb\t"Big sale\nc\tthird\nd\ta 55"\ne\tlast\n')
    table = read_table(tmp_path / "q5.tsv", bad_rows="skip")
    assert [r.get("image") for r in table.rows] == ["b", "e"] and table.spanning == [(2, 4)]
    (tmp_path / "q.csv").write_text('text,label\nfine,neg\n"never closed,neg\nlost,neg\n')
    with pytest.raises(DataError, match=r"q\.csv, line 3: a quote opened on this line is never closed"):
        read_table(tmp_path / "q.csv")
    # A quoted cell may hold commas, doubled quotes and line breaks.
    (tmp_path / "ok.csv").write_text('text,label\n"a, ""b""\nand c",pos\n')
    assert read_table(tmp_path / "ok.csv").rows[0].values == {"text": 'a, "b"\nand c', "label": "pos"}


def test_jsonl_columns_are_every_key_in_order_and_cells_keep_their_types(tmp_path):
    (tmp_path / "k.jsonl").write_text('{"image": "a.png", "answers": ["x", "y"]}\n\n{"label": 1, "image": "b"}\n')
    table = read_table(tmp_path / "k.jsonl")
    assert table.columns == ["image", "answers", "label"]
    assert table.rows[0].get("answers") == ["x", "y"] and table.rows[1].get("label") == 1
    assert table.rows[1].where.endswith("k.jsonl, line 3")


def test_a_missing_column_names_the_columns_and_the_nearest(tmp_path):
    (tmp_path / "c.csv").write_text("imagee,text\na.png,x\n")
    table = read_table(tmp_path / "c.csv")
    assert table.column("caption", "text") == "text"
    with pytest.raises(DataError, match=r"c\.csv has no column 'image' \(columns: imagee, text; the nearest is "
                                        r"'imagee'\); rename the column to 'image'"):
        table.column("image")
    with pytest.raises(DataError, match=r"has no column 'label' or 'y' \(columns: imagee, text\); add labels"):
        table.column("label", "y", fix="add labels")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_an_empty_file_is_an_error_and_a_header_alone_is_an_empty_table(tmp_path, suffix):
    (tmp_path / f"e{suffix}").write_bytes(b"")
    with pytest.raises(DataError, match=rf"e\{suffix} is empty"):
        read_table(tmp_path / f"e{suffix}")
    if suffix != ".jsonl":
        (tmp_path / f"h{suffix}").write_text("text\tlabel\n" if suffix == ".tsv" else "text,label\n")
        table = read_table(tmp_path / f"h{suffix}")
        assert table.columns == ["text", "label"] and table.rows == []
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "h.parquet")
    assert read_table(tmp_path / "h.parquet").rows == []


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet could not be read as parquet"):
        read_table(tmp_path / "bad.parquet")


def test_every_user_of_tables_reads_jsonl_and_parquet_too(tmp_path):
    from flava.data.sources import csv_pairs
    from flava.evaluate.readers.text import read_text_classification

    pq.write_table(pa.Table.from_pylist([{"text": f"t{i}", "label": i % 2} for i in range(6)]), tmp_path / "t.parquet")
    task = read_text_classification(tmp_path / "t.parquet", None, None, val_fraction=0.34)
    assert task.label_names == ["0", "1"] and len(task.train) + len(task.val) == 6
    # No test file: validation is scored as the test, and said (the API's test score would else
    # read as one the checkpoint was not chosen on).
    assert task.test is task.val and task.notes == ["validation: a seeded 34% of the training data",
                                                    "no test split: the validation split is scored as the test"]
    src = csv_pairs(str(write(tmp_path / "p.jsonl", "jsonl")))
    assert [(r.image.name, r.caption) for r in src.records] == [("a.png", ROWS[0]["caption"]),
                                                                ("b.png", ROWS[1]["caption"])]


def test_a_tables_images_may_be_bytes_but_urls_are_named_and_never_fetched(tmp_path):
    import io

    from PIL import Image

    from flava.data.members import URL_NOT_FETCHED, BadSample, Blob, ImageURL, table_image
    from flava.data.processor import ImageError, load_image
    from flava.data.sources import csv_pairs
    from flava.evaluate.readers.user_files import read_image_classification

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, format="PNG")
    png = buf.getvalue()
    assert table_image(tmp_path, "a/b.png") == tmp_path / "a" / "b.png"
    assert table_image(tmp_path, "file:///x/b.png") == table_image(tmp_path, "/x/b.png") == Path("/x/b.png")
    assert table_image(tmp_path, png) == table_image(tmp_path, {"bytes": png, "path": None}) == Blob(png)
    assert load_image(Blob(png)).size == (8, 8) and "bytes of image data, sha1 " in f"{Blob(png)}"
    # Two images of one length are two images where examples are grouped by their image (a validation carve).
    from flava.evaluate.readers.user_files import read_multimodal_table

    pngs = []
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (20 * i, 0, 0)).save(buf, format="PNG", compress_level=0)
        pngs.append(buf.getvalue())
    assert len({len(p) for p in pngs}) == 1 and len({repr(Blob(p)) for p in pngs}) == 8
    pq.write_table(pa.table({"image": pngs, "text": ["t"] * 8, "label": ["a", "b"] * 4}), tmp_path / "mm.parquet")
    task = read_multimodal_table(tmp_path / "mm.parquet", val_fraction=0.25)
    assert len(task.train) + len(task.val) == 8 and len(task.val) >= 1
    url = table_image(tmp_path, "https://example.com/a.png")
    assert url == ImageURL("https://example.com/a.png") and table_image(tmp_path, "s3://b/k.jpg").url == "s3://b/k.jpg"
    with pytest.raises(BadSample, match=URL_NOT_FETCHED):
        url.read()
    with pytest.raises(ImageError, match="cannot use image https://example.com/a.png: image URL, not downloaded"):
        load_image("https://example.com/a.png")  # the API's string too: not a missing file "https:/example.com"
    (tmp_path / "urls.csv").write_text("image,caption\nhttp://example.com/a.png,a\nhttp://example.com/b.png,b\n")
    with pytest.raises(DataError, match=r"urls\.csv: its images are URLs \(http://example\.com/a\.png, \.\.\.\), "
                                        r"which flava does not fetch"):
        csv_pairs(str(tmp_path / "urls.csv"))
    (tmp_path / "some.csv").write_text("image,caption\nhttp://example.com/a.png,a\nb.png,b\n")
    assert [type(r.image) for r in csv_pairs(str(tmp_path / "some.csv")).records] == [ImageURL, type(tmp_path)]
    # A parquet file's path cell too (read by data.arrow): named as the URL, counted as one, never a path.
    from flava.data.decode import open_image
    from flava.data.registry import open_source

    pq.write_table(pa.table({"image": ["http://example.com/a.png"], "caption": ["a"]}), tmp_path / "u.parquet")
    (record,) = open_source("pairs", str(tmp_path / "u.parquet")).records
    assert record.image.locator() == "http://example.com/a.png"
    with pytest.raises(BadSample, match=URL_NOT_FETCHED):
        open_image(record.image)
    (tmp_path / "labels.csv").write_text("image,label\nhttps://example.com/a.png,cat\n")
    with pytest.raises(DataError, match=r"labels\.csv, line 2: image https://example\.com/a\.png is a URL"):
        read_image_classification(tmp_path / "labels.csv")


def test_a_table_written_as_json_is_not_taken_for_a_broken_shard_index(tmp_path):
    from flava.data.registry import open_source

    (tmp_path / "rows.json").write_text('[{"image": "0.png", "caption": "a"}]')
    with pytest.raises(DataError, match=r"rows\.json is not a shard index .*must be JSON Lines \(\.jsonl"):
        open_source("pairs", str(tmp_path / "rows.json"))


def test_one_prompt_template_parser():
    from flava.evaluate.zero_shot import CLIP_TEMPLATES, SHORT_TEMPLATES, parse_templates

    assert parse_templates(None) == CLIP_TEMPLATES and parse_templates(" Short ") == SHORT_TEMPLATES
    assert parse_templates("none") == ("{}",)
    assert parse_templates("a {} square.| a square of {}. |") == ("a {} square.", "a square of {}.")
    assert parse_templates(["a {}"]) == ("a {}",)
    for bad in ("no slot", "two {} {}", ["a {}", 3], "|", []):
        with pytest.raises(ConfigError, match="exactly one {}|no prompt templates|templates must be"):
            parse_templates(bad)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_a_column_named_twice_is_refused_naming_it_and_the_file(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_arrays([pa.array(["a.png"]), pa.array(["a cat"]), pa.array(["a dog"])],
                                            names=["image", "caption", "caption"]), path)
    else:
        sep = "\t" if suffix == ".tsv" else ","
        path.write_text(f"image{sep}caption{sep}caption\na.png{sep}a cat{sep}a dog\n")
    # Read, the row had kept 'a dog' alone: the first caption column was never used, and nothing said so.
    for bad_rows in ("raise", "skip"):
        with pytest.raises(DataError) as e:
            read_table(path, bad_rows=bad_rows)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
        assert str(e.value).endswith("names column 'caption' twice (columns 2 and 3); rename or remove one of them")
    # A spreadsheet's trailing unnamed columns are no column named twice.
    (tmp_path / "trailing.csv").write_text("image,caption,,\na.png,a cat,,\n")
    assert read_table(tmp_path / "trailing.csv").rows[0].values["caption"] == "a cat"


def test_a_tables_bad_rows_are_said_at_a_runs_start(tmp_path):
    # A quote never closed on line 22 of 201 left 20 rows to train on, and the start line listed
    # those alone: the bad rows were first said in the counts at the run's end.
    from types import SimpleNamespace

    from flava.data.sources import csv_pairs
    from flava.train.accounting import source_notes

    (tmp_path / "a.png").write_bytes(b"")
    rows = ["image,caption"] + [f"a.png,caption {i}" for i in range(200)]
    rows[21] = 'a.png,"caption 20 with 7 inch'
    (tmp_path / "q.csv").write_text("\n".join(rows) + "\n")

    def notes(name):
        return source_notes({"pairs": SimpleNamespace(streams=[SimpleNamespace(source=csv_pairs(tmp_path / name))])},
                            4)

    assert notes("q.csv") == [f"data.pairs {tmp_path / 'q.csv'}: 1 of its 200 rows are bad and skipped (1 malformed "
                              "csv row); the first, line 22: a quote opened on this line is never closed (the 179 "
                              "line(s) after it read alone as rows, and are read so where bad rows are skipped); close "
                              "it, or double a quote inside a quoted cell"]
    rows[40] = "a.png,a cat, and a dog"  # lines after it that are not all rows alone: unread
    (tmp_path / "q.csv").write_text("\n".join(rows) + "\n")
    assert notes("q.csv") == [f"data.pairs {tmp_path / 'q.csv'}: a quote opened on line 22 is never closed, so lines "
                              "22-201 are unread and 180 of its 200 rows are skipped (179 line after an unclosed "
                              "quote, 1 malformed csv row); close that quote, or double a quote inside a quoted cell"]
    rows[40] = "a.png,caption 39"
    # Any bad row is said, with the first of them.
    rows[21] = "a.png,caption 20"
    rows[30:30] = ["a.png,a cat, and a dog", ",no image"]
    (tmp_path / "b.csv").write_text("\n".join(rows) + "\n")
    assert notes("b.csv") == [f"data.pairs {tmp_path / 'b.csv'}: 2 of its 202 rows are bad and skipped (1 malformed "
                              "csv row, 1 table row without an image); the first, line 31: 3 cells under a header of "
                              "2; quote a cell that holds a comma"]
    (tmp_path / "c.csv").write_text("\n".join(rows[:30] + rows[32:]) + "\n")
    assert notes("c.csv") == []
