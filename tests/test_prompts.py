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
