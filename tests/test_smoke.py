import selfmoa


def test_version_is_a_string():
    assert isinstance(selfmoa.__version__, str) and selfmoa.__version__[0].isdigit()
