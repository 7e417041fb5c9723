import csv

import pytest

from duobench.concepts import PromptSetSpec
from duobench.errors import DuobenchError
from duobench.items import SamplerSettings
from duobench.prompts import load_prompt_set, to_work_items

ESD_COLUMNS = [
    "",
    "prompt",
    "categories",
    "nudity_percentage",
    "evaluation_seed",
    "evaluation_guidance",
    "sd_image_width",
    "sd_image_height",
    "case_number",
]
HF_COLUMNS = [
    "prompt",
    "categories",
    "nudity_percentage",
    "sd_seed",
    "sd_guidance_scale",
    "sd_image_width",
    "sd_image_height",
]


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def test_esd_format_quirks_each_follow_their_policy(tmp_path):
    path = write_csv(
        tmp_path / "i2p.csv",
        ESD_COLUMNS,
        [
            [0, "a naked\nwoman  on a beach", "sexual", 60, 123, 7, 512, 512, 10],
            [1, "", "sexual", 70, 5, 255, 128, 128, 2260],
            [2, "a cat", "none", 0, 6, 7, 512, 512, 12],
        ],
    )
    prompt_set = load_prompt_set(PromptSetSpec(source=str(path)))
    assert [row.prompt for row in prompt_set.rows] == ["a naked woman on a beach", "", "a cat"]
    assert [row.seed for row in prompt_set.rows] == [123, 5, 6]
    assert [row.guidance for row in prompt_set.rows] == [7.0, 255.0, 7.0]
    assert prompt_set.rows[1].width is None  # native size by default
    assert prompt_set.rows[1].meta["case_number"] == "2260"
    assert prompt_set.notes["empty prompt kept (unconditional)"] == 1
    assert prompt_set.notes["whitespace/newlines collapsed"] == 1
    assert prompt_set.notes["guidance > 30 kept from the row"] == 1
    assert prompt_set.notes["row resolution ignored (native size used)"] == 1

    kept = load_prompt_set(PromptSetSpec(source=str(path)), use_row_resolution=True, guidance_override=7.5)
    assert (kept.rows[1].width, kept.rows[1].height) == (128, 128)
    assert {row.guidance for row in kept.rows} == {7.5}


def test_hf_column_names_and_numeric_filter(tmp_path):
    path = write_csv(
        tmp_path / "hf.csv",
        HF_COLUMNS,
        [
            ["p1", "sexual", "60.0", 11, 7.5, 512, 512],
            ["p2", "sexual", "50.0", 12, 7.5, 512, 512],
            ["p3", "violence", "90", 13, 7.5, 512, 512],
        ],
    )
    prompt_set = load_prompt_set(PromptSetSpec(source=str(path), filter="nudity_percentage > 50"))
    assert [(row.prompt, row.seed) for row in prompt_set.rows] == [("p1", 11), ("p3", 13)]


def test_text_file_position_seeds_survive_filtering_and_extra_seeds(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first\nsecond\n\nthird\n")
    prompt_set = load_prompt_set(PromptSetSpec(source=str(path), seeds_per_prompt=2))
    assert [(row.prompt, row.seed) for row in prompt_set.rows] == [
        ("first", 0),
        ("first", 1),
        ("second", 1),
        ("second", 2),
        ("third", 2),
        ("third", 3),
    ]


def test_row_guidance_wins_over_defaults():
    spec = PromptSetSpec(source="inline", prompts=("a", "b"))
    items = to_work_items(load_prompt_set(spec).rows, SamplerSettings(steps=10, guidance=3.0, height=32, width=32))
    assert [(item.prompt, item.seed, item.guidance, item.steps) for item in items] == [
        ("a", 0, 3.0, 10),
        ("b", 1, 3.0, 10),
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        ("text,seed\nhello,1\n", "no 'prompt' column"),
        (None, "does not exist"),
    ],
)
def test_malformed_prompt_files_fail_clearly(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DuobenchError, match=message):
        load_prompt_set(PromptSetSpec(source=str(path)))


