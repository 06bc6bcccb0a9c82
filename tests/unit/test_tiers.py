import pytest

from tierserve.core.errors import ModelNotFound
from tierserve.router.tiers import TierDirectory, TierEntry


def test_auto_goes_to_the_default_tier():
    d = TierDirectory([TierEntry("small"), TierEntry("large")], default="large")
    assert d.resolve("auto") == "large"
    assert d.resolve("small") == "small"
    assert d.model_ids() == ["auto", "small", "large"]
    assert TierDirectory([TierEntry("small"), TierEntry("large")]).resolve("auto") == "small"


def test_unknown_model_is_a_404_naming_the_choices():
    d = TierDirectory([TierEntry("small")])
    with pytest.raises(ModelNotFound, match="Available models: auto, small") as err:
        d.resolve("gpt-4")
    assert err.value.status_code == 404 and err.value.param == "model"


def test_bad_directory():
    with pytest.raises(ValueError):
        TierDirectory([])
    with pytest.raises(ValueError, match="default tier"):
        TierDirectory([TierEntry("small")], default="large")
