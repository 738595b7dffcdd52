import inspect

import rlm_async


def test_all_is_complete_and_importable():
    public = {
        name
        for name, obj in vars(rlm_async).items()
        if not name.startswith("_") and not inspect.ismodule(obj) and name != "annotations"
    }
    assert public == set(rlm_async.__all__)
    for name in rlm_async.__all__:
        assert getattr(rlm_async, name) is not None


def test_every_error_derives_from_rlm_error():
    for name in rlm_async.__all__:
        obj = getattr(rlm_async, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, rlm_async.RLMError), name


def test_public_classes_have_docstrings():
    for name in rlm_async.__all__:
        assert inspect.getdoc(getattr(rlm_async, name)), name
