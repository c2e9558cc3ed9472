import pytest

from cdiff.errors import CdiffError
from cdiff.names import check_class_names, markdown_text, safe_name, safe_names


def test_path_like_names_become_plain_file_names():
    for bad in ("../../x", "/etc/passwd", "..", "a\\b", "x\x00y", ".hidden"):
        name = safe_name(bad)
        assert "/" not in name and "\\" not in name and ".." not in name and "\x00" not in name
        assert name and not name.startswith(".")
    assert safe_name("T-shirt/top") == "T-shirt_top" and safe_name("") == "class"


def test_safe_names_stay_unique():
    assert safe_names(["a/b", "a_b", "a?b"]) == ["a_b", "a_b-2", "a_b-3"]


def test_markdown_text_cannot_inject_html_or_break_a_table():
    text = markdown_text("<script>alert(1)</script> | [x](http://e) \n# h")
    assert "<" not in text and "&lt;script" in text and "\n" not in text
    assert "\\|" in text and "\\[" in text and "\\#" in text


def test_suffixed_names_stay_unique_when_a_suffix_is_taken():
    assert safe_names(["a/b", "a_b-2", "a_b"]) == ["a_b", "a_b-2", "a_b-3"]


@pytest.mark.parametrize(
    "names,message",
    [
        ([], "non-empty list"),
        ("abc", "non-empty list"),
        (["a", 3], "non-blank strings"),
        (["a", " "], "non-blank strings"),
        (["a", "caf\udce9"], "printable"),  # a non-UTF-8 folder name, as os.listdir gives it
        (["a", "x\ny"], "printable"),
        (["a", "x" * 101], "at most 100 characters"),
        (["a", "b", "a"], "'a' appears twice"),
        (["a", "b", "c", "d"], "room for 3 classes"),
    ],
)
def test_class_names_are_checked_where_they_enter(names, message):
    with pytest.raises(CdiffError, match=message) as err:
        check_class_names(names, "k", limit=3)
    assert "\n" not in str(err.value) and str(err.value).startswith("k: ")
    assert check_class_names(["T-shirt/top", "Ankle boot", "猫"], "k") == ["T-shirt/top", "Ankle boot", "猫"]


def test_markdown_text_survives_undecodable_names():
    assert markdown_text("caf\udce9").encode("utf-8") == b"caf?"
