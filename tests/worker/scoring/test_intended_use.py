"""The header checks of the intended use (worker/scoring/intended_use.py): each tag, the age from
PatientAge or the birth date, the site's word over the model's, decline vs flag."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset

from testkit.ood_set import ADULT_CHEST, source_path
from worker.errors import SettingsError
from worker.scoring.eligibility import HEADER_TAGS, check, read_header
from worker.scoring.intended_use import (IntendedUse, NotAssessed, Outside, age_in_years, assess, check_header,
                                         not_assessed_code, site_values)
from worker.settings import load_settings

SHIPPED = {"modalities": ["CR", "DX"], "body_parts": ["CHEST"], "view_positions": ["AP", "PA"],
           "min_age_years": 1.0, "max_age_years": 5.0}
SITE_DEFAULT = {"modalities": [], "body_parts": [], "view_positions": [], "min_age_years": -1.0,
                "max_age_years": -1.0, "outside": "decline"}


def use(**site) -> IntendedUse:
    return IntendedUse.resolve({**SITE_DEFAULT, **site}, SHIPPED)


def header(**values) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("age, years", [("004Y", 4.0), ("018M", 1.5), ("010W", 10 * 7 / 365.25), ("030D", 30 / 365.25)])
def test_age_from_patient_age_in_every_unit(age, years):
    assert age_in_years(header(PatientAge=age)) == pytest.approx(years)


def test_age_from_birth_date_and_study_date_then_acquisition_date():
    assert age_in_years(header(PatientBirthDate="20200101", StudyDate="20230101")) == pytest.approx(3.0, abs=0.01)
    assert age_in_years(header(PatientBirthDate="20200101", AcquisitionDate="20220701")) == pytest.approx(2.5, abs=0.01)
    # PatientAge wins over the dates
    assert age_in_years(header(PatientAge="002Y", PatientBirthDate="19400101", StudyDate="20040101")) == 2.0


@pytest.mark.parametrize("values", [{}, {"PatientBirthDate": "20200101"}, {"PatientAge": "4 years"},
                                    {"PatientBirthDate": "2020-01-01", "StudyDate": "20230101"},
                                    {"PatientBirthDate": "20240101", "StudyDate": "20230101"}])
def test_missing_or_unreadable_age_is_unknown_not_outside(values):
    assert age_in_years(header(**values)) is None
    assert check_header(header(**values), use()) == []


@pytest.mark.parametrize("values, code", [
    ({"Modality": "MR"}, NotAssessed.MODALITY),
    ({"BodyPartExamined": "KNEE"}, NotAssessed.BODY_PART),
    ({"ViewPosition": "LL"}, NotAssessed.VIEW_POSITION),
    ({"PatientAge": "045Y"}, NotAssessed.AGE),
    ({"PatientAge": "006M"}, NotAssessed.AGE),
    ({"PatientBirthDate": "19400305", "StudyDate": "20040826"}, NotAssessed.AGE),
])
def test_each_header_check_declines_with_its_code(values, code):
    found = check_header(header(**values), use())
    assert [c for c, _ in found] == [code]


def test_inside_the_intended_use_including_both_age_ends():
    for values in ({"Modality": "DX", "BodyPartExamined": "chest", "ViewPosition": "PA", "PatientAge": "001Y"},
                   {"Modality": "CR", "PatientBirthDate": "20180101", "StudyDate": "20231201"}):  # 5 y 11 m
        assert check_header(header(**values), use()) == []


def test_the_site_widens_or_replaces_the_models_values():
    adult = header(PatientAge="045Y", Modality="OT")
    assert [c for c, _ in check_header(adult, use())] == [NotAssessed.MODALITY, NotAssessed.AGE]
    assert check_header(adult, use(max_age_years=120.0, modalities=["*"])) == []
    assert [c for c, _ in check_header(adult, use(modalities=["OT"]))] == [NotAssessed.AGE]


def test_a_checkpoint_without_intended_use_keeps_the_chest_no_lateral_rule():
    legacy = IntendedUse.resolve(SITE_DEFAULT, {})
    assert legacy.body_parts == ("CHEST",) and legacy.view_positions == ("AP", "PA")
    assert legacy.min_age_years is None and legacy.modalities == ()
    assert check_header(header(PatientAge="080Y", Modality="OT"), legacy) == []


def test_decline_refuses_at_receive_flag_scores_and_marks(tmp_path):
    """The real adult chest CR of pydicom-data (born 1940, studied 2004): outside by age only."""
    parsed = read_header(source_path(ADULT_CHEST))
    assert parsed.dataset is not None and all(k in HEADER_TAGS for k in ("PatientBirthDate", "StudyDate"))
    eligible, reason, detail = check(parsed, use())
    assert (eligible, reason) == (False, "age") and "64.5 years" in detail
    assert check(parsed, use(outside="flag")) == (True, None, None)
    verdict = assess(check_header(parsed.dataset, use(outside="flag")), True, True, use(outside="flag"))
    assert verdict.assessed and verdict.flags == ("age",) and verdict.reasons == ()


def test_assess_combines_header_pixels_and_decoding():
    u = use()
    assert assess([], True, True, u).assessed
    assert assess([], None, True, u).assessed  # no detector: unknown, not outside
    assert assess([], False, True, u).reasons == ("out_of_distribution",)
    assert assess([], None, False, u).reasons == ("undecodable",)
    flagged = use(outside="flag")
    # the pixel check declines even under flag
    assert assess([(NotAssessed.AGE, "")], False, True, flagged).reasons == ("out_of_distribution",)


def test_stored_reasons_map_to_not_assessed_codes():
    assert [not_assessed_code(r) for r in ("age", "not_chest", "lateral_view", "wrong_sop_class", "late_arrival",
                                           "truncated_pixel_data", "out_of_distribution")] == \
        ["age", "body_part", "view_position", "not_eligible", "not_eligible", "undecodable", "out_of_distribution"]


def test_intended_use_settings_are_checked(tmp_path):
    settings = load_settings()
    assert settings.intended_use.outside == "decline" and settings.intended_use.min_age_years == -1.0
    assert IntendedUse.resolve(site_values(settings.intended_use), SHIPPED).max_age_years == 5.0
    bad = tmp_path / "site.toml"
    bad.write_text('[intended_use]\noutside = "ignore"\n')
    with pytest.raises(SettingsError, match="intended_use.outside"):
        load_settings(bad)
    bad.write_text('[intended_use]\nmin_age_years = 18.0\nmax_age_years = 5.0\n')
    with pytest.raises(SettingsError, match="max_age_years"):
        load_settings(bad)
    old = tmp_path / "old.toml"
    old.write_text('[studies]\nallowed_body_parts = ["CHEST"]\n')
    with pytest.raises(SettingsError, match="allowed_body_parts"):
        load_settings(old)
    with pytest.raises(ValueError, match="min_age_years"):
        IntendedUse((), (), (), 10.0, 5.0, Outside.DECLINE)