def test_bad_filter_and_empty_result_fail_clearly(tmp_path):
    path = write_csv(tmp_path / "hf.csv", HF_COLUMNS, [["p1", "sexual", "60.0", 11, 7.5, 512, 512]])
    with pytest.raises(DuobenchError, match="cannot be applied"):
        load_prompt_set(PromptSetSpec(source=str(path), filter="no_such_column > 1"))
    with pytest.raises(DuobenchError, match="no usable prompts"):
        load_prompt_set(PromptSetSpec(source=str(path), filter="nudity_percentage > 90"))


def test_offline_hf_dataset_fails_clearly():
    with pytest.raises(DuobenchError, match="needs internet once"):
        load_prompt_set(PromptSetSpec(source="hf:AIML-TUDA/i2p"))


@pytest.mark.parametrize(
    "column, value, problem",
    [
        ("evaluation_seed", "abc", "evaluation_seed is not a whole number"),
        ("evaluation_seed", "12.5", "evaluation_seed is not a whole number"),
        ("evaluation_seed", "1e30", "evaluation_seed is above"),
        ("evaluation_guidance", "high", "evaluation_guidance is not a number"),
        ("evaluation_guidance", "inf", "evaluation_guidance is not a finite number"),
        ("evaluation_guidance", "-3", "evaluation_guidance is below 0"),
        ("sd_image_width", "wide", "sd_image_width is not a number"),
        ("sd_image_width", "0", "sd_image_width is below 8"),
        ("sd_image_width", "-64", "sd_image_width is below 8"),
    ],
)
def test_an_unusable_number_cell_skips_its_row_counted_with_row_and_value(tmp_path, column, value, problem):
    good = [0, "a cat", "none", 0, 6, 7, 64, 64, 12]
    bad = list(good)
    bad[ESD_COLUMNS.index(column)] = value
    bad[1] = "a dog"
    path = write_csv(tmp_path / "odd.csv", ESD_COLUMNS, [good, good, bad])
    prompt_set = load_prompt_set(PromptSetSpec(source=str(path)), use_row_resolution=True)
    assert [row.prompt for row in prompt_set.rows] == ["a cat", "a cat"]
    skips = {note: count for note, count in prompt_set.notes.items() if note.startswith("skipped:")}
    assert list(skips.values()) == [1]
    (note,) = skips
    assert problem in note and f"row 3 ({value!r})" in note and "fix or empty the cell" in note


def test_missing_and_unused_number_cells_keep_their_rows(tmp_path):
    columns = ["prompt", "seed", "guidance", "width", "height"]
    path = write_csv(
        tmp_path / "odd.csv",
        columns,
        [["a", "12.0", "nan", "wide", "64"], ["b", "", "NaN", "512", "512"], ["c", "-3", "", "0", "64"]],
    )
    prompt_set = load_prompt_set(PromptSetSpec(source=str(path)))  # native size: widths are not used
    assert [(row.prompt, row.seed, row.guidance, row.width) for row in prompt_set.rows] == [
        ("a", 12, None, None),
        ("b", 1, None, None),  # empty seed: the row position
        ("c", -3, None, None),
    ]
    assert prompt_set.notes["guidance cell empty or nan: the sampler's default guidance used"] == 3
    assert prompt_set.notes["row resolution ignored (native size used)"] == 2
    assert not any(note.startswith("skipped:") for note in prompt_set.notes)


def test_many_bad_cells_are_one_note_and_all_bad_is_one_clear_error(tmp_path):
    rows = [[f"p{i}", "abc" if i % 2 else str(i), "7"] for i in range(14)]
    path = write_csv(tmp_path / "odd.csv", ["prompt", "seed", "guidance"], rows)
    prompt_set = load_prompt_set(PromptSetSpec(source=str(path)))
    assert len(prompt_set) == 7
    (note,) = [note for note in prompt_set.notes if note.startswith("skipped:")]
    assert prompt_set.notes[note] == 7
    assert "rows 2 ('abc'), 4 ('abc'), 6 ('abc'), 8 ('abc'), 10 ('abc') and 2 more" in note

    path = write_csv(tmp_path / "all-bad.csv", ["prompt", "guidance"], [["p1", "high"], ["p2", "low"]])
    with pytest.raises(DuobenchError, match=r"all-bad\.csv.*guidance is not a number \(rows 1 \('high'\), 2"):
        load_prompt_set(PromptSetSpec(source=str(path)))
