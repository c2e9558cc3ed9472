from cdiff.names import markdown_text, safe_name, safe_names


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
